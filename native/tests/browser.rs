//! The browser page end to end, in Debian's headless Chromium: builds the page with Trunk,
//! serves it and a model from 127.0.0.1 (tests/e2e/page.mjs, Playwright) — the tiny fixture
//! model fine-tuned for a few epochs by `vlsm train`, so the page is shown to load a trained
//! export —
//! and checks that the page's masks equal the CLI's, that share links reproduce them in a
//! fresh browser and natively, that WebGPU (SwiftShader) and CPU agree, that the second
//! visit loads offline from Cache Storage, that bad input gives messages, and that no
//! request carries image data.
//!
//! Needs trunk, wasm-bindgen-cli, chromium and `npm ci` in tests/e2e (`tools/test.sh` installs
//! them). The page is built into `$CARGO_TARGET_DIR-web` (or `target/web`), so the nested
//! cargo build never waits on the lock of the build running this test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

const PROMPTS: [&str; 2] = ["a round polyp", ""];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

fn web_target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(format!("{}-web", PathBuf::from(dir).display())),
        None => workspace().join("target/web"),
    }
}

fn require(tool: &str, hint: &str) {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{tool}` is not installed: {hint} (bash tools/test.sh installs it)"
    );
}

/// `trunk build` (debug, no wasm-opt) into a fresh dist directory.
fn build_page(dist: &Path) {
    require("trunk", "cargo install --locked trunk --version 0.21.14");
    require(
        "wasm-bindgen",
        "cargo install wasm-bindgen-cli --version 0.2.130",
    );
    let out = Command::new("trunk")
        .args(["build", "--dist"])
        .arg(dist)
        .current_dir(workspace())
        .env("CARGO_TARGET_DIR", web_target_dir())
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "trunk build failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tiny fixture CLIPSeg, its decoder fine-tuned for a few epochs on the synthetic
/// ellipses: `vlsm train`'s export (a Hugging Face directory).
fn trained_model(tmp: &Path) -> PathBuf {
    let data = tmp.join("ellipses");
    let out = vlsm(&["synthetic", data.to_str().unwrap(), "--train", "32"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = tmp.join("run");
    let base = fixture("clipseg_refined");
    let out = vlsm(
        &[
            "train",
            "--weights",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--datasets",
            "ellipses",
            "--out",
            run.to_str().unwrap(),
            "--epochs",
            "5",
            "--batch-size",
            "8",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    run.join("model")
}

/// Fingerprints `vlsm reproduce` prints for a link, with `weights` (which must be the
/// link's unless `other_weights`).
fn native_fingerprints(link: &str, weights: &Path, tmp: &Path, other_weights: bool) -> Vec<String> {
    let file = tmp.join("link.txt");
    std::fs::write(&file, link).unwrap();
    let link_arg = format!("@{}", file.display());
    let mut args = vec![
        "reproduce",
        &link_arg,
        "--weights",
        weights.to_str().unwrap(),
    ];
    if other_weights {
        args.push("--allow-mismatch");
    }
    reproduced_fingerprints(&vlsm(&args, &[]))
}

/// `vlsm reproduce LINK` natively gives the page's masks: each prompt's fingerprint equal to
/// the page's, or (where native and wasm kernels round differently and a logit sits on the
/// threshold) a mask that `reproduce` finds equal to the link's up to borderline pixels.
fn assert_reproduces_up_to_borderline(link: &str, weights: &Path, tmp: &Path, page: &[String]) {
    let file = tmp.join("link.txt");
    std::fs::write(&file, link).unwrap();
    let out = vlsm(
        &[
            "reproduce",
            &format!("@{}", file.display()),
            "--weights",
            weights.to_str().unwrap(),
        ],
        &[],
    );
    let fingerprints = reproduced_fingerprints(&out);
    assert_eq!(fingerprints.len(), page.len(), "{}", stdout(&out));
    for ((line, native), page) in stdout(&out).lines().zip(&fingerprints).zip(page) {
        if native != page {
            assert!(line.contains("matches the link up to"), "{line}");
            eprintln!("native and page differ on the threshold: {line}");
        }
    }
}

/// Fingerprints `vlsm reproduce` prints for a link whose image is omitted, given the file
/// (a DICOM file or NIfTI volume: the link's slice and window are applied). Exits 1 (and
/// fails here) if the picture's pixels differ from the link's.
fn fingerprints_from_file(link: &str, file: &Path, weights: &Path, tmp: &Path) -> Vec<String> {
    let link_file = tmp.join("omitted-link.txt");
    std::fs::write(&link_file, link).unwrap();
    reproduced_fingerprints(&vlsm(
        &[
            "reproduce",
            &format!("@{}", link_file.display()),
            "--weights",
            weights.to_str().unwrap(),
            "--image",
            file.to_str().unwrap(),
        ],
        &[],
    ))
}

/// Fingerprints of the masks `vlsm segment` writes for one picture of a clinical file,
/// in prompt order, and the masks themselves.
fn segment_fingerprints(
    file: &Path,
    extra: &[&str],
    folder: &str,
    weights: &Path,
    tmp: &Path,
) -> (Vec<String>, Vec<Vec<u8>>) {
    let out_dir = tmp.join(format!("segment-{folder}"));
    let mut args = vec![
        "segment",
        file.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ];
    for p in PROMPTS {
        args.extend(["--prompt", p]);
    }
    args.extend(extra);
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(out_dir.join(folder))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".mask.png"))
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), PROMPTS.len(), "{pngs:?}");
    let masks: Vec<Vec<u8>> = pngs
        .iter()
        .map(|p| {
            vlsm::preprocess::decode_mask(&std::fs::read(p).unwrap())
                .unwrap()
                .2
        })
        .collect();
    (
        masks
            .iter()
            .map(|m| vlsm::share::mask_fingerprint(m))
            .collect(),
        masks,
    )
}

/// The kinds of agreement with the opened link's masks the page shows, one per card.
fn agreements(v: &Value) -> Vec<String> {
    v["agreements"]
        .as_array()
        .unwrap_or_else(|| panic!("no agreements: {v}"))
        .iter()
        .map(|a| a["kind"].as_str().unwrap_or("none").to_string())
        .collect()
}

/// Every mask matches the link's, exactly or (`borderline`) up to pixels on the threshold.
fn assert_agrees(v: &Value, exactly: bool) {
    let kinds = agreements(v);
    assert!(!kinds.is_empty(), "no masks: {v}");
    for kind in &kinds {
        let ok = kind == "exact" || (!exactly && kind == "borderline");
        assert!(ok, "the page says {kind}: {}", v["agreements"]);
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn the_page_segments_like_the_cli_and_its_links_reproduce() {
    require("node", "apt-get install nodejs");
    let e2e = workspace().join("tests/e2e");
    assert!(
        e2e.join("node_modules/playwright-core").is_dir(),
        "run `npm ci` in tests/e2e first (bash tools/test.sh does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dist = tmp.path().join("dist");
    build_page(&dist);

    let port = free_port();
    let model_url = format!("http://127.0.0.1:{port}/models/m");
    let image = fixture("images/rgb_150x100.png");
    let weights = trained_model(tmp.path());
    // A link made by the CLI, to be opened in the page.
    let mut args = vec![
        "share",
        image.to_str().unwrap(),
        "--weights-url",
        &model_url,
        "--weights",
        weights.to_str().unwrap(),
    ];
    for p in PROMPTS {
        args.extend(["--prompt", p]);
    }
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cli_link = stdout(&out).trim().to_string();
    let native = native_fingerprints(&cli_link, &weights, tmp.path(), false);
    // Training changed the masks: the page below must be using the trained weights.
    assert_ne!(
        native_fingerprints(&cli_link, &fixture("clipseg_refined"), tmp.path(), true),
        native,
        "the fine-tuned model segments like the base model"
    );
    // The same, but hashed from other weights than those at the URL.
    let simple = fixture("clipseg_simple");
    let args = vec![
        "share",
        image.to_str().unwrap(),
        "--weights-url",
        &model_url,
        "--weights",
        simple.to_str().unwrap(),
        "--prompt",
        "polyp",
    ];
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mismatch_link = stdout(&out).trim().to_string();

    // A ground truth (left 60 columns) and an image too large for the browser (81 MP of
    // zeros: a small PNG file).
    let (w, h) = (150u32, 100u32);
    let truth = image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < 60 { 255 } else { 0 }]));
    let truth_path = tmp.path().join("truth.png");
    truth.save(&truth_path).unwrap();
    let huge_path = tmp.path().join("huge.png");
    image::GrayImage::new(9000, 9000).save(&huge_path).unwrap();
    let masks_dir = tmp.path().join("native-masks");
    let link_file = tmp.path().join("cli-link.txt");
    std::fs::write(&link_file, &cli_link).unwrap();
    let out = vlsm(
        &[
            "reproduce",
            &format!("@{}", link_file.display()),
            "--weights",
            weights.to_str().unwrap(),
            "--out",
            masks_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let truth_mask: Vec<u8> = truth.pixels().map(|p| u8::from(p.0[0] > 127)).collect();
    let native_dice: Vec<f64> = (1..=PROMPTS.len())
        .map(|i| {
            let png = std::fs::read(masks_dir.join(format!("{i:02}.mask.png"))).unwrap();
            let (_, _, mask) = vlsm::preprocess::decode_mask(&png).unwrap();
            vlsm::metrics::dice(&mask, &truth_mask).unwrap()
        })
        .collect();

    // A second family: BiomedCLIPSeg-D from the repository's own fixture, as `convert` writes it.
    let biomed = tmp.path().join("biomedclipseg-d");
    let out = vlsm(
        &[
            "convert",
            "--hub-mirror",
            fixture("biomedclipseg/hub").to_str().unwrap(),
            "--arch",
            "biomedclipseg-d",
            biomed.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // A third: CRIS (vlsm's own 416-px fixture: ResNet convolutions, the dynamic kernel),
    // converted from medvlsm's cris.pt.
    let cris_src = tmp.path().join("cris-src");
    std::fs::create_dir_all(&cris_src).unwrap();
    for (from, name) in [
        ("cris/cris.pt", "cris.pt"),
        ("cris/config.json", "config.json"),
        ("tokenizer/vocab.json", "vocab.json"),
        ("tokenizer/merges.txt", "merges.txt"),
    ] {
        std::fs::copy(fixture(from), cris_src.join(name)).unwrap();
    }
    let cris = tmp.path().join("cris");
    let out = vlsm(
        &[
            "convert",
            cris_src.to_str().unwrap(),
            cris.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // Clinical input: a NIfTI volume with a label volume as its truth, a CLI link to one of
    // its slices without the volume, and DICOM files.
    let nifti = fixture("nifti/volume.nii.gz");
    let volume = vlsm::nifti::read(&std::fs::read(&nifti).unwrap()).unwrap();
    let labels: Vec<u8> = volume.values.iter().map(|&v| u8::from(v > 600.0)).collect();
    let nifti_truth = tmp.path().join("truth.nii.gz");
    std::fs::write(&nifti_truth, volume.label_file(&labels, true).unwrap()).unwrap();
    let out = vlsm(
        &[
            "share",
            nifti.to_str().unwrap(),
            "--slice",
            "axial:5",
            "--window",
            "lung",
            "--weights-url",
            &model_url,
            "--weights",
            weights.to_str().unwrap(),
            "--prompt",
            PROMPTS[0],
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut state = vlsm::share::ShareState::from_link(stdout(&out).trim()).unwrap();
    state.image = vlsm::share::ImageSource::Omitted {
        name: "volume.nii.gz".into(),
    };
    let nifti_link = state.to_link("http://x/").unwrap();
    let nifti_link_native = fingerprints_from_file(&nifti_link, &nifti, &weights, tmp.path());
    let dicom = fixture("dicom/multiframe_rle.dcm");

    // A folder whose model.safetensors is a web page (what a wrong URL may serve with 200).
    let not_weights = tmp.path().join("not-weights");
    std::fs::create_dir_all(&not_weights).unwrap();
    for entry in std::fs::read_dir(&weights).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() && path.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&path, not_weights.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        not_weights.join("model.safetensors"),
        "<!doctype html><title>Sign in</title>".repeat(20_000),
    )
    .unwrap();

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-e2e");
    std::fs::create_dir_all(&shots).unwrap();
    let mut node = Command::new("node");
    node.current_dir(&e2e)
        .arg("page.mjs")
        .arg("e2e")
        .arg("--dist")
        .arg(&dist)
        .arg("--model")
        .arg(&weights)
        .arg("--image")
        .arg(&image)
        .args(["--port", &port.to_string(), "--cli-link", &cli_link])
        .args(["--mismatch-link", &mismatch_link])
        .arg("--truth")
        .arg(&truth_path)
        .arg("--huge")
        .arg(&huge_path)
        .arg("--model2")
        .arg(&biomed)
        .arg("--model3")
        .arg(&cris)
        .arg("--model4")
        .arg(&not_weights)
        .arg("--shots")
        .arg(&shots)
        .arg("--nifti")
        .arg(&nifti)
        .arg("--nifti-truth")
        .arg(&nifti_truth)
        .args(["--nifti-link", &nifti_link])
        .arg("--dicom")
        .arg(&dicom)
        .arg("--bad-dicom")
        .arg(fixture("dicom/truncated.dcm"))
        .arg("--unsupported-dicom")
        // JPEG 2000 decodes natively only (see core/Cargo.toml): the page names it.
        .arg(fixture("dicom/j2k_lossless.dcm"));
    for p in PROMPTS {
        node.args(["--prompt", p]);
    }
    let out = node.output().unwrap();
    assert!(
        out.status.success(),
        "page.mjs failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    std::fs::write(shots.join("observed.json"), &out.stdout).unwrap();
    eprintln!(
        "page ready {} ms, fine-tuned fixture model loaded {} ms after navigation; CPU encode {} ms, \
         2 prompts {} ms; screenshots in {}",
        r["page_ready_ms"],
        r["first_load_ms"],
        r["cpu"]["timing"]["encode_ms"],
        r["cpu"]["timing"]["decode_ms"],
        shots.display()
    );

    // The CPU path in the browser gives the CLI's masks, bit for bit.
    assert_eq!(r["first_model"], "loaded");
    assert_eq!(r["cpu"]["run"], "done", "{}", r["cpu"]);
    assert_eq!(r["cpu"]["backend"], "CPU");
    let page = strings(&r["cpu"]["fingerprints"]);
    assert_eq!(
        page, native,
        "browser CPU vs `vlsm reproduce` of the CLI's link"
    );
    let sha = vlsm::share::sha256_hex(&std::fs::read(weights.join("model.safetensors")).unwrap());
    assert_eq!(r["weights_sha256"], sha.as_str());
    // The threshold slider changes the masks without a single request.
    assert_ne!(strings(&r["cpu_threshold_09"]), page);
    assert_eq!(r["requests_during_slider"], 0);

    // Live Dice against a ground truth, as computed natively from the CLI's masks.
    let scores = r["scores"].as_array().unwrap();
    assert_eq!(scores.len(), PROMPTS.len());
    for (score, native) in scores.iter().zip(&native_dice) {
        let dice = score["dice"].as_f64().unwrap();
        assert!(
            (dice - native).abs() < 1e-9,
            "page Dice {dice} vs native {native}"
        );
    }

    // A NIfTI slice and a DICOM frame in the page: the masks `vlsm segment` makes of the
    // same picture with the same window, and the label volume's slice as the truth.
    let c = &r["clinical"];
    assert_eq!(c["default_slice"], "axial:8", "{c}");
    assert_eq!(c["default_window"], "file", "{c}");
    assert_eq!(c["nifti"]["run"], "done", "{c}");
    let (expected, masks) = segment_fingerprints(
        &nifti,
        &["--slices", "axial:3-3", "--window", "40,400"],
        "volume_axial_003",
        &weights,
        tmp.path(),
    );
    assert_eq!(strings(&c["nifti"]["fingerprints"]), expected);
    let truth_file = vlsm::clinical::ClinicalImage::read(
        &std::fs::read(&nifti_truth).unwrap(),
        vlsm::nifti::MAX_VOXELS,
    )
    .unwrap();
    let (_, _, truth_slice) = truth_file.label_mask("axial:3".parse().unwrap()).unwrap();
    assert!(truth_slice.contains(&1) && truth_slice.contains(&0));
    let scores = c["nifti"]["scores"].as_array().unwrap();
    assert_eq!(scores.len(), PROMPTS.len(), "{c}");
    for (score, mask) in scores.iter().zip(&masks) {
        let native = vlsm::metrics::dice(mask, &truth_slice).unwrap();
        let dice = score["dice"].as_f64().unwrap();
        assert!((dice - native).abs() < 1e-9, "page Dice {dice} vs {native}");
    }
    // The page's link names the slice and window; with the volume instead of the embedded
    // picture, `vlsm reproduce` renders the same pixels (else it exits 1) and masks.
    let link = c["nifti"]["link"].as_str().unwrap();
    let mut state = vlsm::share::ShareState::from_link(link).unwrap();
    let view = state.clinical.expect("the link names the picture");
    assert_eq!(
        (view.slice.to_string(), view.window.to_string()),
        ("axial:3".into(), "40,400".into())
    );
    assert_eq!(state.image.name(), "volume.nii.gz");
    assert_eq!(
        Some(state.image_sha256.as_str()),
        c["nifti"]["sha256"].as_str()
    );
    state.image = vlsm::share::ImageSource::Omitted {
        name: "volume.nii.gz".into(),
    };
    let omitted = state.to_link("http://x/").unwrap();
    assert_eq!(
        fingerprints_from_file(&omitted, &nifti, &weights, tmp.path()),
        expected
    );
    // The truth follows the slice; planes and presets.
    assert!(
        c["truth_after_slice"].as_str().unwrap().contains("axial:4"),
        "{c}"
    );
    assert_eq!(
        c["results_after_slice"], 0,
        "results of another slice stayed up"
    );
    let coronal = format!("coronal:{}", volume.slices(vlsm::nifti::Plane::Coronal) / 2);
    assert_eq!(c["coronal"], coronal.as_str());
    assert!(
        c["coronal_status"].as_str().unwrap().contains(&coronal),
        "{c}"
    );
    assert_eq!(c["preset_window"], "-600,1500");
    // The DICOM file's second frame: frames, no planes; the NIfTI truth does not fit it.
    assert_eq!(c["dicom_has_plane"], false);
    assert_eq!(c["truth_after_dicom"], false);
    assert_eq!(c["dicom"]["run"], "done", "{c}");
    let uid = vlsm::dicom::DicomFile::read(&std::fs::read(&dicom).unwrap())
        .unwrap()
        .sop_instance_uid;
    let (expected, _) =
        segment_fingerprints(&dicom, &[], &format!("{uid}_f001"), &weights, tmp.path());
    assert_eq!(strings(&c["dicom"]["fingerprints"]), expected);
    // The CLI's link to a slice, opened without the volume: the page asked for the file,
    // then showed the link's slice and window and gave its masks.
    assert!(
        r["nifti_link_info"]
            .as_str()
            .unwrap()
            .contains("volume.nii.gz"),
        "{}",
        r["nifti_link_info"]
    );
    let nl = &r["nifti_link"];
    assert_eq!(nl["run"], "done", "{nl}");
    assert_eq!(nl["slice"], "axial:5");
    assert_eq!(nl["window"], "-600,1500");
    assert_eq!(strings(&nl["fingerprints"]), nifti_link_native);
    assert_agrees(nl, true);

    // A download that broke half-way: a message naming the file, nothing cached, Retry works.
    assert_eq!(r["partial_state"], "failed");
    assert!(
        r["partial_error"]
            .as_str()
            .unwrap()
            .contains("model.safetensors"),
        "{}",
        r["partial_error"]
    );
    assert!(
        !strings(&r["partial_cached"])
            .iter()
            .any(|u| u.ends_with("model.safetensors")),
        "a broken download was cached: {}",
        r["partial_cached"]
    );
    assert_eq!(r["retry_button"], "Retry");
    assert_eq!(r["retry_state"], "loaded");

    // A browser without WebGPU: Auto runs on the CPU and says why.
    assert_eq!(r["no_webgpu_state"], "loaded");
    assert_eq!(r["no_webgpu_backend"], "CPU");
    assert!(
        r["no_webgpu_note"]
            .as_str()
            .unwrap_or_default()
            .contains("WebGPU"),
        "{}",
        r["no_webgpu_note"]
    );

    // BiomedCLIPSeg-D in the page: loaded as such, CPU masks equal `vlsm reproduce` of the
    // page's own link (which names the family), and its link on WebGPU gives them too.
    let m2 = &r["model2"];
    assert_eq!(m2["state"], "loaded", "{m2} — console: {}", r["console"]);
    assert!(
        m2["status"]
            .as_str()
            .unwrap()
            .starts_with("BiomedCLIPSeg-D loaded"),
        "{}",
        m2["status"]
    );
    assert_eq!(m2["cpu"]["run"], "done", "{}", m2["cpu"]);
    let biomed_page = strings(&m2["cpu"]["fingerprints"]);
    let m2_link = m2["link"].as_str().unwrap();
    let state = vlsm::share::ShareState::from_link(m2_link).unwrap();
    assert_eq!(state.model.as_deref(), Some("biomedclipseg-d"));
    assert_eq!(
        native_fingerprints(m2_link, &biomed, tmp.path(), false),
        biomed_page
    );
    assert_ne!(biomed_page, page, "the two models gave the same masks");
    assert_eq!(m2["webgpu"]["run"], "done", "{}", m2["webgpu"]);
    assert_eq!(m2["webgpu"]["backend"], "WebGPU");
    assert_eq!(strings(&m2["webgpu"]["fingerprints"]), biomed_page);
    assert_agrees(&m2["webgpu"], false);
    // The CLIPSeg folder is not what that link names: reproduce says so.
    let out = vlsm(
        &["reproduce", m2_link, "--weights", weights.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("model family"), "{}", stderr(&out));

    // CRIS in the page: loaded as such at its 0.35 threshold; CPU masks equal `vlsm
    // reproduce` of the page's link, and that link on WebGPU gives them too.
    let m3 = &r["model3"];
    assert_eq!(m3["state"], "loaded", "{m3} — console: {}", r["console"]);
    assert!(
        m3["status"].as_str().unwrap().starts_with("CRIS loaded"),
        "{}",
        m3["status"]
    );
    assert_eq!(m3["threshold"], "0.35", "{m3}");
    assert_eq!(m3["cpu"]["run"], "done", "{}", m3["cpu"]);
    let cris_page = strings(&m3["cpu"]["fingerprints"]);
    let m3_link = m3["link"].as_str().unwrap();
    let state = vlsm::share::ShareState::from_link(m3_link).unwrap();
    assert_eq!(state.model.as_deref(), Some("cris"));
    assert_eq!(state.threshold, 0.35);
    // Natively CRIS's text encoder runs vlsm's fixed-order GEMM and the page's wasm the gemm
    // crate: on an AVX2 machine one mask differed in pixels on the threshold.
    assert_reproduces_up_to_borderline(m3_link, &cris, tmp.path(), &cris_page);
    assert_eq!(m3["webgpu"]["run"], "done", "{}", m3["webgpu"]);
    assert_eq!(m3["webgpu"]["backend"], "WebGPU");
    assert_eq!(strings(&m3["webgpu"]["fingerprints"]), cris_page);
    assert_agrees(&m3["webgpu"], false);

    // The page's own share link: natively, and in a fresh browser (empty cache) on CPU.
    let link = r["share_link"].as_str().unwrap();
    assert_eq!(native_fingerprints(link, &weights, tmp.path(), false), page);
    assert_eq!(r["link_cpu"]["run"], "done", "{}", r["link_cpu"]);
    assert_eq!(strings(&r["link_cpu"]["fingerprints"]), page);
    // The link records the page's masks: the reopened page says they match.
    assert_agrees(&r["link_cpu"], true);
    assert_eq!(strings(&r["link_prompts"]), PROMPTS);
    // The CLI's link opened in the page.
    assert_eq!(strings(&r["cli_link_cpu"]["fingerprints"]), native);
    assert_agrees(&r["cli_link_cpu"], true);

    // A link made for other weights than those at its URL says so.
    let info = r["mismatch_info"].as_str().unwrap_or_default();
    assert!(
        info.contains("weights at this URL differ"),
        "{}",
        r["mismatch_info"]
    );

    // WebGPU (SwiftShader) gives the same masks as the CPU.
    assert_eq!(
        r["link_webgpu"]["backend"], "WebGPU",
        "{}",
        r["link_webgpu"]
    );
    assert_eq!(strings(&r["link_webgpu"]["fingerprints"]), page);
    assert_agrees(&r["link_webgpu"], false);

    // Second visit: the model comes from Cache Storage while the server refuses it.
    assert_eq!(r["offline_model"], "loaded", "{}", r["offline_status"]);
    assert!(
        r["offline_status"]
            .as_str()
            .unwrap()
            .contains("browser cache")
    );

    // Bad input: messages, and the page lives on.
    let bad = &r["bad"];
    assert!(
        bad["malformed_link"].as_str().unwrap().contains("link"),
        "{bad}"
    );
    assert!(
        bad["truncated_link"].as_str().unwrap().contains("link"),
        "{bad}"
    );
    // Weights that are not safetensors: refused from their first bytes, nothing cached.
    assert_eq!(bad["not_weights_state"], "failed", "{bad}");
    let not_weights = bad["not_weights"].as_str().unwrap();
    assert!(
        not_weights.contains("/models/m4/model.safetensors: not a valid safetensors file")
            && not_weights.contains("header length")
            && !not_weights.contains('\n'),
        "{bad}"
    );
    assert!(
        !bad["not_weights_cached"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u.as_str().unwrap().ends_with("/m4/model.safetensors")),
        "{bad}"
    );
    assert_eq!(bad["wrong_weights_state"], "failed");
    assert!(
        bad["wrong_weights"].as_str().unwrap().contains("404"),
        "{bad}"
    );
    assert!(
        bad["not_an_image"]
            .as_str()
            .unwrap()
            .contains("unrecognised format"),
        "{bad}"
    );
    assert!(
        bad["huge_image"].as_str().unwrap().contains("too large"),
        "{bad}"
    );
    // A server that never stops sending: cut off at the file's cap.
    assert!(
        bad["endless_weights"]
            .as_str()
            .unwrap()
            .contains("more than the 1 MiB allowed"),
        "{bad}"
    );
    assert!(
        bad["bad_dicom"].as_str().unwrap().contains("DICOM"),
        "{bad}"
    );
    assert!(
        bad["unsupported_dicom"]
            .as_str()
            .unwrap()
            .contains("unsupported transfer syntax JPEG 2000"),
        "{bad}"
    );
    assert_eq!(bad["alive"], true);

    // Privacy: every request (page and worker) went to the test server, was a GET without a
    // body, and named a page asset or a model file: nothing carried the image.
    let origin = format!("http://127.0.0.1:{port}/");
    for req in r["requests"].as_array().unwrap() {
        let url = req["url"].as_str().unwrap();
        assert!(
            url.starts_with(&origin) || url.starts_with("blob:") || url.starts_with("data:"),
            "request to another origin: {url}"
        );
        assert_eq!(req["method"], "GET", "{req}");
        assert_eq!(req["body"], 0, "{req}");
        assert!(
            !url.contains("vlsm=1."),
            "the fragment left the browser: {url}"
        );
    }
    for req in r["server_log"].as_array().unwrap() {
        let path = req["path"].as_str().unwrap();
        let query = req["query"].as_str().unwrap();
        assert_eq!(req["body"], 0, "{req}");
        assert!(query.is_empty() || query.starts_with("?backend="), "{req}");
        let asset = ["/", "/index.html", "/boot.js", "/style.css"].contains(&path)
            || path.ends_with(".js")
            || path.ends_with(".wasm")
            || path.starts_with("/models/");
        assert!(asset, "unexpected request {req}");
    }
    // No script errors beyond the failed loads the bad-input checks provoke.
    for line in r["console"].as_array().unwrap() {
        let line = line.as_str().unwrap();
        assert!(
            line.starts_with("Failed to load resource"),
            "console: {line}"
        );
    }
    assert!(shots.join("cpu.png").is_file() && shots.join("webgpu.png").is_file());
}
