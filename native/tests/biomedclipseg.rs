//! `vlsm segment` / `convert` with BiomedCLIPSeg and BiomedCLIPSeg-D, from the shared
//! medvlsm fixtures as they are (the README's command lines), through the hub mirror, the
//! network and the cache; and the bad inputs a user can hand it.

mod common;

use std::path::Path;

use common::{
    assert_clean_error, max_abs_diff, read_npy, s, serve_hub, shared, stderr, synthetic, vlsm,
};

const BIOMEDCLIP: &str = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224";
const BERT: &str = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract";
const CIDAS: &str = "CIDAS/clipseg-rd64-refined";

/// A float64 tensor of a reference file, as f32.
fn reference_f64(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
        .collect()
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Segments every pair of a fixture with `model_args` and checks each pair's logits
/// against the float64 reference.
fn check_pairs(fixture: &str, model_args: &[&str]) {
    let dir = shared(fixture);
    let out = tempfile::tempdir().unwrap();
    let pairs = manifest(&dir)["pairs"].as_array().unwrap().clone();
    let expected = reference_f64(&dir.join("outputs_f64.safetensors"), "logits");
    let per_pair = expected.len() / pairs.len();
    for (i, pair) in pairs.iter().enumerate() {
        let image = dir.join(pair["image"].as_str().unwrap());
        let npy = out.path().join(format!("{i}.npy"));
        let mut args = vec![
            "segment",
            s(&image),
            "--prompt",
            pair["prompt"].as_str().unwrap(),
            "--out",
            s(out.path()),
            "--save-logits",
            s(&npy),
        ];
        args.extend_from_slice(model_args);
        let run = vlsm(&args, &[("HF_HOME", s(out.path()))]);
        assert!(run.status.success(), "{fixture} pair {i}: {}", stderr(&run));
        let (shape, logits) = read_npy(&npy);
        assert_eq!(shape[1..], [112, 112]);
        let d = max_abs_diff(&logits, &expected[i * per_pair..(i + 1) * per_pair]);
        assert!(d <= 1e-4, "{fixture} pair {i}: max |Δlogit| = {d:e}");
    }
}

#[test]
fn readme_command_lines_reproduce_the_shared_fixtures() {
    let trained = shared("fixtures/tiny_biomedclipseg");
    let (hub, ckpt) = (trained.join("hub"), trained.join("checkpoints/best.ckpt"));
    check_pairs(
        "fixtures/tiny_biomedclipseg",
        &["--hub-mirror", s(&hub), "--weights", s(&ckpt)],
    );
    let st = trained.join("checkpoints/best.safetensors");
    check_pairs(
        "fixtures/tiny_biomedclipseg",
        &["--hub-mirror", s(&hub), "--weights", s(&st)],
    );
    let d = shared("fixtures/tiny_biomedclipseg_d/hub");
    check_pairs(
        "fixtures/tiny_biomedclipseg_d",
        &["--hub-mirror", s(&d), "--arch", "biomedclipseg-d"],
    );
}

#[test]
fn converted_folder_and_the_environment_mirror_give_the_same_logits() {
    let hub = shared("fixtures/tiny_biomedclipseg_d/hub");
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("biomedclipseg-d");
    let env = [("VLSM_HUB_MIRROR", s(&hub)), ("HF_HOME", s(tmp.path()))];
    let run = vlsm(&["convert", "--arch", "biomedclipseg-d", s(&folder)], &env);
    assert!(run.status.success(), "{}", stderr(&run));
    check_pairs("fixtures/tiny_biomedclipseg_d", &["--weights", s(&folder)]);
    // fp16 weights: half the size, logits close.
    let half = tmp.path().join("half");
    let run = vlsm(
        &["convert", "--arch", "biomedclipseg-d", "--fp16", s(&half)],
        &env,
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let size = |d: &Path| {
        std::fs::metadata(d.join("model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&half) * 10 < size(&folder) * 6,
        "fp16 is not half the size"
    );
}

#[test]
fn hub_ids_come_from_the_network_then_from_the_cache() {
    let fixture = shared("fixtures/tiny_biomedclipseg_d/hub");
    let endpoint = serve_hub(
        [BIOMEDCLIP, BERT, CIDAS]
            .map(|id| (id.to_string(), fixture.join(id)))
            .to_vec(),
    );
    let home = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let image = shared("fixtures/tiny_biomedclipseg_d/image0.png");
    let args = [
        "segment",
        s(&image),
        "-p",
        "",
        "--arch",
        "biomedclipseg-d",
        "--out",
        s(out.path()),
    ];
    let run = vlsm(
        &args,
        &[("HF_HOME", s(home.path())), ("HF_ENDPOINT", &endpoint)],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        home.path()
            .join("hub/models--microsoft--BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
            .is_dir()
    );
    // Offline now: the cache answers.
    let run = vlsm(
        &args,
        &[
            ("HF_HOME", s(home.path())),
            ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
}

#[test]
fn bad_inputs_are_one_clear_error() {
    let fixture = shared("fixtures/tiny_biomedclipseg");
    let image = fixture.join("image0.png");
    let tmp = tempfile::tempdir().unwrap();
    let segment = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["segment", s(&image), "-p", "polyp", "--out", s(tmp.path())];
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("HF_HOME", s(tmp.path())));
        env.push(("HF_ENDPOINT", "http://127.0.0.1:9"));
        vlsm(&args, &env)
    };
    let hub = fixture.join("hub");

    // BiomedCLIPSeg with no trained decoder: refused, saying what to do.
    let run = segment(&["--hub-mirror", s(&hub), "--arch", "biomedclipseg"], &[]);
    assert_clean_error(&run, "no trained decoder");

    // A BiomedCLIP repo without its BERT repository (mirror lacks it, hub unreachable).
    let partial = tmp.path().join("partial");
    for id in [BIOMEDCLIP, CIDAS] {
        copy_dir(&hub.join(id), &partial.join(id));
    }
    let ckpt = fixture.join("checkpoints/best.ckpt");
    let run = segment(&["--hub-mirror", s(&partial), "--weights", s(&ckpt)], &[]);
    assert_clean_error(&run, BERT);

    // A decoder from the other family (CRIS) for BiomedCLIPSeg.
    let cris = shared("fixtures/tiny_cris/pretrained/cris.pt");
    let run = segment(
        &[
            "--hub-mirror",
            s(&hub),
            "--arch",
            "biomedclipseg",
            "--weights",
            s(&cris),
        ],
        &[],
    );
    assert_clean_error(&run, "is a CRIS checkpoint");

    // A CLIPSeg decoder of the wrong width (the repository's own tiny CLIPSeg).
    let clipseg = common::fixture("clipseg_refined/model.safetensors");
    let run = segment(
        &[
            "--hub-mirror",
            s(&hub),
            "--arch",
            "biomedclipseg-d",
            "--weights",
            s(&clipseg),
        ],
        &[],
    );
    assert_clean_error(&run, "decoder.reduces.0.weight");

    // A truncated checkpoint, and one whose pickle calls os.system.
    let bytes = std::fs::read(&ckpt).unwrap();
    let cut = tmp.path().join("cut.ckpt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let run = segment(&["--hub-mirror", s(&hub), "--weights", s(&cut)], &[]);
    assert_clean_error(&run, "cut.ckpt");
    let evil = common::fixture("hostile/evil_os_system.bin");
    let run = segment(&["--hub-mirror", s(&hub), "--weights", s(&evil)], &[]);
    assert_clean_error(&run, "refuses pickle global");
    // A Lightning checkpoint whose hyper-parameters' unpickling would call os.system
    // (tools/make_biomed_fixtures.py: `touch /tmp/vlsm-pwned-by-evil-ckpt`).
    let marker = Path::new("/tmp/vlsm-pwned-by-evil-ckpt");
    let _ = std::fs::remove_file(marker);
    let evil = common::fixture("biomedclipseg/checkpoints/evil.ckpt");
    let own_hub = common::fixture("biomedclipseg/hub");
    let run = segment(&["--hub-mirror", s(&own_hub), "--weights", s(&evil)], &[]);
    assert_clean_error(&run, "refuses pickle global posix.system");
    assert!(!marker.exists(), "the pickle ran");

    // A CLIPSeg config with a BERT tokenizer.
    let wrong = tmp.path().join("wrong");
    copy_dir(&common::fixture("clipseg_refined"), &wrong);
    for f in ["tokenizer.json", "vocab.json", "merges.txt"] {
        let _ = std::fs::remove_file(wrong.join(f));
    }
    std::fs::copy(hub.join(BERT).join("vocab.txt"), wrong.join("vocab.txt")).unwrap();
    let run = segment(&["--weights", s(&wrong)], &[]);
    assert_clean_error(&run, "BERT WordPiece");

    // --arch that contradicts the folder.
    let run = segment(
        &[
            "--weights",
            s(&common::fixture("clipseg_refined")),
            "--arch",
            "biomedclipseg-d",
        ],
        &[],
    );
    assert_clean_error(&run, "is a CLIPSeg model");
}

#[test]
fn a_2000_word_prompt_is_truncated_with_a_warning() {
    let fixture = shared("fixtures/tiny_biomedclipseg");
    let tmp = tempfile::tempdir().unwrap();
    let prompt = "polyp ".repeat(2000);
    let run = vlsm(
        &[
            "segment",
            s(&fixture.join("image0.png")),
            "-p",
            &prompt,
            "--out",
            s(tmp.path()),
            "--hub-mirror",
            s(&fixture.join("hub")),
            "--weights",
            s(&fixture.join("checkpoints/best.ckpt")),
        ],
        &[("HF_HOME", s(tmp.path()))],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("longer than the model's 256 tokens"),
        "{}",
        stderr(&run)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// Mean `dice_model` per model of a bench run's results.csv.
fn mean_dice_by_model(out: &Path) -> std::collections::BTreeMap<String, f64> {
    let mut reader = csv::Reader::from_path(out.join("results.csv")).unwrap();
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let (model, dice) = (col("model"), col("dice_model"));
    let mut sums: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for r in reader.records() {
        let r = r.unwrap();
        let e = sums.entry(r[model].to_string()).or_default();
        e.0 += r[dice].parse::<f64>().unwrap();
        e.1 += 1;
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

/// BiomedCLIPSeg trains from a random decoder on frozen towers, -D from CIDAS's; both
/// exports load in `segment` and `bench` (one run, one row per model, beside CLIPSeg).
#[test]
fn training_then_bench_and_segment_with_both_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let hub = common::fixture("biomedclipseg/hub");
    let mut bests = Vec::new();
    for arch in ["biomedclipseg", "biomedclipseg-d"] {
        let run = tmp.path().join(arch);
        let out = vlsm(
            &[
                "train",
                "--hub-mirror",
                s(&hub),
                "--arch",
                arch,
                "--data",
                s(&root),
                "--datasets",
                "ellipses",
                "--out",
                s(&run),
                "--prompt",
                "p1",
                "--epochs",
                "200",
                "--batch-size",
                "16",
            ],
            &[],
        );
        assert!(out.status.success(), "{arch}: {}", stderr(&out));
        let err = stderr(&out);
        assert_eq!(
            err.contains("the decoder starts at random"),
            arch == "biomedclipseg",
            "{err}"
        );
        // metrics.csv: epoch, train loss, val loss, val Dice, …; the exported epoch is the
        // trainer's best.
        let best = common::trainers_best(
            std::fs::read_to_string(run.join("metrics.csv"))
                .unwrap()
                .lines()
                .skip(1)
                .map(|l| l.split(',').nth(3).unwrap().parse::<f64>().unwrap()),
        );
        eprintln!("{arch}: best val Dice {best}");
        assert!(best >= 0.8, "{arch}: val Dice reached only {best}");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("model/config.json")).unwrap()).unwrap();
        assert_eq!(config["model_type"], "biomedclipseg");
        bests.push(best);
        // The export segments.
        let seg_out = tmp.path().join(format!("{arch}-seg"));
        let image = root.join("ellipses/images");
        let first = std::fs::read_dir(&image)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let out = vlsm(
            &[
                "segment",
                s(&first),
                "-p",
                "an ellipse",
                "--weights",
                s(&run.join("model")),
                "--out",
                s(&seg_out),
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    // One bench run over the two exports and a CLIPSeg folder: the exports score on the
    // validation split exactly what training measured.
    let bench = tmp.path().join("bench");
    let clipseg = common::fixture("clipseg_refined");
    let out = vlsm(
        &[
            "bench",
            "--data",
            s(&root),
            "--datasets",
            "ellipses",
            "--weights",
            s(&tmp.path().join("biomedclipseg/model")),
            "--weights",
            s(&tmp.path().join("biomedclipseg-d/model")),
            "--weights",
            s(&clipseg),
            "--prompts",
            "p1",
            "--split",
            "val",
            "--out",
            s(&bench),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let means = mean_dice_by_model(&bench);
    assert_eq!(means.len(), 3, "{means:?}");
    for (name, best) in [("biomedclipseg", bests[0]), ("biomedclipseg-d", bests[1])] {
        let mean = means[name];
        assert!(
            (mean - best).abs() < 1e-6,
            "{name}: bench {mean}, training {best}"
        );
    }
    let report = tmp.path().join("report");
    let out = vlsm(&["report", s(&bench), "--out", s(&report)], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // One table per model, and one line each in the plot's legend.
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    let svg = std::fs::read_to_string(report.join("dice_vs_prompt.svg")).unwrap();
    for name in ["biomedclipseg", "biomedclipseg-d", "clipseg_refined"] {
        assert!(
            md.contains(&format!("### {name}\n")),
            "{name} missing: {md}"
        );
        assert!(
            svg.lines().any(|l| l.trim() == name),
            "{name} not in the plot"
        );
    }
}

/// `bench` takes hub models by family and medvlsm checkpoints as they are, and names them.
#[test]
fn bench_resolves_hub_families_and_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let hub = common::fixture("biomedclipseg/hub");
    let ckpt = common::fixture("biomedclipseg/checkpoints/best.ckpt");
    let bench = tmp.path().join("bench");
    let out = vlsm(
        &[
            "bench",
            "--hub-mirror",
            s(&hub),
            "--data",
            s(&root),
            "--datasets",
            "ellipses",
            "--model",
            "biomedclipseg-d",
            "--weights",
            s(&ckpt),
            "--prompts",
            "p0,p1",
            "--split",
            "val",
            "--out",
            s(&bench),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let means = mean_dice_by_model(&bench);
    let names: Vec<&str> = means.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["biomedclipseg-best", "biomedclipseg-d"],
        "{means:?}"
    );
    let out = vlsm(
        &[
            "bench",
            "--data",
            s(&root),
            "--datasets",
            "ellipses",
            "--model",
            "unet:x/y",
            "--out",
            s(&tmp.path().join("b2")),
        ],
        &[],
    );
    assert_clean_error(&out, "not a model family");
}

/// `share` names the family in the link; `reproduce` recomputes it with the same folder and
/// refuses another family's weights.
#[test]
fn share_and_reproduce_a_biomedclipseg_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("d");
    let hub = common::fixture("biomedclipseg/hub");
    let run = vlsm(
        &[
            "convert",
            "--hub-mirror",
            s(&hub),
            "--arch",
            "biomedclipseg-d",
            s(&folder),
        ],
        &[],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let image = common::fixture("images/rgb_64x64.png");
    let run = vlsm(
        &[
            "share",
            s(&image),
            "-p",
            "polyp",
            "-p",
            "",
            "--weights-url",
            "https://example.org/models/d",
            "--weights",
            s(&folder),
        ],
        &[],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let link = common::stdout(&run).trim().to_string();
    let state = vlsm::share::ShareState::from_link(&link).unwrap();
    assert_eq!(state.model.as_deref(), Some("biomedclipseg-d"));
    assert_eq!(state.threshold, 0.5);
    let fingerprints =
        common::reproduced_fingerprints(&vlsm(&["reproduce", &link, "--weights", s(&folder)], &[]));
    assert_eq!(fingerprints.len(), 2);
    let run = vlsm(
        &[
            "reproduce",
            &link,
            "--weights",
            s(&common::fixture("clipseg_refined")),
        ],
        &[],
    );
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("the link's model is biomedclipseg-d"),
        "{}",
        stderr(&run)
    );
}
