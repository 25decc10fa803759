#!/usr/bin/env python3
"""Times CRIS at full size (the study's configs/model/cris.yaml: CLIP RN50 + text transformer,
FPN 512/1024/1024 → 256/512/1024, 3 decoder layers of 512 with 8 heads, 416 px, 77 tokens;
random weights: speed does not depend on the values) with medvlsm's own module (PyTorch) and
with ONNX Runtime on its export, the way the study's code runs it: one forward per (image,
prompt) pair, the image re-encoded for every prompt.

    python tools/bench_cris_reference.py setup DIR   # DIR/model (vlsm folder: cris.pt, config.json,
                                                     # CLIP tokenizer), DIR/model.onnx, DIR/image.png
    python tools/bench_cris_reference.py torch DIR   # one JSON line per case
    python tools/bench_cris_reference.py ort DIR

tools/bench-cris.sh runs both and vlsm (`--weights DIR/model`) in one go and prints the table
with tools/bench_reference.py's `table`. `CRIS.__init__` takes CLIP's state dict from
`torch.jit.load(RN50.pt)`; that file cannot be downloaded here, so it is pointed at a random
CLIP RN50 of the real sizes (medvlsm's own `cris_model.clip.CLIP`).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_reference import PROMPTS, peak_mib, timed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT.parent / "shared" / "reference" / "medvlsm"
TOKENIZER = ROOT / "tests" / "fixtures" / "tokenizer"
SIZE = 416
NET = dict(word_len=77, fpn_in=[512, 1024, 1024], fpn_out=[256, 512, 1024], vis_dim=512, word_dim=1024,
           num_layers=3, num_head=8, dim_ffn=2048, dropout=0.2, intermediate=False, img_size=SIZE)


def build(state=None):
    import torch

    sys.path.insert(0, str(REF))
    from cris_model import clip as cris_clip
    from cris_model.segmenter import CRIS

    clip_state = cris_clip.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 77, 49408, 512, 8, 12).state_dict()

    class FakeJit:
        def state_dict(self):
            return dict(clip_state)

    real = torch.jit.load
    torch.jit.load = lambda *a, **k: FakeJit()
    try:
        model = CRIS(clip_pretrain="RN50.pt", freeze_encoder=False, cris_pretrain=None, **NET)
    finally:
        torch.jit.load = real
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def inputs(n):
    from PIL import Image
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"))
    enc = tok(PROMPTS[:n], max_length=77, truncation=True, padding="max_length", return_tensors="np")
    img = np.asarray(Image.open(WORK / "image.png").convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    px = ((img.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
    return px.repeat(n, 0), enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def setup(out: Path):
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model = build()
    with torch.no_grad():  # ordinary magnitudes everywhere
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = out / "model"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "cris.pt", pickle_protocol=5)
    (folder / "config.json").write_text(json.dumps(dict(model_type="cris", **NET), indent=2))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / name, folder / name)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(out / "image.png")
    export_onnx(model, out)
    print(json.dumps(dict(setup=str(out), parameters=sum(p.numel() for p in model.parameters()))))


def export_onnx(model, out: Path):
    """One (image, prompt) pair per call: the projector's grouped convolution takes its group
    count from the batch, which tracing freezes, so the export has batch 1."""
    import torch

    px, ids, _ = inputs(1)
    torch.onnx.export(model, (torch.from_numpy(px), torch.from_numpy(ids)), str(out / "model.onnx"),
                      input_names=["pixel_values", "input_ids"], output_names=["logits"], opset_version=17,
                      dynamo=False)


def reexport(out: Path):
    import torch

    export_onnx(build(torch.load(out / "model" / "cris.pt", weights_only=False)), out)


def bench_torch(out: Path):
    import torch

    torch.set_num_threads(1)
    model = build(torch.load(out / "model" / "cris.pt", weights_only=False))
    for n in (1, 10):
        px, ids, _ = (torch.from_numpy(a) for a in inputs(n))
        with torch.no_grad():
            wall, cpu = timed(lambda: model(px, ids))
        print(json.dumps(dict(framework=f"PyTorch {torch.__version__} (medvlsm CRIS)", case=f"1x{n}",
                              wall_s=wall, cpu_s=cpu, peak_mib=peak_mib())))


def bench_ort(out: Path):
    """ONNX Runtime, one thread, one call per (image, prompt) pair."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    for n in (1, 10):
        px, ids, _ = inputs(n)
        feeds = [dict(pixel_values=px[i:i + 1], input_ids=ids[i:i + 1]) for i in range(n)]
        wall, cpu = timed(lambda: [sess.run(None, f) for f in feeds])
        print(json.dumps(dict(framework=f"ONNX Runtime {ort.__version__}", case=f"1x{n}", wall_s=wall,
                              cpu_s=cpu, peak_mib=peak_mib())))


if __name__ == "__main__":
    mode, WORK = sys.argv[1], Path(sys.argv[2])
    WORK.mkdir(parents=True, exist_ok=True)
    {"setup": setup, "reexport": reexport, "torch": bench_torch, "ort": bench_ort}[mode](WORK)
