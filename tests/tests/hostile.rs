//! Hostile input to the library's readers: the corpus of `tools/make_hostile.py`
//! (decompression bombs, malicious pickles, broken safetensors) and mutation loops over
//! valid files. Every reader must return an error — never panic, never allocate without
//! bound. `VLSM_FUZZ_ITERATIONS` lengthens the loops (see the README's "Hostile input").

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

use vlsm::Weights;
use vlsm::preprocess::{decode_image, decode_mask};
use vlsm_tests::fixture;

fn hostile(name: &str) -> PathBuf {
    fixture("hostile").join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(hostile(name)).unwrap()
}

#[test]
fn decompression_bombs_are_refused_from_the_header() {
    for (name, needle) in [
        (
            "bomb_30000x30000_1bit.png",
            "= 900000000 pixels, over the limit of 64000000",
        ),
        ("bomb_rgba16_header.png", "over the limit"),
        (
            "over_budget_8001x8000.png",
            "8001×8000 = 64008000 pixels, over the limit",
        ),
        ("bomb_30000x30000.tiff", "over the limit"),
        ("bomb_30000x30000_rle8.bmp", "over the limit"),
        ("bomb_30000x30000.jpg", "over the limit"),
        ("zero_size.png", ""),
    ] {
        let bytes = read(name);
        let started = std::time::Instant::now();
        let e = decode_image(&bytes).unwrap_err().to_string();
        assert!(e.contains(needle), "{name}: {e}");
        assert!(!e.contains('\n'), "{name}: {e}");
        assert!(decode_mask(&bytes).is_err(), "{name}");
        // Refused from the header, not after decoding (a bomb decodes for over a minute).
        assert!(
            started.elapsed().as_secs() < 5,
            "{name} took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn images_within_the_budget_decode_and_the_budget_is_adjustable() {
    // 8000×8000 is exactly 64 megapixels: allowed. The budget itself is global to the
    // process, so this test only reads it.
    assert_eq!(
        vlsm::preprocess::max_pixels(),
        vlsm::preprocess::DEFAULT_MAX_PIXELS
    );
    let mut png = Vec::new();
    image::GrayImage::new(8000, 8000)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let img = decode_image(&png).unwrap();
    assert_eq!((img.width(), img.height()), (8000, 8000));
    assert!(vlsm::preprocess::set_max_pixels(0).is_err());
    assert!(vlsm::preprocess::set_max_pixels(1 << 40).is_err());
}

#[test]
fn pickles_naming_other_globals_are_refused_by_name() {
    for (name, needle) in [
        ("evil_os_system.bin", "refuses pickle global posix.system"),
        ("evil_eval.bin", "refuses pickle global __builtin__.eval"),
        ("evil_inst_protocol0.bin", "refuses pickle global os.system"),
        (
            "evil_global_protocol2.bin",
            "refuses pickle global posix.system",
        ),
    ] {
        let e = Weights::from_pytorch_file(&hostile(name))
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted"))
            .to_string();
        assert!(e.contains(needle), "{name}: {e}");
    }
}

#[test]
fn state_dicts_in_every_protocol_and_the_legacy_container_load() {
    for name in [
        "ok_protocol1.bin",
        "ok_protocol2.bin",
        "ok_protocol3.bin",
        "ok_protocol4.bin",
        "ok_protocol5.bin",
        "ok_legacy.bin",
    ] {
        let w =
            Weights::from_pytorch_file(&hostile(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            w.read_f32("w", &[2, 3]).unwrap(),
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            "{name}"
        );
    }
}

#[test]
fn broken_safetensors_are_refused_with_the_problem_named() {
    for (name, needle) in [
        ("st_overflow_shape.safetensors", "overflow"),
        ("st_shifted_offsets.safetensors", "offset"),
        ("st_overlap.safetensors", "offset"),
        ("st_truncated.safetensors", "truncated"),
        ("st_header_past_end.safetensors", "header"),
    ] {
        let path = hostile(name);
        let e = Weights::from_safetensors_file(&path)
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted (file)"))
            .to_string();
        assert!(e.to_lowercase().contains(needle), "{name}: {e}");
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            Weights::from_safetensors(&bytes, name).is_err(),
            "{name} was accepted (bytes)"
        );
    }
}

#[test]
fn a_needed_tensor_of_integer_type_is_named_as_such() {
    let data = vec![0u8; 24];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2, 3], &data).unwrap();
    let bytes = safetensors::serialize([("w", view)], None).unwrap();
    let w = Weights::from_safetensors(&bytes, "t").unwrap();
    let e = w.read_f32("w", &[2, 3]).unwrap_err().to_string();
    assert!(e.contains("`w` is stored as I32"), "{e}");
}

