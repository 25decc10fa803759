//! CRIS from the command line: `segment` from the shared medvlsm fixture's files and from
//! vlsm's own, a checkpoint file alone (CIDAS's tokenizer through the hub mirror), `convert`,
//! `bench` beside the other families with each model's threshold, `share` / `reproduce`, and
//! the bad inputs a user can hand it.

mod common;

use std::path::{Path, PathBuf};

use common::{
    assert_clean_error, max_abs_diff, read_npy, s, shared, stderr, synthetic, train, train_args,
    vlsm,
};

/// A CRIS model folder from the shared fixture's files as they are (`checkpoint` is
/// `pretrained/cris.pt` or `checkpoints/best.ckpt`), its CLIP tokenizer, and a config.json
/// holding the manifest's `cris_net_args` (medvlsm's constructor arguments).
fn shared_folder(to: &Path, checkpoint: &str) -> PathBuf {
    let f = shared("fixtures/tiny_cris");
    std::fs::create_dir_all(to).unwrap();
    let name = Path::new(checkpoint).file_name().unwrap();
    std::fs::copy(f.join(checkpoint), to.join(name)).unwrap();
    for entry in std::fs::read_dir(f.join("hub/CIDAS/clipseg-rd64-refined")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.join("manifest.json")).unwrap()).unwrap();
    let mut args = m["cris_net_args"].clone();
    args["model_type"] = "cris".into();
    std::fs::write(to.join("config.json"), args.to_string()).unwrap();
    to.to_path_buf()
}

/// vlsm's own fixture (416 px, full CLIP vocabulary) as a folder: cris.pt, config.json,
/// CLIP's tokenizer.
fn own_folder(to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for (from, name) in [
        (common::fixture("cris/cris.pt"), "cris.pt"),
        (common::fixture("cris/config.json"), "config.json"),
        (common::fixture("tokenizer/vocab.json"), "vocab.json"),
        (common::fixture("tokenizer/merges.txt"), "merges.txt"),
    ] {
        std::fs::copy(from, to.join(name)).unwrap();
    }
    to.to_path_buf()
}

fn own_prompts() -> Vec<String> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(common::fixture("cris/manifest.json")).unwrap())
            .unwrap();
    m["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["prompt"].as_str().unwrap().to_string())
        .collect()
}

/// `vlsm segment` with `weights` (and extra global args) on one image, the prompts given;
/// returns the saved logits.
fn segment_logits(global: &[&str], weights: &Path, image: &Path, prompts: &[String]) -> Vec<f32> {
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("logits.npy");
    let mut args: Vec<&str> = global.to_vec();
    args.extend([
        "segment",
        "--weights",
        s(weights),
        s(image),
        "--out",
        s(tmp.path()),
        "--save-logits",
        s(&npy),
    ]);
    for p in prompts {
        args.extend(["-p", p.as_str()]);
    }
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    read_npy(&npy).1
}

const TOL: f32 = 3e-4;

#[test]
fn segment_reproduces_the_shared_fixture_from_its_files() {
    let f = shared("fixtures/tiny_cris");
    let prompts = vec![
        String::new(),
        "one small pink circle polyp !; located in right of the image".to_string(),
    ];
    let expected = common::reference(&f.join("outputs_f64.safetensors"), "logits");
    let tmp = tempfile::tempdir().unwrap();
    for checkpoint in ["pretrained/cris.pt", "checkpoints/best.ckpt"] {
        let dir = shared_folder(&tmp.path().join(checkpoint.replace('/', "-")), checkpoint);
        let got = segment_logits(&[], &dir, &f.join("image0.png"), &prompts);
        let d = max_abs_diff(&got, &expected);
        assert!(d <= TOL, "{checkpoint}: max |Δlogit| {d:e}");
    }
}

#[test]
fn a_checkpoint_file_alone_takes_cidas_tokenizer_from_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = own_folder(&tmp.path().join("model"));
    // Only the checkpoint and its config: the tokenizer comes from CIDAS's repo.
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    std::fs::remove_file(dir.join("merges.txt")).unwrap();
    let mirror = tmp.path().join("mirror");
    let cidas = mirror.join("CIDAS/clipseg-rd64-refined");
    std::fs::create_dir_all(&cidas).unwrap();
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(common::fixture("tokenizer").join(name), cidas.join(name)).unwrap();
    }
    let expected = common::reference(&common::fixture("cris/reference.safetensors"), "f32.logits");
    let got = segment_logits(
        &["--hub-mirror", s(&mirror)],
        &dir.join("cris.pt"),
        &common::fixture("images/rgb_150x100.png"),
        &own_prompts(),
    );
    let d = max_abs_diff(&got, &expected);
    assert!(d <= TOL, "max |Δlogit| {d:e}");

    // Without a config beside it, the study's config is used, and a tiny checkpoint does not
    // fit it: one line saying what to do.
    let alone = tmp.path().join("alone.pt");
    std::fs::copy(shared("fixtures/tiny_cris/pretrained/cris.pt"), &alone).unwrap();
    let out = vlsm(
        &[
            "--hub-mirror",
            s(&mirror),
            "segment",
            "--weights",
            s(&alone),
            s(&common::fixture("images/rgb_64x64.png")),
            "-p",
            "polyp",
        ],
        &[],
    );
    assert_clean_error(&out, "put a config.json with its arguments");
    // Another family's --arch is refused by name.
    let out = vlsm(
        &[
            "segment",
            "--arch",
            "clipseg",
            "--weights",
            s(&alone),
            s(&common::fixture("images/rgb_64x64.png")),
            "-p",
            "polyp",
        ],
        &[],
    );
    assert_clean_error(&out, "is a CRIS checkpoint");
}

