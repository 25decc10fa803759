//! `vlsm train` end to end on the synthetic ellipse dataset (`vlsm synthetic`) with the tiny
//! fixture CLIPSeg, on the CPU: learning, export, kill + resume, bad configs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    assert_clean_error, fixture, stderr, stdout, synthetic, train, train_args, vlsm, volume_dataset,
};

/// The mean Dice at model resolution of the model in `model_dir` on the validation split
/// with prompt p1, as `vlsm bench` measures it (`extra`: more bench options).
fn bench_val_dice(root: &Path, model_dir: &Path, out: &Path, extra: &[&str]) -> f64 {
    let args = [
        "bench",
        "--data",
        root.to_str().unwrap(),
        "--datasets",
        "ellipses",
        "--weights",
        model_dir.to_str().unwrap(),
        "--prompts",
        "p1",
        "--split",
        "val",
        "--out",
        out.to_str().unwrap(),
    ];
    let args: Vec<&str> = args.iter().chain(extra).copied().collect();
    let result = vlsm(&args, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    let mut reader = csv::Reader::from_path(out.join("results.csv")).unwrap();
    let col = reader
        .headers()
        .unwrap()
        .iter()
        .position(|h| h == "dice_model")
        .unwrap();
    let dice: Vec<f64> = reader
        .records()
        .map(|r| r.unwrap()[col].parse().unwrap())
        .collect();
    assert_eq!(dice.len(), 16);
    dice.iter().sum::<f64>() / 16.0
}

fn metrics(run: &Path) -> Vec<Vec<f64>> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

/// The learning runs' options: prompt p1, up to 200 epochs (early stopping ends them).
const LEARN: [&str; 6] = ["--prompt", "p1", "--epochs", "200", "--batch-size", "16"];

/// The best validation Dice of a run's log, as the trainer picks it (the exported epoch).
fn best_val_dice(log: &[Vec<f64>]) -> f64 {
    common::trainers_best(log.iter().map(|r| r[3]))
}

#[test]
fn decoder_training_learns_the_task_and_the_export_is_the_trained_model() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let run = tmp.path().join("run");
    let model = fixture("clipseg_refined");
    let out = train(&model, &root, &run, &LEARN);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = metrics(&run);
    let first = log[0][3];
    let best = best_val_dice(&log);
    eprintln!(
        "val Dice: epoch 1 {first:.4}, best {best:.4} after {} epochs",
        log.len()
    );
    assert!(
        first < 0.5,
        "the untrained decoder should not solve the task ({first})"
    );
    assert!(best >= 0.8, "val Dice reached only {best}");
    assert!(
        stdout(&out).contains(&format!("best val Dice {best:.4}")),
        "{}",
        stdout(&out)
    );
    for file in [
        "config.toml",
        "training.png",
        "training.svg",
        "model/config.json",
        "model/model.safetensors",
        "model/vocab.json",
    ] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    // The exported model, benchmarked on the validation split at model resolution, scores
    // exactly the best validation Dice the training measured.
    let mean = bench_val_dice(&root, &run.join("model"), &tmp.path().join("bench"), &[]);
    assert!(
        (mean - best).abs() < 1e-6,
        "exported model: {mean}, training: {best}"
    );
    // bf16 linears (opt-in, `--precision bf16`) keep the fine-tuned model's Dice within half
    // a point; bench.json records the precision.
    if vlsm::gemm_bf16::available() {
        let bf16_out = tmp.path().join("bench-bf16");
        let bf16 = bench_val_dice(
            &root,
            &run.join("model"),
            &bf16_out,
            &["--precision", "bf16"],
        );
        eprintln!("bench val Dice: f32 {mean:.4}, bf16 {bf16:.4}");
        assert!((bf16 - mean).abs() <= 0.005, "f32 {mean}, bf16 {bf16}");
        let config = std::fs::read_to_string(bf16_out.join("bench.json")).unwrap();
        assert!(config.contains("\"precision\": \"bf16\""), "{config}");
    } // int8 weights (`vlsm convert --int8`, per output channel) keep it within half a point
    // too, at a quarter of the file's size.
    let int8_model = tmp.path().join("model-int8");
    let converted = vlsm(
        &[
            "convert",
            run.join("model").to_str().unwrap(),
            int8_model.to_str().unwrap(),
            "--int8",
        ],
        &[],
    );
    assert!(converted.status.success(), "{}", stderr(&converted));
    let size = |dir: &Path| {
        std::fs::metadata(dir.join("model.safetensors"))
            .unwrap()
            .len()
    };
    let (f32_size, int8_size) = (size(&run.join("model")), size(&int8_model));
    let int8 = bench_val_dice(&root, &int8_model, &tmp.path().join("bench-int8"), &[]);
    eprintln!(
        "bench val Dice: f32 {mean:.4}, int8 weights {int8:.4} ({int8_size} bytes, f32 {f32_size})"
    );
    assert!((int8 - mean).abs() <= 0.005, "f32 {mean}, int8 {int8}");
    assert!(int8_size * 3 < f32_size, "{int8_size} vs {f32_size}");
}