/// A small deterministic PRNG (xorshift64*), so a failing mutation can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One mutation of `input`: flipped bits, overwritten bytes with interesting values,
/// inserted or deleted runs, or a truncation.
fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if out.is_empty() {
            out.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(out.len());
        match rng.below(6) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = [0x00, 0xff, 0x7f, 0x80, 0x01][rng.below(5)],
            2 => {
                let v = [u32::MAX, 0x7fff_ffff, 30000, 0, 1 << 20][rng.below(5)];
                let end = (at + 4).min(out.len());
                out[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
            }
            3 => {
                let n = 1 + rng.below(16);
                let byte = rng.next() as u8;
                out.splice(at..at, std::iter::repeat_n(byte, n));
            }
            4 => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            _ => out.truncate(at),
        }
    }
    out
}

fn iterations(default: usize) -> usize {
    std::env::var("VLSM_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `check` on `iterations` mutations of each seed; a panic fails with the seed and the
/// iteration, so it can be replayed.
fn fuzz(label: &str, seeds: &[Vec<u8>], default: usize, check: impl Fn(&[u8])) {
    let n = iterations(default);
    for (s, seed) in seeds.iter().enumerate() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (s as u64 + 1));
        for i in 0..n {
            let input = mutate(seed, &mut rng);
            if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
                let path = std::env::temp_dir().join(format!("vlsm-fuzz-{label}-{s}-{i}"));
                let _ = std::fs::write(&path, &input);
                panic!(
                    "{label}: seed {s}, iteration {i} panicked (input saved to {})",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn mutated_images_never_panic() {
    let mut seeds: Vec<Vec<u8>> = ["rgb_53x37.png", "grey16_60x60.png", "palette_110x75.png"]
        .iter()
        .map(|n| std::fs::read(fixture("images").join(n)).unwrap())
        .collect();
    let rgb = image::open(fixture("images/rgb_53x37.png")).unwrap();
    for format in [
        image::ImageFormat::Jpeg,
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
        image::ImageFormat::WebP,
    ] {
        let mut bytes = Vec::new();
        rgb.write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        seeds.push(bytes);
    }
    for name in [
        "bomb_30000x30000.tiff",
        "bomb_30000x30000_rle8.bmp",
        "bomb_30000x30000.jpg",
    ] {
        seeds.push(read(name));
    }
    fuzz("image", &seeds, 1000, |b| {
        let _ = decode_image(b);
    });
}

#[test]
fn mutated_safetensors_never_panic_and_never_read_out_of_bounds() {
    let bytes = vlsm::weights::write_safetensors(
        &[
            ("a".into(), vec![2, 3], vec![1.0; 6]),
            ("b".into(), vec![4], vec![2.0; 4]),
        ],
        vlsm::weights::Storage::F32,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    fuzz("safetensors", &[bytes], 2000, |b| {
        if let Ok(w) = Weights::from_safetensors(b, "fuzz") {
            for key in w.keys().map(str::to_string).collect::<Vec<_>>() {
                let shape = w.shape(&key).unwrap().to_vec();
                let _ = w.read_f32(&key, &shape);
            }
        }
        std::fs::write(&path, b).unwrap();
        if let Ok(w) = Weights::from_safetensors_file(&path) {
            for key in w.keys().map(str::to_string).collect::<Vec<_>>() {
                let shape = w.shape(&key).unwrap().to_vec();
                let _ = w.read_f32(&key, &shape);
            }
        }
    });
}

#[test]
fn mutated_pickles_never_panic() {
    let seeds: Vec<Vec<u8>> = [
        "ok_protocol2.bin",
        "ok_protocol5.bin",
        "ok_legacy.bin",
        "evil_inst_protocol0.bin",
    ]
    .iter()
    .map(|n| read(n))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.bin");
    fuzz("pickle", &seeds, 1000, |b| {
        std::fs::write(&path, b).unwrap();
        if let Ok(w) = Weights::from_pytorch_file(&path) {
            for key in w.keys().map(str::to_string).collect::<Vec<_>>() {
                let shape = w.shape(&key).unwrap().to_vec();
                let _ = w.read_f32(&key, &shape);
            }
        }
        // The data.pkl inside the ZIP, mutated on its own (the ZIP's CRC would refuse
        // most mutations of the archive before the pickle is read).
        let _ = vlsm::pickle_guard::scan(&mut std::io::Cursor::new(b));
    });
}

#[test]
fn mutated_share_links_never_panic() {
    let png = std::fs::read(fixture("images/rgb_53x37.png")).unwrap();
    let rgb = vlsm::preprocess::decode_rgb(&png).unwrap();
    let state = vlsm::share::ShareState {
        weights_url: "https://huggingface.co/CIDAS/clipseg-rd64-refined/resolve/main/".into(),
        weights_sha256: Some("ab".repeat(32)),
        model: Some("clipseg".into()),
        prompts: vec!["a polyp".into(), "a red lesion".into()],
        threshold: 0.5,
        view: vlsm::share::ViewSettings {
            opacity: 0.5,
            selected: 0,
        },
        image: vlsm::share::ImageSource::Embedded {
            name: "x.png".into(),
            png: vlsm::share::embeddable_png(&rgb).unwrap().unwrap(),
        },
        image_sha256: vlsm::share::pixels_sha256(&rgb),
        // Mask records, so their fields are mutated too.
        masks: [0.3f32, -0.2]
            .iter()
            .map(|&bias| {
                let logits = vlsm::Logits {
                    size: 8,
                    values: (0..64).map(|i| i as f32 / 64.0 - 0.5 + bias).collect(),
                };
                vlsm::mask_check::MaskCheck::of(&logits, 0.5, 53, 37)
            })
            .collect(),
        margin: vlsm::mask_check::BORDERLINE_MARGIN,
        clinical: None,
    };
    let link = state.to_link("http://127.0.0.1:8080/").unwrap();
    assert!(vlsm::share::ShareState::from_link(&link).is_ok());
    fuzz("link", &[link.into_bytes()], 2000, |b| {
        if let Ok(s) = vlsm::share::ShareState::from_link(&String::from_utf8_lossy(b))
            && let vlsm::share::ImageSource::Embedded { png, .. } = &s.image
        {
            let _ = vlsm::preprocess::decode_rgb(png);
        }
    });
}

#[test]
fn mutated_annotations_and_configs_never_panic() {
    let anns = br#"[{"img_name":"a.png","mask_name":"a.png","bbox":[[1,2,3,4]],
        "prompts":{"p0":"","p1":"polyp","p2":["a polyp","one polyp"]},
        "sentences":[{"sent":"x"}]}]"#
        .to_vec();
    let config = std::fs::read(fixture("clipseg_simple/config.json")).unwrap();
    let pre = std::fs::read(fixture("clipseg_simple/preprocessor_config.json")).unwrap();
    fuzz("annotations", &[anns], 2000, |b| {
        let _ = vlsm::dataset::parse_annotations(b, "fuzz");
    });
    fuzz("config", &[config, pre], 2000, |b| {
        if let Ok(c) = vlsm::ClipSegConfig::from_json(b) {
            let _ = vlsm::PreprocessConfig::from_json(b, &c.vision_config);
        }
        let _ = vlsm::PreprocessConfig::from_json(b, &vlsm::config::VisionConfig::default());
    });
}

#[test]
fn impossible_sizes_in_configs_are_refused_with_the_limit() {
    let pre = |size: usize| format!(r#"{{"size": {size}}}"#);
    let vision = vlsm::config::VisionConfig {
        patch_size: 16,
        ..Default::default()
    };
    for size in [999_999_984usize, 8192] {
        let e = vlsm::PreprocessConfig::from_json(pre(size).as_bytes(), &vision)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too large") && e.contains("768"), "{e}");
    }
    vlsm::PreprocessConfig::from_json(pre(352).as_bytes(), &vision).unwrap();
    let config = std::fs::read_to_string(fixture("clipseg_simple/config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    for (tower, field, value) in [
        ("vision_config", "num_hidden_layers", 100_000u64),
        ("vision_config", "image_size", 1 << 20),
        ("text_config", "vocab_size", 1 << 40),
        ("text_config", "max_position_embeddings", 1 << 30),
        ("text_config", "num_attention_heads", 1 << 20),
    ] {
        let mut j = json.clone();
        j[tower][field] = value.into();
        let e = vlsm::ClipSegConfig::from_json(j.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(field) || e.contains("too large"),
            "{tower}.{field}: {e}"
        );
    }
    json["vision_config"]["num_channels"] = 1.into();
    assert!(vlsm::ClipSegConfig::from_json(json.to_string().as_bytes()).is_err());
}