#[test]
fn convert_writes_a_folder_that_segments_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shared_folder(&tmp.path().join("ckpt"), "checkpoints/best.ckpt");
    let image = shared("fixtures/tiny_cris/image0.png");
    let prompts = vec!["a polyp".to_string(), String::new()];
    let before = segment_logits(&[], &dir, &image, &prompts);
    for (flag, tol) in [(None, 1e-6), (Some("--fp16"), 0.5)] {
        let out_dir = tmp.path().join(format!("converted{}", flag.unwrap_or("")));
        let mut args = vec!["convert", s(&dir), s(&out_dir)];
        args.extend(flag);
        let out = vlsm(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        for name in [
            "model.safetensors",
            "config.json",
            "vocab.json",
            "merges.txt",
        ] {
            assert!(out_dir.join(name).is_file(), "{name} missing");
        }
        let w = vlsm::Weights::from_safetensors_file(&out_dir.join("model.safetensors")).unwrap();
        assert!(
            w.contains("backbone.visual.conv1.weight"),
            "keys without `net.`"
        );
        assert!(!w.keys().any(|k| k.ends_with("num_batches_tracked")));
        let after = segment_logits(&[], &out_dir, &image, &prompts);
        let d = max_abs_diff(&before, &after);
        assert!(d <= tol, "{flag:?}: max |Δlogit| {d:e}");
    }
}

