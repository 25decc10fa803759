#!/usr/bin/env python3
"""Rewrites a Hugging Face model directory's model.safetensors with the same names, shapes and
dtypes but periodic synthetic values, so that the full-size model compresses to well under a
megabyte with xz and can travel to an offline GPU machine (tools/gpu-check.sh). Speed does not
depend on the values; these are like transformers' random init (normal, std 0.02; norm weights
1, biases 0), repeating every 4096 elements. Standard library only.

    python3 tools/gpu_check_model.py SRC_MODEL_DIR OUT_DIR
"""

import json
import random
import shutil
import struct
import sys
from pathlib import Path

PERIOD = 4096


def main(src: Path, out: Path) -> None:
    data = (src / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    rng = random.Random(0)
    block = struct.pack(f"<{PERIOD}f", *(rng.gauss(0.0, 0.02) for _ in range(PERIOD)))
    out.mkdir(parents=True, exist_ok=True)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    body = bytearray()
    layout = {}
    for name in names:
        info = header[name]
        if info["dtype"] != "F32":
            raise SystemExit(f"{name}: only float32 checkpoints are supported, not {info['dtype']}")
        count = 1
        for d in info["shape"]:
            count *= d
        if name.endswith(".bias"):
            values = bytes(4 * count)
        elif "norm" in name and name.endswith(".weight"):
            values = struct.pack("<f", 1.0) * count
        else:
            values = (block * (count // PERIOD + 1))[: 4 * count]
        layout[name] = {"dtype": "F32", "shape": info["shape"], "data_offsets": [len(body), len(body) + len(values)]}
        body += values
    head = json.dumps(layout, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        f.write(body)
    for extra in src.iterdir():
        if extra.name != "model.safetensors" and extra.is_file() and extra.suffix in {".json", ".txt"}:
            shutil.copy(extra, out / extra.name)
    print(f"{out}: {len(names)} tensors, {len(body) / 2**20:.0f} MiB")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
