#!/usr/bin/env python3
"""PyTorch's CRIS training throughput on the setup `vlsm train` is measured on, for the
README: medvlsm's CRIS module (full size, tools/bench_cris_reference.py's WORK/model), the
whole model trained (BatchNorm in training mode, dropout 0.2), MONAI DiceLoss on sigmoid,
AdamW (lr 2e-5, weight decay 1e-3), clip_grad_norm_ 0.5, single thread, images resized to
416 as medvlsm's transforms, one prompt per image.

  python tools/cris_train_throughput.py WORK DATA_ROOT/DATASET [--batch-size 4] [--steps 3]

Prints one JSON line: training samples per second over the timed steps (after one warm-up
step), CPU seconds per sample, and the peak RSS.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_cris_reference as ref  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    from monai.losses import DiceLoss
    from PIL import Image
    from transformers import CLIPTokenizer

    model = ref.build(torch.load(a.work / "model" / "cris.pt", weights_only=False)).train()
    entries = json.loads((a.data / "anns" / "train.json").read_text())[: a.batch_size]
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    px, masks, texts = [], [], []
    for e in entries:
        img = np.asarray(Image.open(a.data / "images" / e["img_name"]).convert("RGB").resize((416, 416), Image.BILINEAR))
        px.append(((img.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1))
        m = Image.open(a.data / "masks" / e["mask_name"]).convert("L").resize((416, 416), Image.NEAREST)
        masks.append((np.asarray(m) > 127).astype(np.float32)[None])
        v = e["prompts"]["p1"]
        texts.append(v if isinstance(v, str) else v[0])
    tok = CLIPTokenizer(str(ref.TOKENIZER / "vocab.json"), str(ref.TOKENIZER / "merges.txt"))
    ids = tok(texts, max_length=77, truncation=True, padding="max_length", return_tensors="pt")["input_ids"]
    px, masks = torch.from_numpy(np.stack(px)), torch.from_numpy(np.stack(masks))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=1e-3)
    loss_fn = DiceLoss(sigmoid=True)

    def step():
        opt.zero_grad()
        loss = loss_fn(model(px, ids), masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()

    step()
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.steps):
        step()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    n = a.steps * a.batch_size
    print(json.dumps(dict(framework=f"PyTorch {torch.__version__} (medvlsm CRIS)", batch=a.batch_size,
                          samples_per_s=n / wall, cpu_s_per_sample=cpu / n,
                          peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))


if __name__ == "__main__":
    main()
