#!/usr/bin/env python3
"""Times CLIPSeg rd64-refined (full size, random weights: speed does not depend on the
values) with transformers (PyTorch) and ONNX Runtime, the way their users run it: one forward
per (image, prompt) pair, the image re-encoded for every prompt.

    python tools/bench_reference.py setup DIR     # writes DIR/model (HF layout) and DIR/model.onnx
    python tools/bench_reference.py torch DIR     # prints one JSON line per case
    python tools/bench_reference.py ort DIR
    python tools/bench_reference.py table DIR     # DIR/results.jsonl as a Markdown table

tools/bench.sh runs all three frameworks (and vlsm) in one go; see README "Performance".
Each mode runs in its own process so its peak memory (ru_maxrss) is its own.
"""

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "polyp",
    "round polyp",
    "pink round polyp",
    "medium pink round polyp",
    "one medium pink round polyp",
    "one medium pink round polyp, located in bottom right of the image",
    "polyp which is a projecting growth of tissue",
    "a small lump in the lining of the colon",
    "skin melanoma",
    "left ventricle of the heart in a two chamber view",
]
SIZE = 352
REPEATS = 3


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn):
    """Best of REPEATS (after one warm-up): wall seconds and CPU seconds."""
    fn()
    best = None
    for _ in range(REPEATS):
        w0, c0 = time.perf_counter(), cpu_seconds()
        fn()
        row = (time.perf_counter() - w0, cpu_seconds() - c0)
        best = row if best is None or row[1] < best[1] else best
    return best


# (images, prompts per image) of each case: one image with 1 and 10 prompts, and a batch
# of 8 images with one prompt each (one forward of batch 8 here; `segment --batch-size 8`).
CASES = [(1, 1), (1, 10), (8, 1)]


def case_name(images, prompts):
    return f"{images}x{prompts}"


