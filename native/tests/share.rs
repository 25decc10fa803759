//! `vlsm share` and `vlsm reproduce`: links made natively reproduce `vlsm segment`'s masks,
//! weights come from a URL (a server on 127.0.0.1) or a directory, and bad links fail cleanly.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const PROMPTS: [&str; 2] = ["a round polyp", ""];

fn share(image: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["share", image.to_str().unwrap()];
    for p in PROMPTS {
        args.extend(["--prompt", p]);
    }
    args.extend(extra);
    vlsm(&args, &[])
}

/// Fingerprints of the masks `vlsm segment` writes for the same image and prompts.
fn segment_fingerprints(image: &Path, threshold: &str, tmp: &Path) -> Vec<String> {
    let out_dir = tmp.join("segment");
    let weights = fixture("clipseg_refined");
    let mut args = vec![
        "segment",
        image.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--threshold",
        threshold,
        "--out",
        out_dir.to_str().unwrap(),
    ];
    for p in PROMPTS {
        args.extend(["--prompt", p]);
    }
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stem = image.file_stem().unwrap().to_str().unwrap();
    let mut masks: Vec<_> = std::fs::read_dir(out_dir.join(stem))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".mask.png"))
        .collect();
    masks.sort();
    masks
        .iter()
        .map(|p| {
            let (_, _, mask) = vlsm::preprocess::decode_mask(&std::fs::read(p).unwrap()).unwrap();
            vlsm::share::mask_fingerprint(&mask)
        })
        .collect()
}

