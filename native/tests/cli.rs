//! `vlsm segment` and `vlsm convert` end to end: parity with transformers through the CLI,
//! output files, the hub path against a local server, and clear errors on bad input.

mod common;

use std::path::Path;
use std::time::Instant;

use common::*;

const TOL: f32 = 1e-4;

fn prompts_of(model: &str) -> Vec<String> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("manifest.json")).unwrap()).unwrap();
    manifest["models"][model]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn segment_args<'a>(
    image: &'a str,
    prompts: &'a [String],
    weights: &'a str,
    out: &'a str,
) -> Vec<&'a str> {
    let mut args = vec!["segment", image, "--weights", weights, "--out", out];
    for p in prompts {
        args.push("--prompt");
        args.push(p);
    }
    args
}

#[test]
fn segment_reproduces_reference_logits_and_writes_masks() {
    let tmp = tempfile::tempdir().unwrap();
    for model in ["clipseg_refined", "clipseg_simple"] {
        let prompts = prompts_of(model);
        let image = fixture("images/rgb_150x100.png");
        let out_dir = tmp.path().join(model);
        let npy = tmp.path().join(format!("{model}.npy"));
        let weights = fixture(model);
        let mut args = segment_args(
            image.to_str().unwrap(),
            &prompts,
            weights.to_str().unwrap(),
            out_dir.to_str().unwrap(),
        );
        args.extend(["--save-logits", npy.to_str().unwrap()]);
        let out = vlsm(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let (shape, logits) = read_npy(&npy);
        let s = if model == "clipseg_refined" { 96 } else { 64 };
        assert_eq!(shape, [prompts.len(), s, s]);
        let expected = reference(&fixture(model).join("reference.safetensors"), "logits.0");
        let d = max_abs_diff(&logits, &expected);
        assert!(d <= TOL, "{model}: max |Δlogit| {d:e}");
        // One mask and one overlay per prompt, at the image's own size, binary.
        let masks: Vec<_> = std::fs::read_dir(out_dir.join("rgb_150x100"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".mask.png"))
            .collect();
        assert_eq!(masks.len(), prompts.len());
        for m in &masks {
            let mask = image::open(m).unwrap().to_luma8();
            assert_eq!(mask.dimensions(), (150, 100));
            assert!(mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
            let overlay = m.to_string_lossy().replace(".mask.png", ".overlay.png");
            assert_eq!(
                image::open(&overlay).unwrap().to_rgb8().dimensions(),
                (150, 100)
            );
        }
        assert!(stdout(&out).contains(".mask.png"));
    }
}

#[test]
fn several_images_give_n_by_p_logits_and_masks_follow_the_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("l.npy");
    let (a, b) = (
        fixture("images/rgb_150x100.png"),
        fixture("images/rgb_53x37.png"),
    );
    let run = |t: &str, out: &str| {
        vlsm(
            &[
                "segment",
                a.to_str().unwrap(),
                b.to_str().unwrap(),
                "-p",
                "polyp",
                "-p",
                "",
                "--weights",
                fixture("clipseg_refined").to_str().unwrap(),
                "--out",
                tmp.path().join(out).to_str().unwrap(),
                "--threshold",
                t,
                "--save-logits",
                npy.to_str().unwrap(),
            ],
            &[],
        )
    };
    let out = run("0.5", "o5");
    assert!(out.status.success(), "{}", stderr(&out));
    let (shape, logits) = read_npy(&npy);
    assert_eq!(shape, [2, 2, 96, 96]);
    let expected = reference(
        &fixture("clipseg_refined/reference.safetensors"),
        "logits.1",
    );
    // Image 2 ("rgb_53x37"), prompt "polyp" (reference prompt 0) and "" (reference prompt 2).
    let n = 96 * 96;
    assert!(max_abs_diff(&logits[2 * n..3 * n], &expected[..n]) <= TOL);
    assert!(max_abs_diff(&logits[3 * n..4 * n], &expected[2 * n..3 * n]) <= TOL);
    // A higher threshold never adds foreground.
    let out = run("0.9", "o9");
    assert!(out.status.success());
    let fg = |dir: &str| {
        let m = image::open(tmp.path().join(dir).join("rgb_150x100/00_polyp.mask.png"))
            .unwrap()
            .to_luma8();
        m.pixels().filter(|p| p.0[0] == 255).count()
    };
    assert!(fg("o9") <= fg("o5"));
}

#[test]
fn pytorch_bin_weights_and_converted_safetensors_give_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let image = fixture("images/rgb_53x37.png");
    let logits_of = |weights: &Path, name: &str| {
        let npy = tmp.path().join(format!("{name}.npy"));
        let out = vlsm(
            &[
                "segment",
                image.to_str().unwrap(),
                "-p",
                "polyp",
                "--weights",
                weights.to_str().unwrap(),
                "--out",
                tmp.path().join(name).to_str().unwrap(),
                "--save-logits",
                npy.to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        read_npy(&npy).1
    };
    let from_safetensors = logits_of(&fixture("clipseg_simple"), "st");
    let from_bin = logits_of(&fixture("clipseg_simple_bin"), "bin");
    assert_eq!(from_safetensors, from_bin);

    let converted = tmp.path().join("converted");
    let out = vlsm(
        &[
            "convert",
            fixture("clipseg_simple_bin").to_str().unwrap(),
            converted.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        converted.join("model.safetensors").is_file() && converted.join("vocab.json").is_file()
    );
    assert_eq!(logits_of(&converted, "conv"), from_bin);

    let half = tmp.path().join("half");
    let out = vlsm(
        &[
            "convert",
            fixture("clipseg_simple").to_str().unwrap(),
            half.to_str().unwrap(),
            "--fp16",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let f32_size = std::fs::metadata(fixture("clipseg_simple/model.safetensors"))
        .unwrap()
        .len();
    let f16_size = std::fs::metadata(half.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(f16_size < f32_size * 6 / 10, "{f16_size} vs {f32_size}");
    let from_half = logits_of(&half, "half");
    let scale = from_bin.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_abs_diff(&from_half, &from_bin);
    assert!(
        d > 0.0 && d < 0.02 * scale,
        "fp16 logits differ by {d} (scale {scale})"
    );
}

#[test]
fn model_from_the_hub_is_fetched_cached_and_equal_to_local_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = serve_hub(vec![(
        "tiny/clipseg".into(),
        copy_model("clipseg_refined", tmp.path()),
    )]);
    let home = tmp.path().join("hf-home");
    let image = fixture("images/rgb_150x100.png");
    let run = |args: &[&str], endpoint: &str| {
        vlsm(
            args,
            &[
                ("HF_ENDPOINT", endpoint),
                ("HF_HOME", home.to_str().unwrap()),
            ],
        )
    };
    let npy = tmp.path().join("hub.npy");
    let out_dir = tmp.path().join("out");
    let args = [
        "segment",
        image.to_str().unwrap(),
        "-p",
        "polyp",
        "--model",
        "tiny/clipseg",
        "--out",
        out_dir.to_str().unwrap(),
        "--save-logits",
        npy.to_str().unwrap(),
    ];
    let out = run(&args, &endpoint);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = reference(
        &fixture("clipseg_refined/reference.safetensors"),
        "logits.0",
    );
    assert!(max_abs_diff(&read_npy(&npy).1, &expected[..96 * 96]) <= TOL);
    // Cached: works with the hub unreachable.
    let out = run(&args, "http://127.0.0.1:9");
    assert!(out.status.success(), "cache not used: {}", stderr(&out));
    // An id the hub does not have.
    let out = run(
        &[
            "segment",
            image.to_str().unwrap(),
            "-p",
            "polyp",
            "--model",
            "nobody/nothing",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &endpoint,
    );
    assert_clean_error(&out, "unknown model id");
}

#[test]
fn hub_unreachable_fails_at_once_suggesting_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = vlsm(
        &[
            "segment",
            fixture("images/rgb_64x64.png").to_str().unwrap(),
            "-p",
            "polyp",
            "--model",
            "CIDAS/clipseg-rd64-refined",
        ],
        &[
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ("HF_HOME", tmp.path().to_str().unwrap()),
        ],
    );
    assert_clean_error(&out, "--weights");
    assert!(start.elapsed().as_secs() < 20, "took {:?}", start.elapsed());
}

/// Damages a copy of the refined fixture and expects a one-line error naming `needle`.
fn broken_model(tmp: &Path, name: &str, damage: impl FnOnce(&Path), needle: &str) {
    let dir = copy_model("clipseg_refined", &tmp.join(name));
    damage(&dir);
    let out = vlsm(
        &[
            "segment",
            fixture("images/rgb_64x64.png").to_str().unwrap(),
            "-p",
            "polyp",
            "--weights",
            dir.to_str().unwrap(),
            "--out",
            tmp.join("o").to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, needle);
}

fn edit_safetensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn bad_weights_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    broken_model(
        t,
        "corrupt",
        |d| std::fs::write(d.join("model.safetensors"), b"\x00\x01garbage").unwrap(),
        "not a valid safetensors",
    );
    broken_model(
        t,
        "truncated",
        |d| {
            let p = d.join("model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        },
        "safetensors",
    );
    broken_model(
        t,
        "missing-key",
        |d| {
            edit_safetensors(d, |ts| {
                ts.retain(|(n, _, _)| n != "decoder.film_mul.weight")
            })
        },
        "missing weight `decoder.film_mul.weight`",
    );
    broken_model(
        t,
        "extra-key",
        |d| {
            edit_safetensors(d, |ts| {
                ts.push((
                    "decoder.layers.7.mlp.fc1.weight".into(),
                    vec![2],
                    vec![0; 8],
                ))
            })
        },
        "unexpected weight `decoder.layers.7.mlp.fc1.weight`",
    );
    broken_model(
        t,
        "shape",
        |d| {
            // The simple fixture's weights under the refined fixture's config.
            std::fs::copy(
                fixture("clipseg_simple/model.safetensors"),
                d.join("model.safetensors"),
            )
            .unwrap();
        },
        "has shape",
    );
    broken_model(
        t,
        "no-tokenizer",
        |d| {
            std::fs::remove_file(d.join("vocab.json")).unwrap();
            std::fs::remove_file(d.join("merges.txt")).unwrap();
        },
        "tokenizer",
    );
    broken_model(
        t,
        "bad-config",
        |d| std::fs::write(d.join("config.json"), b"{\"vision_config\": 3").unwrap(),
        "config",
    );
    broken_model(
        t,
        "inconsistent-config",
        |d| {
            let c = std::fs::read_to_string(d.join("config.json"))
                .unwrap()
                .replace("\"reduce_dim\": 12", "\"reduce_dim\": 13");
            std::fs::write(d.join("config.json"), c).unwrap();
        },
        "reduce_dim",
    );
    broken_model(
        t,
        "no-weights",
        |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
        "no weights",
    );
    broken_model(
        t,
        "bad-bin",
        |d| {
            std::fs::remove_file(d.join("model.safetensors")).unwrap();
            std::fs::write(d.join("pytorch_model.bin"), b"PK\x03\x04 not really").unwrap();
        },
        "pytorch",
    );
    // An empty directory, and a path that does not exist.
    let empty = t.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for dir in [empty.clone(), t.join("does-not-exist")] {
        let out = vlsm(
            &[
                "segment",
                fixture("images/rgb_64x64.png").to_str().unwrap(),
                "-p",
                "x",
                "--weights",
                dir.to_str().unwrap(),
            ],
            &[],
        );
        assert_clean_error(&out, &dir.file_name().unwrap().to_string_lossy());
    }
}

fn segment_image(image: &Path, out: &Path) -> std::process::Output {
    vlsm(
        &[
            "segment",
            image.to_str().unwrap(),
            "-p",
            "polyp",
            "--weights",
            fixture("clipseg_simple").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    )
}

#[test]
fn bad_images_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let png = std::fs::read(fixture("images/rgb_150x100.png")).unwrap();
    let mut jpeg = Vec::new();
    image::open(fixture("images/rgb_150x100.png"))
        .unwrap()
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("zero.png", vec![], "empty"),
        ("truncated.png", png[..png.len() / 3].to_vec(), "png"),
        ("truncated.jpg", jpeg[..jpeg.len() / 3].to_vec(), "jpeg"),
        (
            "text.png",
            b"this is not an image at all".to_vec(),
            "unsupported",
        ),
        ("header-only.png", png[..16].to_vec(), "png"),
    ];
    for (name, bytes, needle) in cases {
        let path = t.join(name);
        std::fs::write(&path, bytes).unwrap();
        assert_clean_error(&segment_image(&path, &t.join("o")), needle);
        assert_clean_error(&segment_image(&path, &t.join("o")), name);
    }
    assert_clean_error(
        &segment_image(&t.join("missing.png"), &t.join("o")),
        "missing.png",
    );
    let empty = t.join("empty-folder");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_error(&segment_image(&empty, &t.join("o")), "no image files");
    // Over the 64-megapixel budget: refused from the header.
    let wide = t.join("wide.png");
    image::GrayImage::new(64_001, 1000).save(&wide).unwrap();
    assert_clean_error(
        &segment_image(&wide, &t.join("o")),
        "= 64001000 pixels, over the limit of 64000000 (--max-pixels raises it)",
    );
}

#[test]
fn odd_but_valid_images_and_prompts_work() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // A PNG named .jpg: the content decides, not the name.
    let mislabelled = t.join("actually-png.jpg");
    std::fs::copy(fixture("images/rgb_150x100.png"), &mislabelled).unwrap();
    let mut jpeg_file = t.join("photo.jpg");
    image::open(fixture("images/rgb_150x100.png"))
        .unwrap()
        .save(&jpeg_file)
        .unwrap();
    let webp = t.join("img.webp");
    image::open(fixture("images/rgb_53x37.png"))
        .unwrap()
        .save(&webp)
        .unwrap();
    let bmp = t.join("img.bmp");
    image::open(fixture("images/rgb_53x37.png"))
        .unwrap()
        .save(&bmp)
        .unwrap();
    let tiff = t.join("img.tiff");
    image::open(fixture("images/grey16_60x60.png"))
        .unwrap()
        .save(&tiff)
        .unwrap();
    for img in [
        mislabelled.clone(),
        jpeg_file.clone(),
        webp,
        bmp,
        tiff,
        fixture("images/grey16_60x60.png"),
        fixture("images/palette_110x75.png"),
        fixture("images/rgba_70x80.png"),
        fixture("images/grey_120x90.png"),
    ] {
        let out = segment_image(&img, &t.join("o"));
        assert!(out.status.success(), "{}: {}", img.display(), stderr(&out));
    }
    // A 10000×10000 image, with the pixel budget raised to 100 megapixels: decoded,
    // resized, masks written at full size.
    let huge = t.join("huge.png");
    image::GrayImage::from_fn(10_000, 10_000, |x, y| {
        image::Luma([((x / 100 + y / 100) % 2 * 200) as u8])
    })
    .save(&huge)
    .unwrap();
    let out = vlsm(
        &[
            "segment",
            huge.to_str().unwrap(),
            "-p",
            "polyp",
            "--weights",
            fixture("clipseg_simple").to_str().unwrap(),
            "--out",
            t.join("big").to_str().unwrap(),
            "--max-pixels",
            "100000000",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mask = image::open(t.join("big/huge/00_polyp.mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (10_000, 10_000));
    // Empty and 5000-character prompts: valid, the long one truncated with a warning.
    jpeg_file = fixture("images/rgb_64x64.png");
    let long = "polyp ".repeat(834);
    let out = vlsm(
        &[
            "segment",
            jpeg_file.to_str().unwrap(),
            "-p",
            "",
            "-p",
            &long,
            "--weights",
            fixture("clipseg_simple").to_str().unwrap(),
            "--out",
            t.join("p").to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("truncated"), "{}", stderr(&out));
    assert!(t.join("p/rgb_64x64/00_empty.mask.png").is_file());
}

#[test]
fn bad_arguments_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let img = fixture("images/rgb_64x64.png");
    let img = img.to_str().unwrap();
    let w = fixture("clipseg_simple");
    let w = w.to_str().unwrap();
    // `vlsm` alone lists the commands (a usage error); a typo gets clap's suggestion.
    let out = vlsm(&[], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("Commands:") && stderr(&out).contains("segment"),
        "{}",
        stderr(&out)
    );
    assert_clean_error(
        &vlsm(&["segmnt"], &[]),
        "a similar subcommand exists: 'segment'",
    );
    assert_clean_error(
        &vlsm(&["segment", img, "--promt", "x"], &[]),
        "a similar argument exists: '--prompt'",
    );
    let help = stdout(&vlsm(&["train", "--help"], &[]));
    for option in ["--epochs", "--batch-size", "--lr"] {
        let line = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(option))
            .nth(1)
            .unwrap_or("");
        assert!(
            !line.trim().is_empty() && !line.trim().starts_with("--"),
            "{option}: {help}"
        );
    }
    assert!(help.contains("CIDAS/clipseg-rd64-refined"), "{help}");
    for t in ["1.5", "-0.1", "abc", "nan"] {
        let arg = format!("--threshold={t}");
        assert_clean_error(
            &vlsm(&["segment", img, "-p", "x", "--weights", w, &arg], &[]),
            "threshold",
        );
    }
    assert_clean_error(&vlsm(&["segment", img, "--weights", w], &[]), "--prompt");
    assert_clean_error(&vlsm(&["segment", "-p", "x", "--weights", w], &[]), "IMAGE");
    assert_clean_error(
        &vlsm(
            &["segment", img, "-p", "x", "--weights", w, "--model", "a/b"],
            &[],
        ),
        "--model",
    );
    // Backends this build was compiled without.
    let unbuilt = [
        ("wgpu", cfg!(feature = "wgpu")),
        ("cuda", cfg!(feature = "cuda")),
    ];
    for (backend, _) in unbuilt.iter().filter(|(_, built)| !built) {
        let out = vlsm(
            &[
                "segment",
                img,
                "-p",
                "x",
                "--weights",
                w,
                "--backend",
                backend,
            ],
            &[],
        );
        assert_clean_error(&out, backend);
    }
    // The output directory is a file.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert_clean_error(
        &vlsm(
            &[
                "segment",
                img,
                "-p",
                "x",
                "--weights",
                w,
                "--out",
                file.to_str().unwrap(),
            ],
            &[],
        ),
        "file",
    );
    assert_clean_error(&vlsm(&["convert", w, w], &[]), "differ");
    assert_clean_error(&vlsm(&["frobnicate"], &[]), "frobnicate");
}

#[test]
fn a_folder_is_segmented_recursively_and_a_bad_image_is_skipped_not_fatal() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = t.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::copy(fixture("images/rgb_53x37.png"), data.join("a.png")).unwrap();
    std::fs::copy(fixture("images/rgb_150x100.png"), data.join("sub/b.png")).unwrap();
    std::fs::write(data.join("sub/broken.png"), b"not an image").unwrap();
    std::fs::write(data.join("notes.txt"), b"not looked at").unwrap();
    let logits = t.join("new/dir/logits.npy");
    let out = vlsm(
        &[
            "segment",
            data.to_str().unwrap(),
            "-p",
            "polyp",
            "--weights",
            fixture("clipseg_simple").to_str().unwrap(),
            "--out",
            t.join("o").to_str().unwrap(),
            "--save-logits",
            logits.to_str().unwrap(),
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("warning: skipped") && err.contains("broken.png"),
        "{err}"
    );
    assert!(
        err.lines()
            .last()
            .unwrap()
            .starts_with("error: 1 of 3 images were skipped"),
        "{err}"
    );
    assert!(t.join("o/a/00_polyp.mask.png").is_file());
    assert!(t.join("o/sub/b/00_polyp.mask.png").is_file());
    // The logits of the two segmented images, in a folder that did not exist.
    let (shape, _) = read_npy(&logits);
    assert_eq!(shape[..2], [2, 1]);
    // --glob picks files by their path below the folder.
    let out = vlsm(
        &[
            "segment",
            data.to_str().unwrap(),
            "--glob",
            "sub/b.*",
            "-p",
            "polyp",
            "--weights",
            fixture("clipseg_simple").to_str().unwrap(),
            "--out",
            t.join("g").to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(t.join("g/sub/b/00_polyp.mask.png").is_file());
    assert!(!t.join("g/a").exists());
}

/// `segment --batch-size` encodes several images in one pass with the same logits as one at
/// a time; `--precision bf16` runs (or falls back to f32 with a warning where the CPU
/// lacks AVX-512 BF16) and its logits stay close to f32's.
#[test]
fn batched_and_bf16_segmentation() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for f in ["rgb_150x100.png", "palette_110x75.png", "grey_120x90.png"] {
        std::fs::copy(fixture("images").join(f), images.join(f)).unwrap();
    }
    let weights = fixture("clipseg_refined");
    let logits = |name: &str, extra: &[&str]| -> Vec<f32> {
        let npy = tmp.path().join(format!("{name}.npy"));
        let mut args = vec![
            "segment",
            s(&images),
            "--prompt",
            "polyp",
            "--prompt",
            "a round pink polyp",
            "--weights",
            s(&weights),
            "--out",
            s(tmp.path()),
            "--save-logits",
            s(&npy),
        ];
        args.extend(extra);
        let out = vlsm(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let bytes = std::fs::read(&npy).unwrap();
        // The .npy header is padded to a multiple of 64 bytes; then float32 values.
        let header = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        bytes[header..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let one = logits("one", &[]);
    let batched = logits("batched", &["--batch-size", "3"]);
    assert!(
        !one.is_empty() && one.len() % 6 == 0,
        "3 images × 2 prompts"
    );
    assert_eq!(one, batched, "batch of 3 vs one at a time");
    let bf16 = logits("bf16", &["--precision", "bf16", "--batch-size", "2"]);
    let bf16_one = logits("bf16-one", &["--precision", "bf16"]);
    assert_eq!(bf16, bf16_one, "bf16: batch of 2 vs one at a time");
    let range = one.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_diff = one
        .iter()
        .zip(&bf16)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if vlsm::gemm_bf16::available() {
        assert!(max_diff > 0.0, "bf16 gave f32's logits: it did not run");
    }
    assert!(
        max_diff < 0.03 * range,
        "bf16 moved logits by {max_diff} of {range}"
    );
}

#[test]
fn dicom_frames_segment_at_their_size_named_by_sop_instance_uid() {
    let tmp = tempfile::tempdir().unwrap();
    let dicom = fixture("dicom");
    // A folder of DICOM files: every frame of every readable file, each its own output.
    let folder = tmp.path().join("series");
    std::fs::create_dir_all(&folder).unwrap();
    for name in ["ct_explicit.dcm", "multiframe_rle.dcm", "rgb.dcm"] {
        std::fs::copy(dicom.join(name), folder.join(name)).unwrap();
    }
    let out_dir = tmp.path().join("out");
    let model = fixture("clipseg_simple");
    let args = [
        "segment",
        folder.to_str().unwrap(),
        "--weights",
        model.to_str().unwrap(),
        "--prompt",
        "a lesion",
        "--window",
        "abdomen",
        "--out",
        out_dir.to_str().unwrap(),
    ];
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dicom.join("reference.json")).unwrap()).unwrap();
    let uid = |name: &str| {
        reference[name]["sop_instance_uid"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut expected = vec![uid("ct_explicit"), uid("rgb")];
    expected.extend((0..3).map(|f| format!("{}_f{f:03}", uid("multiframe_rle"))));
    expected.sort();
    // Folders of masks, beside a SEG file per input (tested below).
    let mut folders: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|name| !name.ends_with(".seg.dcm"))
        .collect();
    folders.sort();
    assert_eq!(folders, expected);
    for folder in &folders {
        let mask = image::open(out_dir.join(folder).join("00_a-lesion.mask.png")).unwrap();
        assert_eq!(
            (mask.width(), mask.height()),
            (40, 32),
            "the DICOM's columns × rows"
        );
    }
    // An unsupported transfer syntax and a cut file: one line each, exit non-zero.
    let out = vlsm(
        &[
            "segment",
            dicom.join("jpegls_unsupported.dcm").to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
            "--prompt",
            "a lesion",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "unsupported transfer syntax JPEG-LS");
    let out = vlsm(
        &[
            "segment",
            dicom.join("truncated.dcm").to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
            "--prompt",
            "a lesion",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "DICOM");
    let mut bad_window = args.to_vec();
    bad_window[7] = "liver";
    assert_clean_error(&vlsm(&bad_window, &[]), "preset");
}

#[test]
fn nifti_slices_segment_and_make_label_volumes_over_the_input_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let volume_path = fixture("nifti").join("volume.nii.gz");
    let out_dir = tmp.path().join("out");
    let model = fixture("clipseg_simple");
    let args = [
        "segment",
        volume_path.to_str().unwrap(),
        "--weights",
        model.to_str().unwrap(),
        "--prompt",
        "a lesion",
        "--slices",
        "axial:2-4",
        "--out",
        out_dir.to_str().unwrap(),
    ];
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let input = vlsm::nifti::read(&std::fs::read(&volume_path).unwrap()).unwrap();
    let labels =
        vlsm::nifti::read(&std::fs::read(out_dir.join("volume/00_a-lesion.mask.nii.gz")).unwrap())
            .unwrap();
    assert_eq!((labels.dims, labels.affine), (input.dims, input.affine));
    let plane = vlsm::nifti::Plane::Axial;
    let (w, h) = input.slice_size(plane);
    for k in 0..input.slices(plane) {
        let slice = labels.slice_values(plane, k);
        let labelled = slice.iter().filter(|&&v| v == 1.0).count();
        if !(2..=4).contains(&k) {
            assert_eq!(labelled, 0, "slice {k} was not segmented");
            continue;
        }
        // The slice's PNG mask is the label volume's slice, pixel for pixel.
        let mask = image::open(out_dir.join(format!("volume_axial_{k:03}/00_a-lesion.mask.png")))
            .unwrap()
            .to_luma8();
        assert_eq!((mask.width() as usize, mask.height() as usize), (w, h));
        let from_png: Vec<f64> = mask
            .pixels()
            .map(|p| f64::from(u8::from(p[0] > 0)))
            .collect();
        assert_eq!(from_png, slice, "slice {k}");
    }
    let mut bad = args.to_vec();
    bad[7] = "axial:2-99";
    assert_clean_error(&vlsm(&bad, &[]), "16 axial slices");
    bad[7] = "oblique";
    assert_clean_error(&vlsm(&bad, &[]), "axial, coronal or sagittal");
}

/// `vlsm share` of a NIfTI slice or DICOM frame records which picture and window; the link
/// reproduces the masks `vlsm segment` makes of that picture, from the embedded picture or
/// (omitted) from the file itself, and a link naming a slice the file lacks is one line.
#[test]
fn links_of_clinical_pictures_reproduce_the_segment_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("clipseg_simple");
    let model = model.to_str().unwrap();
    let cases = [
        (
            fixture("nifti").join("volume.nii.gz"),
            "axial:3",
            "axial:3-3",
            "volume_axial_003",
        ),
        (fixture("dicom").join("multiframe_rle.dcm"), "1", "", ""),
    ];
    for (file, slice, slices, segment_name) in cases {
        let path = file.to_str().unwrap();
        let out = vlsm(
            &[
                "share",
                path,
                "--slice",
                slice,
                "--window",
                "40,400",
                "--prompt",
                "a lesion",
                "--weights-url",
                "http://127.0.0.1:9/m",
                "--weights",
                model,
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let link = stdout(&out).trim().to_string();
        let state = vlsm::share::ShareState::from_link(&link).unwrap();
        let view = state.clinical.expect("the link names the picture");
        assert_eq!(view.slice.to_string(), slice);
        assert_eq!(view.window.to_string(), "40,400");
        let fingerprints =
            reproduced_fingerprints(&vlsm(&["reproduce", &link, "--weights", model], &[]));
        // The same picture from `vlsm segment`.
        let out_dir = tmp.path().join(format!("seg-{}", slice.replace(':', "-")));
        let mut args = vec![
            "segment",
            path,
            "--weights",
            model,
            "--prompt",
            "a lesion",
            "--window",
            "40,400",
            "--out",
            out_dir.to_str().unwrap(),
        ];
        if !slices.is_empty() {
            args.extend(["--slices", slices]);
        }
        let out = vlsm(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let folder = if segment_name.is_empty() {
            let file = vlsm::dicom::DicomFile::read(&std::fs::read(&file).unwrap()).unwrap();
            format!("{}_f001", file.sop_instance_uid)
        } else {
            segment_name.to_string()
        };
        let png = std::fs::read(out_dir.join(folder).join("00_a-lesion.mask.png")).unwrap();
        let (_, _, mask) = vlsm::preprocess::decode_mask(&png).unwrap();
        assert_eq!(
            fingerprints,
            [vlsm::share::mask_fingerprint(&mask)],
            "{slice}"
        );

        // Omitted from the link: the reader gives the file, and gets the same picture.
        let mut omitted = state.clone();
        omitted.image = vlsm::share::ImageSource::Omitted {
            name: state.image.name().to_string(),
        };
        let link_file = tmp.path().join("omitted.txt");
        std::fs::write(&link_file, omitted.to_link("http://x/").unwrap()).unwrap();
        let at = format!("@{}", link_file.display());
        let again = reproduced_fingerprints(&vlsm(
            &["reproduce", &at, "--weights", model, "--image", path],
            &[],
        ));
        assert_eq!(again, fingerprints);
        // A slice the file does not have.
        let mut beyond = omitted.clone();
        beyond.clinical = Some(vlsm::share::ClinicalView {
            slice: vlsm::slice::Slice {
                plane: view.slice.plane,
                index: 999,
            },
            ..view
        });
        std::fs::write(&link_file, beyond.to_link("http://x/").unwrap()).unwrap();
        let out = vlsm(
            &["reproduce", &at, "--weights", model, "--image", path],
            &[],
        );
        assert_clean_error(&out, "slice");
    }
    // --slice on a plain image is refused.
    let image = fixture("images/rgb_150x100.png");
    let out = vlsm(
        &[
            "share",
            image.to_str().unwrap(),
            "--slice",
            "2",
            "--prompt",
            "x",
            "--weights-url",
            "http://127.0.0.1:9/m",
            "--weights",
            model,
        ],
        &[],
    );
    assert_clean_error(&out, "--slice");
}

/// A DICOM input's masks also come back as one DICOM SEG over it: a segment per prompt, a
/// frame per (segment, source frame), the same pixels as the PNG masks. (highdicom 0.28
/// reads these files and maps each source frame to the same masks: `tools/check_dicom_seg.py`.)
#[test]
fn dicom_inputs_get_a_seg_object_with_the_png_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let source = fixture("dicom").join("multiframe_rle.dcm");
    let out_dir = tmp.path().join("out");
    let model = fixture("clipseg_simple");
    let prompts = ["a lesion", "the liver"];
    let segment = |out_dir: &Path| {
        let out = vlsm(
            &[
                "segment",
                source.to_str().unwrap(),
                "--weights",
                model.to_str().unwrap(),
                "--prompt",
                prompts[0],
                "--prompt",
                prompts[1],
                "--out",
                out_dir.to_str().unwrap(),
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    };
    segment(&out_dir);
    let input = vlsm::dicom::DicomFile::read(&std::fs::read(&source).unwrap()).unwrap();
    let uid = &input.sop_instance_uid;
    let bytes = std::fs::read(out_dir.join(format!("{uid}.seg.dcm"))).unwrap();
    let seg = vlsm::dicom::DicomFile::read(&bytes).unwrap();
    assert_eq!((seg.rows, seg.columns), (input.rows, input.columns));
    assert_eq!(seg.frames, 2 * input.frames);
    assert_ne!(&seg.sop_instance_uid, uid);
    let text = String::from_utf8_lossy(&bytes);
    for needle in [
        vlsm::dicom_seg::SEGMENTATION_STORAGE,
        "a lesion",
        "the liver",
        uid,
    ] {
        assert!(text.contains(needle), "the SEG lacks {needle}");
    }
    // The pixel data (the last element: OB, explicit length): frames packed bit by bit.
    let at = bytes
        .windows(8)
        .rposition(|w| w == [0xe0, 0x7f, 0x10, 0x00, b'O', b'B', 0, 0])
        .expect("pixel data");
    let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
    let bits = &bytes[at + 12..at + 12 + len];
    let pixels = (input.rows * input.columns) as usize;
    assert_eq!(
        len,
        (2 * input.frames as usize * pixels)
            .div_ceil(8)
            .next_multiple_of(2)
    );
    for (s, prompt) in prompts.iter().enumerate() {
        for f in 0..input.frames {
            let png = std::fs::read(out_dir.join(format!(
                "{uid}_f{f:03}/{s:02}_{}.mask.png",
                vlsm::prompts::slug(prompt)
            )))
            .unwrap();
            let (_, _, mask) = vlsm::preprocess::decode_mask(&png).unwrap();
            let first = (s * input.frames as usize + f as usize) * pixels;
            let frame: Vec<u8> = (first..first + pixels)
                .map(|bit| (bits[bit / 8] >> (bit % 8)) & 1)
                .collect();
            assert_eq!(frame, mask, "segment {s}, frame {f}");
        }
    }
    // The same result gives the same file (UIDs are derived from it), but for the dates.
    let again = tmp.path().join("again");
    segment(&again);
    let second =
        vlsm::dicom::DicomFile::read(&std::fs::read(again.join(format!("{uid}.seg.dcm"))).unwrap())
            .unwrap();
    assert_eq!(second.sop_instance_uid, seg.sop_instance_uid);
}
