//! Image decoding and resizing match PIL byte for byte.

use vlsm::preprocess::{decode_rgb, resize_bilinear_pil, resize_nearest};
use vlsm_tests::fixture;

fn load(path: &str) -> image::RgbImage {
    decode_rgb(&std::fs::read(fixture(path)).unwrap()).unwrap()
}

#[test]
fn bilinear_resize_equals_pil_bytes_in_both_pass_orders() {
    let src = load("resize/source_97x148.png");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("manifest.json")).unwrap()).unwrap();
    let targets = manifest["resize_targets"].as_array().unwrap();
    assert!(targets.len() >= 6);
    for name in targets {
        let name = name.as_str().unwrap();
        let expected = load(&format!("resize/{name}"));
        let got = resize_bilinear_pil(&src, expected.width(), expected.height());
        let differing = got
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(differing, 0, "{name}: {differing} bytes differ from PIL");
    }
}

#[test]
fn odd_formats_decode_to_rgb() {
    for (file, w, h) in [
        ("images/grey_120x90.png", 120, 90),
        ("images/rgba_70x80.png", 70, 80),
        ("images/palette_110x75.png", 110, 75),
        ("images/grey16_60x60.png", 60, 60),
    ] {
        let img = load(file);
        assert_eq!((img.width(), img.height()), (w, h), "{file}");
    }
    // Grey is replicated into all three channels.
    let grey = load("images/grey_120x90.png");
    assert!(grey.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
}

#[test]
fn sixteen_bit_images_are_scaled_not_saturated() {
    let img = load("images/grey16_60x60.png");
    let raw = image::open(fixture("images/grey16_60x60.png"))
        .unwrap()
        .to_luma16();
    for (p, q) in img.pixels().zip(raw.pixels()) {
        assert_eq!(p.0[0], ((q.0[0] as f64) / 257.0).round() as u8);
    }
}

#[test]
fn nearest_resize_follows_pil_indexing() {
    // 2×2 → 4×3: each output pixel takes floor((o + 0.5) · in / out): rows 0, 1, 1.
    let mask = [1, 2, 3, 4];
    let out = resize_nearest(&mask, 2, 2, 4, 3);
    assert_eq!(out, [1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]);
    // Identity.
    assert_eq!(resize_nearest(&mask, 2, 2, 2, 2), mask);
}
