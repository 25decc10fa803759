//! A synthetic segmentation task for tests and demos: bright ellipses on a textured
//! background, with their masks. Deterministic in the seed.

use image::{GrayImage, Luma, Rgb, RgbImage};

use crate::stats::SplitMix64;

/// One image (`size`×`size`) and its 0/255 mask: one or two bright ellipses over smooth
/// colour noise with darker blobs as distractors.
pub fn ellipse_sample(seed: u64, size: u32) -> (RgbImage, GrayImage) {
    let mut rng = SplitMix64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5151);
    let mut unit = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let s = f64::from(size);
    // Value noise on an 8×8 lattice, bilinearly interpolated, per channel.
    let lattice: Vec<[f64; 3]> = (0..81).map(|_| [unit(), unit(), unit()]).collect();
    let ellipses: Vec<[f64; 5]> = (0..1 + usize::from(unit() < 0.4))
        .map(|_| {
            let (rx, ry) = (s * (0.12 + 0.16 * unit()), s * (0.12 + 0.16 * unit()));
            [
                rx + (s - 2.0 * rx) * unit(),
                ry + (s - 2.0 * ry) * unit(),
                rx,
                ry,
                unit() * std::f64::consts::PI,
            ]
        })
        .collect();
    let blobs: Vec<[f64; 3]> = (0..2)
        .map(|_| [s * unit(), s * unit(), s * (0.05 + 0.1 * unit())])
        .collect();
    let inside = |x: f64, y: f64, e: &[f64; 5]| {
        let (c, sn) = (e[4].cos(), e[4].sin());
        let (dx, dy) = (x - e[0], y - e[1]);
        let (u, v) = (dx * c + dy * sn, -dx * sn + dy * c);
        (u / e[2]).powi(2) + (v / e[3]).powi(2) <= 1.0
    };
    let mut image = RgbImage::new(size, size);
    let mut mask = GrayImage::new(size, size);
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (f64::from(x) / s * 8.0, f64::from(y) / s * 8.0);
            let (ix, iy) = (fx.floor() as usize, fy.floor() as usize);
            let (tx, ty) = (fx - ix as f64, fy - iy as f64);
            let at = |i: usize, j: usize, c: usize| lattice[(j.min(8)) * 9 + i.min(8)][c];
            let mut rgb = [0.0; 3];
            for (c, v) in rgb.iter_mut().enumerate() {
                let top = at(ix, iy, c) * (1.0 - tx) + at(ix + 1, iy, c) * tx;
                let bottom = at(ix, iy + 1, c) * (1.0 - tx) + at(ix + 1, iy + 1, c) * tx;
                *v = 60.0 + 90.0 * (top * (1.0 - ty) + bottom * ty);
            }
            let (px, py) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
            for b in &blobs {
                if (px - b[0]).powi(2) + (py - b[1]).powi(2) <= b[2] * b[2] {
                    rgb = rgb.map(|v| v * 0.5);
                }
            }
            let on = ellipses.iter().any(|e| inside(px, py, e));
            if on {
                rgb = [235.0, 225.0, 200.0];
            }
            image.put_pixel(x, y, Rgb(rgb.map(|v| v.clamp(0.0, 255.0) as u8)));
            mask.put_pixel(x, y, Luma([if on { 255 } else { 0 }]));
        }
    }
    (image, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_have_a_target() {
        let (a, m) = ellipse_sample(3, 64);
        let (b, n) = ellipse_sample(3, 64);
        assert_eq!((a.as_raw(), m.as_raw()), (b.as_raw(), n.as_raw()));
        let fg = m.as_raw().iter().filter(|&&v| v == 255).count();
        assert!(fg > 64 * 64 / 50, "{fg}");
        assert_ne!(ellipse_sample(4, 64).1.as_raw(), m.as_raw());
    }
}
