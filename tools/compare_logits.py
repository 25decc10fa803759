#!/usr/bin/env python3
"""Compares two logits files written by `vlsm segment --save-logits` (e.g. f32 and
--precision bf16 runs of the same images and prompts), per prompt: the largest |Δlogit|,
that over the largest |logit|, and the share of mask pixels (model resolution) that agree at
the threshold. Prints a Markdown table.

    python tools/compare_logits.py A.npy B.npy [--threshold 0.5] [--prompts "p1|p2|…"]
"""

import argparse
import math

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--prompts", default="", help="prompt texts separated by |, for the table")
    args = ap.parse_args()
    a, b = np.load(args.a), np.load(args.b)
    if a.shape != b.shape:
        raise SystemExit(f"error: shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:  # [P, S, S]: one image
        a, b = a[None], b[None]
    cut = math.log(args.threshold / (1 - args.threshold))  # sigmoid(x) > t  ⇔  x > logit(t)
    names = args.prompts.split("|") if args.prompts else []
    print("| prompt | max abs Δlogit | relative to max abs logit | mask agreement |")
    print("|---|---:|---:|---:|")
    for p in range(a.shape[1]):
        x, y = a[:, p].astype(np.float64), b[:, p].astype(np.float64)
        d = np.abs(x - y).max()
        agree = ((x > cut) == (y > cut)).mean()
        name = names[p] if p < len(names) else f"#{p}"
        print(f"| {name} | {d:.3g} | {d / np.abs(x).max():.2%} | {agree:.4%} |")


if __name__ == "__main__":
    main()
