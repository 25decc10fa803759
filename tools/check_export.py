#!/usr/bin/env python3
"""Checks that a model exported by `vlsm train` loads in transformers and gives vlsm's
logits: CLIPSegForImageSegmentation.from_pretrained(DIR), one image, one prompt, compared
with `vlsm segment --weights DIR --save-logits`.

  python tools/check_export.py RUN/model IMAGE "prompt" [--vlsm target/debug/vlsm]
(needs torch, transformers, pillow, numpy). Prints the largest |Δlogit| and exits 1 above 1e-4.
"""

import argparse
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("prompt")
    parser.add_argument("--vlsm", default="target/debug/vlsm")
    args = parser.parse_args()
    model = CLIPSegForImageSegmentation.from_pretrained(args.model).eval()
    processor = CLIPSegProcessor.from_pretrained(args.model)
    inputs = processor(text=[args.prompt], images=[Image.open(args.image).convert("RGB")], return_tensors="pt", padding="max_length")
    with torch.no_grad():
        theirs = model(**inputs).logits.numpy().reshape(-1)
    with tempfile.TemporaryDirectory() as tmp:
        npy = f"{tmp}/logits.npy"
        subprocess.run(
            [args.vlsm, "segment", args.image, "--prompt", args.prompt, "--weights", args.model, "--out", tmp, "--save-logits", npy],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        ours = np.load(npy).reshape(-1)
    diff = float(np.abs(ours - theirs).max())
    print(f"transformers loaded {args.model}; max |Δlogit| vs vlsm = {diff:.3g} (logits up to {np.abs(theirs).max():.3g})")
    sys.exit(0 if diff <= 1e-4 else 1)


if __name__ == "__main__":
    main()
