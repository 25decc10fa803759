#!/usr/bin/env python3
"""Reference size/count/location words from medvlsm's own measuring code, for vlsm's test.

medvlsm measures a mask's size, object count and location with
`scripts/features_from_img.py` (naamiinepal/medvlsm, commit 6b3a826 and the `old` branch).
Its code is not copied here: pass a clone of the repository and this script imports it.

  python tools/attributes_reference.py --medvlsm /path/to/medvlsm
      (needs numpy, opencv-python-headless, scipy, scikit-image, num2words)

Writes tests/fixtures/prompts/attributes_reference.json: synthetic grey masks (PNG, base64)
with one to four ellipses, some with soft (JPEG-like) rims, some touching the image border,
some with objects whose pixels never reach 255, and medvlsm's (count, size, location).
"""

import argparse
import base64
import json
import pathlib
import sys

import cv2
import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/prompts/attributes_reference.json"


def masks(rng, n):
    for i in range(n):
        h, w = int(rng.integers(30, 160)), int(rng.integers(30, 160))
        m = np.zeros((h, w), np.uint8)
        y, x = np.mgrid[0:h, 0:w]
        for _ in range(int(rng.integers(0, 5))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(1, h / 2.5), rng.uniform(1, w / 2.5)
            d = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2
            m[d <= 1] = 255 if rng.random() < 0.6 else int(rng.integers(129, 256))
            if rng.random() < 0.5:
                m[(d > 1) & (d <= 1.2) & (m == 0)] = int(rng.integers(100, 200))
        yield f"mask{i:03d}", m


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--medvlsm", required=True, type=pathlib.Path, help="a clone of naamiinepal/medvlsm")
    parser.add_argument("--count", type=int, default=120)
    args = parser.parse_args()
    sys.path.insert(0, str(args.medvlsm / "scripts"))
    import features_from_img as medvlsm  # noqa: E402  (their module, from their clone)

    cases = []
    tmp = pathlib.Path("/tmp/vlsm_attributes_mask.png")
    for name, m in masks(np.random.default_rng(20261128), args.count):
        ok, png = cv2.imencode(".png", m)
        assert ok
        tmp.write_bytes(png.tobytes())
        # The function reads the module-level `mask_path` (a bug in the script).
        medvlsm.mask_path = str(tmp)
        size, location, count = medvlsm.get_mask_decription(None, convert_num_to_words=False)
        cases.append(
            {
                "name": name,
                "png": base64.b64encode(png.tobytes()).decode(),
                "count": int(count),
                "size": size,
                "location": location,
            }
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"source": "naamiinepal/medvlsm scripts/features_from_img.py", "cases": cases}, indent=0) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