/// One bench run with CRIS, CLIPSeg and BiomedCLIPSeg-D: each scored at its own study
/// threshold (0.35 for CRIS, 0.5 for the others) unless --threshold sets one, and the report
/// says which.
#[test]
fn bench_scores_each_family_at_its_threshold() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let cris = shared_folder(&tmp.path().join("cris"), "pretrained/cris.pt");
    let hub = common::fixture("biomedclipseg/hub");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--hub-mirror",
            s(&hub),
            "--data",
            s(&root),
            "--datasets",
            "ellipses",
            "--weights",
            s(&cris),
            "--weights",
        ];
        let clipseg = common::fixture("clipseg_refined");
        let clipseg = clipseg.to_str().unwrap().to_string();
        args.push(Box::leak(clipseg.into_boxed_str()));
        args.extend([
            "--model",
            "biomedclipseg-d",
            "--prompts",
            "p0,p1",
            "--split",
            "val",
            "--out",
            s(out),
        ]);
        args.extend(extra);
        vlsm(&args, &[])
    };
    let bench = tmp.path().join("bench");
    let out = run(&bench, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bench.join("bench.json")).unwrap()).unwrap();
    let thresholds: Vec<(String, String)> = config["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["arch"].as_str().unwrap().to_string(),
                format!("{:.2}", m["threshold"].as_f64().unwrap()),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = [
        ("cris", "0.35"),
        ("clipseg", "0.50"),
        ("biomedclipseg-d", "0.50"),
    ]
    .map(|(a, t)| (a.to_string(), t.to_string()))
    .into();
    assert_eq!(thresholds, expected);
    assert!(config["threshold"].is_null());
    let mut reader = csv::Reader::from_path(bench.join("results.csv")).unwrap();
    let models: std::collections::BTreeSet<String> = reader
        .records()
        .map(|r| r.unwrap()[0].to_string())
        .collect();
    assert_eq!(models.len(), 3, "{models:?}");
    let out = vlsm(&["report", s(&bench)], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let md = std::fs::read_to_string(bench.join("report.md")).unwrap();
    assert!(
        md.contains(
            "each model's study threshold (cris 0.35, clipseg_refined 0.5, biomedclipseg-d 0.5"
        ),
        "{md}"
    );
    // --threshold: every model at it, said so; resuming without it is refused.
    let fixed = tmp.path().join("fixed");
    let out = run(&fixed, &["--threshold", "0.4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = vlsm(&["report", s(&fixed)], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let md = std::fs::read_to_string(fixed.join("report.md")).unwrap();
    assert!(md.contains("> 0.4 for every model (--threshold)"), "{md}");
    let out = run(&fixed, &[]);
    assert_clean_error(
        &out,
        "threshold 0.4 (--threshold) vs 0.35,0.5,0.5 (each model's)",
    );
}

/// `share` names CRIS and its 0.35 threshold in the link; `reproduce` recomputes the same
/// fingerprints from the same folder.
#[test]
fn share_and_reproduce_a_cris_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shared_folder(&tmp.path().join("m"), "pretrained/cris.pt");
    let converted = tmp.path().join("web");
    let out = vlsm(&["convert", s(&dir), s(&converted)], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Small: the link carries the image, and reproduce takes it as one argument.
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
            "https://example.org/models/cris",
            "--weights",
            s(&converted),
        ],
        &[],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let link = common::stdout(&run).trim().to_string();
    let state = vlsm::share::ShareState::from_link(&link).unwrap();
    assert_eq!(state.model.as_deref(), Some("cris"));
    assert_eq!(state.threshold, 0.35);
    let fingerprints = common::reproduced_fingerprints(&vlsm(
        &["reproduce", &link, "--weights", s(&converted)],
        &[],
    ));
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
        stderr(&run).contains("the link's model is cris"),
        "{}",
        stderr(&run)
    );
}

/// `vlsm train` fine-tunes CRIS whole with the study's CRIS recipe (here one short epoch),
/// exports vlsm's CRIS folder, and `segment` loads it; `--accumulate` takes the same options.
#[test]
fn train_then_segment_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let base = shared_folder(&tmp.path().join("base"), "checkpoints/best.ckpt");
    let run = tmp.path().join("run");
    let out = train(
        &base,
        &root,
        &run,
        &["--epochs", "1", "--batch-size", "16", "--accumulate", "2"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    for line in [
        "lr = 0.00002",
        "threshold = 0.349999",
        "accumulate = 2",
        "batch_size = 16",
    ] {
        assert!(config.contains(line), "{line} not in\n{config}");
    }
    let model = run.join("model");
    for name in [
        "model.safetensors",
        "config.json",
        "vocab.json",
        "merges.txt",
    ] {
        assert!(model.join(name).is_file(), "{name} missing from the export");
    }
    let image = shared("fixtures/tiny_cris/image0.png");
    let prompts = vec!["a polyp".to_string()];
    let trained = segment_logits(&[], &model, &image, &prompts);
    let before = segment_logits(&[], &base, &image, &prompts);
    assert!(
        max_abs_diff(&trained, &before) > 1e-6,
        "training changed nothing"
    );
}

/// A CRIS run killed between epochs and resumed ends with the same log and weights as one
/// that ran through: the checkpoint carries the BatchNorm running statistics, and the
/// dropout masks (0.2, active) are drawn from a generator seeded per step.
#[test]
fn a_killed_cris_run_resumes_to_the_same_weights() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let base = shared_folder(&tmp.path().join("base"), "pretrained/cris.pt");
    let args = |run: &Path| {
        train_args(
            &base,
            &root,
            run,
            &["--epochs", "4", "--batch-size", "16", "--lr", "0.001"],
        )
    };
    let metrics = |run: &Path| {
        std::fs::read_to_string(run.join("metrics.csv"))
            .unwrap_or_default()
            .lines()
            .count()
            .saturating_sub(1)
    };
    let whole = tmp.path().join("whole");
    let a = args(&whole);
    let out = vlsm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = tmp.path().join("killed");
    let a = args(&killed);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vlsm"))
        .args(&a)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while metrics(&killed) < 1 && start.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = metrics(&killed);
    assert!(
        (1..4).contains(&done),
        "the kill should land mid-run ({done} epochs)"
    );
    let mut resume: Vec<&str> = a.iter().map(String::as_str).collect();
    resume.push("--resume");
    let out = vlsm(&resume, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("resuming after epoch"),
        "{}",
        stderr(&out)
    );
    common::assert_same_run(
        &whole,
        &killed,
        &[
            "checkpoint/last/model.safetensors",
            "model/model.safetensors",
        ],
    );
}

/// Mixed precision trains CRIS too (float16 with loss scaling, bfloat16), BatchNorm's
/// statistics kept in float32.
#[test]
fn cris_trains_in_mixed_precision() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let base = shared_folder(&tmp.path().join("base"), "pretrained/cris.pt");
    for precision in ["f16", "bf16"] {
        let run = tmp.path().join(precision);
        let out = train(
            &base,
            &root,
            &run,
            &[
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--precision",
                precision,
            ],
        );
        assert!(out.status.success(), "{precision}: {}", stderr(&out));
        assert!(run.join("model/model.safetensors").is_file(), "{precision}");
        let log = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
        let val_loss: f64 = log
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert!(val_loss.is_finite(), "{precision}: {log}");
    }
}