/// Mixed precision (float16 with loss scaling, bfloat16) learns the task as float32 does, and
/// exports float32 weights that score, in float32, what the half-precision validation
/// measured, up to rounding.
#[test]
fn mixed_precision_training_learns_the_task() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let model = fixture("clipseg_refined");
    for precision in ["f16", "bf16"] {
        let run = tmp.path().join(precision);
        let options = [&LEARN[..], &["--precision", precision]].concat();
        let out = train(&model, &root, &run, &options);
        assert!(out.status.success(), "{}", stderr(&out));
        let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert!(
            saved.contains(&format!("precision = \"{precision}\"")),
            "{saved}"
        );
        let log = metrics(&run);
        let best = best_val_dice(&log);
        eprintln!(
            "{precision}: best val Dice {best:.4} in {} epochs",
            log.len()
        );
        assert!(best >= 0.8, "{precision}: val Dice reached only {best}");
        let exported = std::fs::read(run.join("model/model.safetensors")).unwrap();
        let exported = safetensors::SafeTensors::deserialize(&exported).unwrap();
        assert_eq!(
            exported.tensor("decoder.film_mul.weight").unwrap().dtype(),
            safetensors::Dtype::F32
        );
        let mean = bench_val_dice(
            &root,
            &run.join("model"),
            &tmp.path().join(format!("b{precision}")),
            &[],
        );
        assert!(
            (mean - best).abs() < 0.005,
            "{precision}: exported model {mean}, training {best}"
        );
    }
}

#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let model = fixture("clipseg_simple");
    let args = |run: &Path| {
        train_args(
            &model,
            &root,
            run,
            &[
                "--prompt",
                "p2",
                "--epochs",
                "40",
                "--batch-size",
                "8",
                "--lr",
                "0.005",
            ],
        )
    };
    let whole = tmp.path().join("whole");
    let a = args(&whole);
    let out = vlsm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = tmp.path().join("killed");
    let a = args(&killed);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlsm"))
        .args(&a)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while metrics(&killed).len() < 8 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done = metrics(&killed).len();
    assert!(
        (8..40).contains(&done),
        "the kill should land mid-run ({done} epochs)"
    );
    // Without --resume the folder is refused; with other options too.
    let out = vlsm(&a.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert_clean_error(&out, "pass --resume");
    let mut other: Vec<&str> = a.iter().map(String::as_str).collect();
    other.extend(["--resume", "--loss", "dice-bce"]);
    let out = vlsm(&other, &[]);
    assert_clean_error(&out, "other options");
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
            "checkpoint/last/decoder.safetensors",
            "checkpoint/best/decoder.safetensors",
            "model/model.safetensors",
        ],
    );
}