#[test]
fn a_shared_link_reproduces_the_masks_of_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let image = fixture("images/rgb_150x100.png");
    let weights = fixture("clipseg_refined");
    let out = share(
        &image,
        &[
            "--weights-url",
            "https://example.org/models/refined/",
            "--weights",
            weights.to_str().unwrap(),
            "--threshold",
            "0.4",
            "--page",
            "https://vlsm.example/app/",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let link = stdout(&out).trim().to_string();
    assert!(
        link.starts_with("https://vlsm.example/app/#vlsm=1."),
        "{link}"
    );
    let state = vlsm::share::ShareState::from_link(&link).unwrap();
    assert_eq!(state.weights_url, "https://example.org/models/refined");
    assert_eq!(state.prompts, PROMPTS);
    assert_eq!(state.threshold, 0.4);
    let sha = vlsm::share::sha256_hex(&std::fs::read(weights.join("model.safetensors")).unwrap());
    assert_eq!(state.weights_sha256.as_deref(), Some(sha.as_str()));

    let expected = segment_fingerprints(&image, "0.4", tmp.path());
    let out = vlsm(
        &["reproduce", &link, "--weights", weights.to_str().unwrap()],
        &[],
    );
    assert_eq!(reproduced_fingerprints(&out), expected);
    assert!(
        stderr(&out).contains("matches the link"),
        "{}",
        stderr(&out)
    );
    // Foreground counts and prompts are printed beside the fingerprints.
    let first = stdout(&out).lines().next().unwrap().to_string();
    assert!(
        first.starts_with("1\t") && first.ends_with("\ta round polyp"),
        "{first}"
    );

    // The link from a file (`@FILE`) and from stdin (`-`).
    let link_file = tmp.path().join("link.txt");
    std::fs::write(&link_file, format!("{link}\n")).unwrap();
    let at = format!("@{}", link_file.display());
    let out = vlsm(
        &["reproduce", &at, "--weights", weights.to_str().unwrap()],
        &[],
    );
    assert_eq!(reproduced_fingerprints(&out), expected);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlsm"))
        .args(["reproduce", "-", "--weights", weights.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(link.as_bytes())
        .unwrap();
    assert_eq!(
        reproduced_fingerprints(&child.wait_with_output().unwrap()),
        expected
    );
}

#[test]
fn weights_come_from_the_links_url_and_mismatches_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = serve_hub(vec![
        ("local/refined".into(), fixture("clipseg_refined")),
        ("local/simple".into(), fixture("clipseg_simple")),
    ]);
    let url = format!("{hub}/local/refined/resolve/main");
    let image = fixture("images/grey_120x90.png");
    // No --weights: the weights are downloaded to be hashed.
    let out = share(&image, &["--weights-url", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    let link = stdout(&out).trim().to_string();
    let cache = tmp.path().join("cache");
    let envs = [("VLSM_CACHE", cache.to_str().unwrap())];
    let out = vlsm(&["reproduce", &link], &envs);
    let expected = segment_fingerprints(&image, "0.5", tmp.path());
    assert_eq!(reproduced_fingerprints(&out), expected);
    assert!(
        stderr(&out).contains("matches the link"),
        "{}",
        stderr(&out)
    );
    // Other weights than the link's: it still runs and prints the masks, says so, and
    // exits 1 unless --allow-mismatch.
    let simple = fixture("clipseg_simple");
    let out = vlsm(
        &["reproduce", &link, "--weights", simple.to_str().unwrap()],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 2);
    assert!(
        stderr(&out).contains("weights differ from the link's")
            && stderr(&out)
                .lines()
                .last()
                .unwrap()
                .starts_with("error: the weights differ"),
        "{}",
        stderr(&out)
    );
    let out = vlsm(
        &[
            "reproduce",
            &link,
            "--weights",
            simple.to_str().unwrap(),
            "--allow-mismatch",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn large_images_travel_by_hash_and_must_be_supplied() {
    let tmp = tempfile::tempdir().unwrap();
    // Noise does not compress: 420×420 RGB is over the embedding limit as PNG.
    let mut seed = 99u32;
    let noisy = image::RgbImage::from_fn(420, 420, |_, _| {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let b = seed.to_le_bytes();
        image::Rgb([b[1], b[2], b[3]])
    });
    let path = tmp.path().join("noise.png");
    noisy.save(&path).unwrap();
    let weights = fixture("clipseg_refined");
    let out = share(
        &path,
        &[
            "--weights-url",
            "https://example.org/m",
            "--weights",
            weights.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("too large to embed"),
        "{}",
        stderr(&out)
    );
    let link = stdout(&out).trim().to_string();
    assert!(link.len() < 2000, "the image should not be in the link");
    let w = weights.to_str().unwrap();
    assert_clean_error(&vlsm(&["reproduce", &link, "--weights", w], &[]), "--image");
    let out = vlsm(
        &[
            "reproduce",
            &link,
            "--weights",
            w,
            "--image",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(reproduced_fingerprints(&out).len(), 2);
    assert!(!stderr(&out).contains("image differs"), "{}", stderr(&out));
    // Another image is used, with a warning.
    let other = fixture("images/rgb_64x64.png");
    let out = vlsm(
        &[
            "reproduce",
            &link,
            "--weights",
            w,
            "--image",
            other.to_str().unwrap(),
        ],
        &[],
    );
    assert!(stderr(&out).contains("image differs"), "{}", stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn bad_links_and_share_arguments_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = fixture("clipseg_refined");
    let w = weights.to_str().unwrap();
    let image = fixture("images/rgb_53x37.png");
    let good = share(
        &image,
        &["--weights-url", "https://example.org/m", "--weights", w],
    );
    let link = stdout(&good).trim().to_string();
    for (bad, needle) in [
        ("https://example.org/".to_string(), "not a vlsm link"),
        ("#vlsm=2.abc".to_string(), "version"),
        ("#vlsm=1.@@@".to_string(), "damaged"),
        (link[..link.len() - 20].to_string(), "link"),
        (
            format!("@{}", tmp.path().join("missing").display()),
            "reading the link",
        ),
    ] {
        assert_clean_error(&vlsm(&["reproduce", &bad, "--weights", w], &[]), needle);
    }
    assert_clean_error(
        &share(&image, &["--weights-url", "ftp://x/y", "--weights", w]),
        "weights-url",
    );
    assert_clean_error(
        &share(
            &image,
            &[
                "--weights-url",
                "https://e.org/m",
                "--weights",
                tmp.path().to_str().unwrap(),
            ],
        ),
        "model.safetensors",
    );
    assert_clean_error(
        &share(
            &fixture("clipseg_refined/config.json"),
            &["--weights-url", "https://e.org/m", "--weights", w],
        ),
        "format",
    );
    // Eleven prompts are more than the page shows side by side.
    let mut args = vec![
        "share",
        image.to_str().unwrap(),
        "--weights-url",
        "https://e.org/m",
        "--weights",
        w,
    ];
    for _ in 0..11 {
        args.extend(["--prompt", "p"]);
    }
    assert_clean_error(&vlsm(&args, &[]), "prompts");
    // An unreachable weights URL fails at once.
    assert_clean_error(
        &share(&image, &["--weights-url", "http://127.0.0.1:1/m"]),
        "127.0.0.1:1",
    );
}

/// A link records each mask (`share --weights`); `reproduce` says whether its own masks match
/// exactly, up to pixels on the threshold, or really differ, and exits 1 for the last.
#[test]
fn recorded_masks_match_exactly_up_to_borderline_pixels_or_really_differ() {
    use vlsm::mask_check::{BORDERLINE_MARGIN, MaskCheck};
    let image = fixture("images/rgb_150x100.png");
    let weights = fixture("clipseg_refined");
    let w = weights.to_str().unwrap();
    let out = share(
        &image,
        &["--weights-url", "https://example.org/m", "--weights", w],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let link = stdout(&out).trim().to_string();
    let state = vlsm::share::ShareState::from_link(&link).unwrap();
    assert_eq!(state.masks.len(), PROMPTS.len());
    assert_eq!(state.margin, BORDERLINE_MARGIN);
    let out = vlsm(&["reproduce", &link, "--weights", w], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    for line in stdout(&out).lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields[3], "matches the link", "{line}");
    }

    // The maker's logits as another backend might have had them: the pixel nearest the
    // threshold on the other side (prompt 1), and a pixel far from it flipped (prompt 2).
    let rgb = vlsm::preprocess::decode_rgb(&std::fs::read(&image).unwrap()).unwrap();
    let segmenter =
        vlsm::Segmenter::from_dir(&weights, &vlsm::burn::tensor::Device::flex()).unwrap();
    let encoded = segmenter.encode_image(&rgb).unwrap();
    let logits = segmenter.decode(&encoded, &PROMPTS).unwrap();
    let t = (state.threshold / (1.0 - state.threshold)).ln();
    let distance = |l: &f32| (l - t).abs();
    let (near, d) = (0..logits[0].values.len())
        .map(|i| (i, distance(&logits[0].values[i])))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert!(
        d < BORDERLINE_MARGIN / 2.0,
        "nearest logit {d} from the threshold"
    );
    let far = (0..logits[1].values.len())
        .max_by(|&a, &b| distance(&logits[1].values[a]).total_cmp(&distance(&logits[1].values[b])))
        .unwrap();
    let across = |logits: &vlsm::Logits, i: usize, by: f32| {
        let mut maker = logits.clone();
        let l = maker.values[i];
        maker.values[i] = if l > t { t - by } else { t + by };
        MaskCheck::of(&maker, state.threshold, rgb.width(), rgb.height())
    };
    let mut edited = state.clone();
    edited.masks[0] = across(&logits[0], near, d);
    edited.masks[1] = across(&logits[1], far, 1.0);
    let edited = edited.to_link("http://127.0.0.1:8080/").unwrap();
    let out = vlsm(&["reproduce", &edited, "--weights", w], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.lines()
            .last()
            .unwrap()
            .starts_with("error: the mask of prompt 2 differs from the link's"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert!(
        lines[0].contains("matches the link up to 1 borderline pixel ("),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("DIFFERS from the link"), "{}", lines[1]);
    // The fingerprints are still this machine's own.
    assert_eq!(
        reproduced_fingerprints(&vlsm(
            &["reproduce", &edited, "--weights", w, "--allow-mismatch"],
            &[]
        )),
        state
            .masks
            .iter()
            .map(|m| m.fingerprint.clone())
            .collect::<Vec<_>>()
    );
}
