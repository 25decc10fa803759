#!/usr/bin/env python3
"""Reference values for vlsm's segmentation metrics, computed with MONAI.

Writes tests/fixtures/metrics/monai_reference.json: a list of cases, each a pair of binary
masks (prediction, truth; rows of '0'/'1' strings) and MONAI's per-image values:
  dice  compute_dice(include_background=False, ignore_empty=False)   (medvlsm's call)
  iou   compute_iou(include_background=False, ignore_empty=False)
  hd95  compute_hausdorff_distance(percentile=95)                     (symmetric, pixel units)
  hd    compute_hausdorff_distance()                                  (max)
  nsd   compute_surface_dice(class_thresholds=[tau]) for tau in TOLERANCES (pixel units)
NaN and infinity are written as the strings "nan" / "inf".

Run: python tools/metrics_reference.py   (needs torch, monai, numpy, scipy; versions are
recorded in the output file).
"""

import json
import math
import pathlib

import numpy as np
import torch
import monai
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)

TOLERANCES = [1.0, 2.0, 5.0]
OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/metrics/monai_reference.json"


def ellipse(h, w, cy, cx, ry, rx):
    y, x = np.mgrid[0:h, 0:w]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def cases():
    rng = np.random.default_rng(20261128)
    h, w = 37, 53
    z = np.zeros((h, w), bool)
    yield "both empty", z, z
    yield "empty prediction", z, ellipse(h, w, 18, 26, 8, 12)
    yield "empty truth", ellipse(h, w, 18, 26, 8, 12), z
    yield "identical", ellipse(h, w, 18, 26, 8, 12), ellipse(h, w, 18, 26, 8, 12)
    yield "full image vs ellipse", np.ones((h, w), bool), ellipse(h, w, 18, 26, 8, 12)
    one = z.copy()
    one[5, 7] = True
    other = z.copy()
    other[30, 40] = True
    yield "single pixels", one, other
    yield "touching the border", ellipse(h, w, 0, 0, 10, 14), ellipse(h, w, 2, 3, 12, 12)
    yield "shifted ellipse", ellipse(h, w, 18, 26, 8, 12), ellipse(h, w, 20, 29, 8, 12)
    two = ellipse(h, w, 10, 10, 5, 6) | ellipse(h, w, 28, 42, 6, 8)
    yield "two blobs vs one", two, ellipse(h, w, 12, 12, 6, 6)
    ring = ellipse(h, w, 18, 26, 12, 16) & ~ellipse(h, w, 18, 26, 5, 7)
    yield "ring with a hole", ring, ellipse(h, w, 18, 26, 12, 16)
    for i in range(8):
        hh, ww = int(rng.integers(20, 64)), int(rng.integers(20, 64))
        pred = rng.random((hh, ww)) < 0.15 + 0.1 * i / 8
        truth = ellipse(hh, ww, rng.uniform(0, hh), rng.uniform(0, ww), rng.uniform(3, hh / 2), rng.uniform(3, ww / 2))
        yield f"random noise {i}", pred | (truth & (rng.random((hh, ww)) < 0.7)), truth


def number(v):
    v = float(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf"
    return v


def main():
    out = {
        "versions": {"monai": monai.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "tolerances": TOLERANCES,
        "cases": [],
    }
    for name, pred, truth in cases():
        p = torch.from_numpy(pred.astype(np.float32))[None, None]
        t = torch.from_numpy(truth.astype(np.float32))[None, None]
        case = {
            "name": name,
            "prediction": ["".join("1" if v else "0" for v in row) for row in pred],
            "truth": ["".join("1" if v else "0" for v in row) for row in truth],
            "dice": number(compute_dice(p, t, include_background=False, ignore_empty=False)[0, 0]),
            "iou": number(compute_iou(p, t, include_background=False, ignore_empty=False)[0, 0]),
            "hd95": number(compute_hausdorff_distance(p, t, percentile=95)[0, 0]),
            "hd": number(compute_hausdorff_distance(p, t)[0, 0]),
            "nsd": [number(compute_surface_dice(p, t, class_thresholds=[tau])[0, 0]) for tau in TOLERANCES],
        }
        out["cases"].append(case)
        print(f"{name:24s} dice {case['dice']} hd95 {case['hd95']} nsd {case['nsd']}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