#[test]
fn bad_training_setups_are_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let model = fixture("clipseg_simple");
    let run = tmp.path().join("run");
    let base = |extra: &[&str]| {
        let mut a = vec!["--epochs", "1"];
        a.extend_from_slice(extra);
        train(&model, &root, &run, &a)
    };
    let config = tmp.path().join("bad.toml");
    std::fs::write(&config, "batch_sise = 4\n").unwrap();
    assert_clean_error(
        &base(&["--config", config.to_str().unwrap()]),
        "unknown field `batch_sise`",
    );
    std::fs::write(&config, "lr = \"fast\"\n").unwrap();
    assert_clean_error(
        &base(&["--config", config.to_str().unwrap()]),
        "invalid type",
    );
    assert_clean_error(
        &base(&["--batch-size", "0"]),
        "batch_size must be at least 1",
    );
    assert_clean_error(&base(&["--loss", "focal"]), "expected dice or dice-bce");
    assert_clean_error(&base(&["--precision", "f8"]), "expected f32, f16 or bf16");
    std::fs::write(&config, "precision = \"fp8\"\n").unwrap();
    assert_clean_error(
        &base(&["--config", config.to_str().unwrap()]),
        "unknown variant `fp8`",
    );
    assert_clean_error(&base(&["--prompt", "p12x"]), "expected p0…p9 or random");
    assert_clean_error(&base(&["--prompt", "p5"]), "has no p5");
    assert_clean_error(&base(&["--resume"]), "has no config.toml");
    let out = vlsm(
        &train_args(&model, &root, &run, &[])
            .iter()
            .map(|a| if a == "ellipses" { "nope" } else { a.as_str() })
            .collect::<Vec<_>>(),
        &[],
    );
    assert_clean_error(&out, "no dataset `nope`");
    // A good config file is used, and the effective recipe saved with the run.
    std::fs::write(
        &config,
        "seed = 7\nmin_epochs = 1\nprecision = \"bf16\"\n[loss]\nkind = \"dice_bce\"\nbce_weight = 0.5\n",
    )
    .unwrap();
    let run2 = tmp.path().join("run2");
    let out = train(
        &model,
        &root,
        &run2,
        &["--epochs", "2", "--config", config.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = std::fs::read_to_string(run2.join("config.toml")).unwrap();
    assert!(
        saved.contains("seed = 7")
            && saved.contains("bce_weight = 0.5")
            && saved.contains("precision = \"bf16\"")
            && saved.contains("epochs = 2"),
        "{saved}"
    );
    // The run's config.toml is a --config file: it alone (with --out) starts the same run
    // again, which gets the same config.
    let run3 = tmp.path().join("run3");
    let out = vlsm(
        &[
            "train",
            "--config",
            run2.join("config.toml").to_str().unwrap(),
            "--out",
            run3.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(run3.join("config.toml")).unwrap(),
        saved
    );
    // Two trained runs are benchmarked side by side, each named by its run.
    let out = vlsm(
        &[
            "bench",
            "--data",
            root.to_str().unwrap(),
            "--datasets",
            "ellipses",
            "--weights",
            run2.join("model").to_str().unwrap(),
            "--weights",
            run3.join("model").to_str().unwrap(),
            "--prompts",
            "p1",
            "--out",
            tmp.path().join("bench").to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = std::fs::read_to_string(tmp.path().join("bench/results.csv")).unwrap();
    assert!(csv.contains("\nrun2,") && csv.contains("\nrun3,"), "{csv}");
    assert_clean_error(
        &vlsm(&["train", "--out", run.to_str().unwrap()], &[]),
        "--data ROOT is required",
    );
}

#[test]
fn full_fine_tuning_trains_the_towers_and_keeps_the_position_table() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    synthetic(&root);
    let run = tmp.path().join("run");
    let model = fixture("clipseg_refined");
    let out = train(
        &model,
        &root,
        &run,
        &[
            "--prompt",
            "p1",
            "--epochs",
            "12",
            "--batch-size",
            "16",
            "--full",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let log = metrics(&run);
    assert_eq!(log.len(), 12);
    assert!(
        log[11][3] > log[0][3] + 0.02,
        "val Dice {} → {}",
        log[0][3],
        log[11][3]
    );
    let base = std::fs::read(model.join("model.safetensors")).unwrap();
    let base = safetensors::SafeTensors::deserialize(&base).unwrap();
    let tuned = std::fs::read(run.join("model/model.safetensors")).unwrap();
    let tuned = safetensors::SafeTensors::deserialize(&tuned).unwrap();
    let same = |key: &str| base.tensor(key).unwrap().data() == tuned.tensor(key).unwrap().data();
    for key in [
        "clip.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "clip.vision_model.embeddings.patch_embedding.weight",
        "clip.text_model.encoder.layers.0.mlp.fc1.weight",
        "clip.text_projection.weight",
        "decoder.film_mul.weight",
    ] {
        assert!(!same(key), "{key} did not train");
    }
    assert!(same(
        "clip.vision_model.embeddings.position_embedding.weight"
    ));
    assert_eq!(base.names().len(), tuned.names().len());
}

/// A NIfTI volume with its label volume trains slice by slice: `vlsm prompts` writes the
/// train and val splits' slice entries, and `vlsm train` reads each slice's picture and
/// label slice (one sample per entry).
#[test]
fn nifti_volumes_train_slice_by_slice() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let dir = volume_dataset(&root);
    for (split, slices) in [("train", "axial:0-9"), ("val", "axial:10-15")] {
        let out = vlsm(
            &[
                "prompts",
                dir.to_str().unwrap(),
                "--class",
                "lesion",
                "--split",
                split,
                "--slices",
                slices,
                "--window",
                "lung",
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let run = tmp.path().join("run");
    let mut args = train_args(
        &fixture("clipseg_refined"),
        &root,
        &run,
        &["--prompt", "p1", "--epochs", "2", "--batch-size", "4"],
    );
    let at = args.iter().position(|a| a == "ellipses").unwrap();
    args[at] = "ctvol".into();
    let out = vlsm(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = metrics(&run);
    assert_eq!(log.len(), 2, "{}", stdout(&out));
    assert!(log.iter().all(|r| r[3].is_finite()), "{log:?}");
    assert!(
        format!("{}{}", stdout(&out), stderr(&out)).contains("10 train"),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
}