def inputs(n_prompts, n_images=1):
    """Feed arrays for n_images images × n_prompts prompts, one row per pair."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(ROOT / "tests/fixtures/tokenizer"), pad_token="<|endoftext|>")
    texts = PROMPTS[:n_prompts] * n_images
    enc = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(n_images, 3, SIZE, SIZE)).astype(np.float32)
    return pixels.repeat(n_prompts, 0), enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def work_gflop(images, prompts):
    """The arithmetic a case needs at least (what vlsm computes): each image's vision
    tower up to the last tapped block (10 of 12) once, each prompt's text tower up to its
    EOS token, and the decoder per (image, prompt) pair. Multiply-adds count 2."""
    from transformers import CLIPTokenizer

    tokens, d, hidden, layers = (SIZE // 16) ** 2 + 1, 768, 3072, 10
    block = 2 * tokens * (4 * d * d + 2 * d * hidden) + 2 * 2 * tokens * tokens * d
    vision = layers * block + 2 * (tokens - 1) * 3 * 16 * 16 * d
    tok = CLIPTokenizer.from_pretrained(str(ROOT / "tests/fixtures/tokenizer"), pad_token="<|endoftext|>")
    text = 0
    for p in PROMPTS[:prompts]:
        n, td = len(tok(p)["input_ids"]), 512
        text += 12 * (2 * n * (4 * td * td + 2 * td * 2048) + 2 * 2 * n * n * td)
    # Decoder: three reduces (768→64 on every token), FiLM, three layers of width 64 (MLP
    # 2048), the refined head's transposed convolutions (small).
    r, dd = 64, 2048
    decoder = 3 * 2 * tokens * d * r + 3 * (2 * tokens * (4 * r * r + 2 * r * dd) + 2 * 2 * tokens * tokens * r)
    return (images * vision + text + images * prompts * decoder) / 1e9


def setup(out: Path):
    import torch
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    torch.manual_seed(0)
    config = CLIPSegConfig(
        projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64, decoder_num_attention_heads=4,
        decoder_intermediate_size=2048, conditional_layer=0, use_complex_transposed_convolution=True,
        vision_config=dict(patch_size=16), text_config=dict(bos_token_id=0, eos_token_id=2, pad_token_id=1),
    )
    model = CLIPSegForImageSegmentation(config).eval()
    with torch.no_grad():  # the decoder's random init has small values; make them ordinary
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model_dir = out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="ViTImageProcessor", do_resize=True, size=SIZE, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])))
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(ROOT / "tests/fixtures/tokenizer" / f, model_dir / f)
    (model_dir / "special_tokens_map.json").write_text(json.dumps(dict(pad_token="<|endoftext|>")))
    px, ids, mask = inputs(2)
    model.config._attn_implementation = "eager"

    class Wrapped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, pixel_values, attention_mask):
            return self.m(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask).logits

    torch.onnx.export(
        Wrapped(model), (torch.from_numpy(ids), torch.from_numpy(px), torch.from_numpy(mask)),
        str(out / "model.onnx"), input_names=["input_ids", "pixel_values", "attention_mask"],
        output_names=["logits"], opset_version=17, dynamo=False,
        dynamic_axes={"input_ids": {0: "b"}, "pixel_values": {0: "b"}, "attention_mask": {0: "b"}, "logits": {0: "b"}},
    )
    # A test image for `vlsm segment`.
    from PIL import Image
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(out / "image.png")
    print(json.dumps(dict(setup=str(out), parameters=sum(p.numel() for p in model.parameters()))))


def bench_torch(out: Path):
    import torch
    from transformers import CLIPSegForImageSegmentation

    torch.set_num_threads(1)
    model = CLIPSegForImageSegmentation.from_pretrained(out / "model").eval()
    for images, n in CASES:
        px, ids, mask = (torch.from_numpy(a) for a in inputs(n, images))
        with torch.no_grad():
            wall, cpu = timed(lambda: model(pixel_values=px, input_ids=ids, attention_mask=mask))
        print(json.dumps(dict(framework=f"PyTorch {torch.__version__} (transformers)", case=case_name(images, n), wall_s=wall, cpu_s=cpu, peak_mib=peak_mib())))


def bench_ort(out: Path, make_inputs=None, cases=None):
    """ONNX Runtime on DIR/model.onnx, one thread; `make_inputs(n)` gives the feed arrays
    (`make_inputs(n, images)` for a batch); `cases` [(images, prompts)], default CASES."""
    import onnxruntime as ort

    make_inputs = make_inputs or inputs

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    for images, n in cases or CASES:
        px, ids, mask = make_inputs(n) if images == 1 else make_inputs(n, images)
        feed = {k: v for k, v in dict(input_ids=ids, pixel_values=px, attention_mask=mask).items() if k in names}
        wall, cpu = timed(lambda: sess.run(None, feed))
        print(json.dumps(dict(framework=f"ONNX Runtime {ort.__version__}", case=case_name(images, n), wall_s=wall, cpu_s=cpu, peak_mib=peak_mib())))


def table(out: Path, flops=False):
    """Markdown table of WORKDIR/results.jsonl, CPU seconds relative to ONNX Runtime; with
    `flops`, the GFLOP/s each achieves on CLIPSeg rd64-refined's work (`work_gflop`)."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    ort = {r["case"]: r for r in rows if r["framework"].startswith("ONNX")}
    work = {}
    print("| framework | case | CPU s | wall s | CPU vs ORT |" + (" GFLOP/s |" if flops else "") + " peak MiB |")
    print("|---|---|---:|---:|---:|" + ("---:|" if flops else "") + "---:|")
    for r in rows:
        images, prompts = (int(v) for v in r["case"].split("x"))
        ratio = r["cpu_s"] / ort[r["case"]]["cpu_s"] if r["case"] in ort else float("nan")
        case = "%d image%s × %d prompt%s" % (images, "" if images == 1 else "s", prompts, "" if prompts == 1 else "s")
        rate = ""
        if flops:
            work.setdefault(r["case"], work_gflop(images, prompts))
            rate = f" {work[r['case']] / r['cpu_s']:.0f} |"
        print(f"| {r['framework']} | {case} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {ratio:.2f}× |{rate} {r['peak_mib']:.0f} |")
    if flops:
        print()
        print("GFLOP/s: each case's work (what vlsm computes) over CPU seconds; work in GFLOP: "
              + ", ".join(f"{c} {g:.1f}" for c, g in work.items()) + ".")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    {"setup": setup, "torch": bench_torch, "ort": bench_ort, "table": table,
     "table-flops": lambda o: table(o, flops=True)}[mode](out)
