"""Makes the page's example images: synthetic, drawn by this script (CC0), with masks.

    python tools/make_examples.py   # needs numpy and Pillow; writes www/examples/

They are not medical images: a pink, textured "mucosa" with a raised rounder blob
(polyp-like) and a skin-toned background with a darker irregular blob (lesion-like).
Small on purpose (they ship with the page and travel inside share links).
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

OUT = Path(__file__).resolve().parent.parent / "www" / "examples"


def blob_mask(h, w, cy, cx, ry, rx, wobble, rng):
    yy, xx = np.mgrid[0:h, 0:w]
    angle = np.arctan2(yy - cy, xx - cx)
    radius = 1 + sum(a * np.sin(k * angle + p) for k, a, p in wobble)
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return d <= radius**2


def textured(h, w, base, amp, rng, blur):
    noise = rng.normal(0, 1, (h, w, 3))
    img = np.clip(base + amp * noise, 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)


def save(name, rgb, mask):
    OUT.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8)).save(OUT / f"{name}.png", optimize=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(OUT / f"{name}_mask.png", optimize=True)


def main():
    rng = np.random.default_rng(2024)
    h, w = 240, 288
    bg = textured(h, w, np.array([196, 92, 88]), 40, rng, 3)
    mask = blob_mask(h, w, 110, 160, 48, 58, [(3, 0.06, 0.3), (5, 0.04, 1.1)], rng)
    yy, xx = np.mgrid[0:h, 0:w]
    shade = np.clip(1.25 - (((yy - 95) / 60) ** 2 + ((xx - 145) / 70) ** 2), 0.7, 1.25)
    polyp = np.clip(bg * 0.9 + np.array([30, 20, 25]), 0, 255) * shade[..., None]
    rgb = np.where(mask[..., None], polyp, bg * (0.85 + 0.15 * (xx / w))[..., None])
    save("synthetic_polyp", np.clip(rgb, 0, 255), mask)

    bg = textured(h, w, np.array([222, 178, 150]), 18, rng, 2)
    mask = blob_mask(h, w, 125, 140, 55, 45, [(2, 0.1, 0.2), (4, 0.08, 2.0), (7, 0.05, 0.5)], rng)
    lesion = textured(h, w, np.array([110, 70, 55]), 30, rng, 1.5)
    rgb = np.where(mask[..., None], lesion, bg)
    save("synthetic_lesion", rgb, mask)


if __name__ == "__main__":
    main()
