//! `vlsm bench`, `vlsm bench merge`, `vlsm report` and `vlsm prompts` end to end, on the real
//! Kvasir sample in ../shared/data/samples/kvasir with the tiny fixture CLIPSeg.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{assert_clean_error, fixture, stderr, stdout, vlsm, volume_dataset};
use serde_json::Value;

fn kvasir() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/samples/kvasir");
    assert!(
        p.join("anns/test.json").is_file(),
        "{} is missing: these tests need the project's shared/ folder beside the checkout",
        p.display()
    );
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// `<root>/kvasir`: the sample's images and masks, with its 5 official entries repeated
/// `copies` times (so a run lasts long enough to be killed part-way).
fn dataset(root: &Path, copies: usize) -> PathBuf {
    let dir = root.join("kvasir");
    copy_dir(&kvasir(), &dir);
    let entries: Vec<Value> =
        serde_json::from_slice(&std::fs::read(kvasir().join("anns/test.json")).unwrap()).unwrap();
    let repeated: Vec<Value> = (0..copies).flat_map(|_| entries.clone()).collect();
    std::fs::write(
        dir.join("anns/test.json"),
        serde_json::to_vec(&repeated).unwrap(),
    )
    .unwrap();
    dir
}

fn lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

fn bench_args<'a>(root: &'a str, model: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "bench",
        "--data",
        root,
        "--datasets",
        "kvasir",
        "--weights",
        model,
        "--prompts",
        "p1,p6,p7",
        "--out",
        out,
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn killed_run_resumes_to_the_same_rows_and_shards_merge_to_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    dataset(&root, 6); // 30 entries × (p1 + p6 + 5 members of p7) = 210 rows
    let root_s = root.to_str().unwrap();
    let model = fixture("clipseg_refined");
    let model_s = model.to_str().unwrap();

    // An uninterrupted run.
    let whole = tmp.path().join("whole");
    let out = vlsm(
        &bench_args(root_s, model_s, whole.to_str().unwrap(), &[]),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let whole_csv = std::fs::read(whole.join("results.csv")).unwrap();
    assert_eq!(lines(&whole.join("results.csv")), 211, "header + 210 rows");
    assert!(
        stderr(&out).contains("30 images encoded 30 times"),
        "{}",
        stderr(&out)
    );

    // The same run, killed (SIGKILL) part-way, then a half-written row left at the end.
    let killed = tmp.path().join("killed");
    let results = killed.join("results.csv");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vlsm"))
        .args(bench_args(root_s, model_s, killed.to_str().unwrap(), &[]))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while lines(&results) < 30 && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let kept = lines(&results) - 1;
    assert!(
        (29..210).contains(&kept),
        "the kill should land mid-run ({kept} rows written)"
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(killed.join("bench.json")).unwrap()).unwrap();
    assert_eq!(config["finished"], false);
    let mut bytes = std::fs::read(&results).unwrap();
    let next_row = whole_csv
        .split(|&b| b == b'\n')
        .nth(kept + 1)
        .unwrap()
        .to_vec();
    bytes.extend_from_slice(&next_row[..next_row.len() / 2]);
    std::fs::write(&results, &bytes).unwrap();

    let out = vlsm(
        &bench_args(root_s, model_s, killed.to_str().unwrap(), &[]),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("dropped a half-written row"), "{err}");
    assert!(
        err.contains(&format!("resuming: {kept} rows already in"))
            && err.contains(&format!("{} to do", 210 - kept)),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&results).unwrap(),
        whole_csv,
        "resumed results equal the uninterrupted run's, row for row"
    );
    // Rerunning a finished run recomputes nothing.
    let out = vlsm(
        &bench_args(root_s, model_s, killed.to_str().unwrap(), &[]),
        &[],
    );
    assert!(
        out.status.success() && stderr(&out).contains("bench: 0 rows"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&results).unwrap(), whole_csv);
    // Resuming with other options is refused (another precision only where bf16 runs).
    let mut refusals = vec![(
        ["--threshold", "0.4"],
        "threshold 0.5 (each model's) vs 0.4 (--threshold)",
    )];
    if vlsm::gemm_bf16::available() {
        refusals.push((["--precision", "bf16"], "precision f32 vs bf16"));
    }
    for (options, difference) in refusals {
        let out = vlsm(
            &bench_args(root_s, model_s, killed.to_str().unwrap(), &options),
            &[],
        );
        assert_clean_error(&out, difference);
    }

    // Two shards, merged, equal the unsharded run.
    let mut shard_dirs = Vec::new();
    for k in 1..=2 {
        let dir = tmp.path().join(format!("shard{k}"));
        let shard = format!("{k}/2");
        let out = vlsm(
            &bench_args(root_s, model_s, dir.to_str().unwrap(), &["--shard", &shard]),
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let rows = lines(&dir.join("results.csv")) - 1;
        assert!((70..140).contains(&rows), "shard {k} has {rows} rows");
        shard_dirs.push(dir.to_str().unwrap().to_string());
    }
    let merged = tmp.path().join("merged");
    let out = vlsm(
        &[
            "bench",
            "merge",
            &shard_dirs[0],
            &shard_dirs[1],
            "--out",
            merged.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(merged.join("results.csv")).unwrap(),
        whole_csv
    );
    // Refusals: a missing shard, the same shard twice, a shard made with other options.
    let out = vlsm(
        &[
            "bench",
            "merge",
            &shard_dirs[0],
            "--out",
            tmp.path().join("m2").to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "shard 2/2 missing");
    // With --partial, a missing shard (even its folder) is a warning: the rows of shard 1.
    let gone = tmp.path().join("gone");
    let out = vlsm(
        &[
            "bench",
            "merge",
            &shard_dirs[0],
            gone.to_str().unwrap(),
            "--partial",
            "--out",
            tmp.path().join("m1").to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("gone does not exist") && stderr(&out).contains("shard 2/2 missing"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        lines(&tmp.path().join("m1/results.csv")),
        lines(&Path::new(&shard_dirs[0]).join("results.csv"))
    );
    let out = vlsm(
        &[
            "bench",
            "merge",
            &shard_dirs[0],
            &shard_dirs[0],
            "--out",
            tmp.path().join("m3").to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "are both shard 1/2");
    let other = tmp.path().join("other2");
    let out = vlsm(
        &bench_args(
            root_s,
            model_s,
            other.to_str().unwrap(),
            &["--shard", "2/2", "--nsd-tolerance", "1"],
        ),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = vlsm(
        &[
            "bench",
            "merge",
            &shard_dirs[0],
            other.to_str().unwrap(),
            "--out",
            tmp.path().join("m4").to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "NSD tolerance 2 vs 1");

    // The report of the resumed run: tables, JSON, plots.
    let out = vlsm(&["report", killed.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let md = std::fs::read_to_string(killed.join("report.md")).unwrap();
    assert!(md.contains("| dataset | p1 | p6 | p7 |"), "{md}");
    assert!(
        md.contains("| clipseg_refined | kvasir | p7 | 30 |"),
        "{md}"
    );
    assert!(md.contains("List-valued prompts"), "{md}");
    let json: Value =
        serde_json::from_slice(&std::fs::read(killed.join("report.json")).unwrap()).unwrap();
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3);
    let p7 = cells.iter().find(|c| c["prompt_id"] == "p7").unwrap();
    assert_eq!(p7["members"].as_array().unwrap().len(), 5);
    let dice = p7["dice"]["mean"].as_f64().unwrap();
    let (lo, hi) = (
        p7["dice"]["ci_low"].as_f64().unwrap(),
        p7["dice"]["ci_high"].as_f64().unwrap(),
    );
    assert!(lo <= dice && dice <= hi && (0.0..=1.0).contains(&dice));
    let png = image::open(killed.join("dice_vs_prompt.png")).unwrap();
    assert!(png.width() >= 400);
    let svg = std::fs::read_to_string(killed.join("dice_vs_prompt.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("kvasir") && svg.contains("clipseg_refined"));
}

#[test]
fn report_means_equal_the_rows() {
    // The report's per-prompt mean Dice is the mean over images of the per-image member
    // means, recomputed here from results.csv.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    dataset(&root, 1);
    let out_dir = tmp.path().join("out");
    let model = fixture("clipseg_simple");
    let out = vlsm(
        &bench_args(
            root.to_str().unwrap(),
            model.to_str().unwrap(),
            out_dir.to_str().unwrap(),
            &[],
        ),
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = vlsm(
        &[
            "report",
            out_dir.join("results.csv").to_str().unwrap(),
            "--resolution",
            "model",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut reader = csv::Reader::from_path(out_dir.join("results.csv")).unwrap();
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let mut per_image: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    for r in reader.records() {
        let r = r.unwrap();
        per_image
            .entry((r[col("prompt_id")].to_string(), r[col("entry")].to_string()))
            .or_default()
            .push(r[col("dice_model")].parse().unwrap());
    }
    let json: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["resolution"], "model");
    for p in ["p1", "p6", "p7"] {
        let means: Vec<f64> = per_image
            .iter()
            .filter(|((id, _), _)| id == p)
            .map(|(_, v)| v.iter().sum::<f64>() / v.len() as f64)
            .collect();
        assert_eq!(means.len(), 5);
        let expected = means.iter().sum::<f64>() / 5.0;
        let cell = json["cells"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["prompt_id"] == p)
            .unwrap();
        let got = cell["dice"]["mean"].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-12,
            "{p}: report {got}, rows {expected}"
        );
    }
}

#[test]
fn bad_data_is_reported_per_entry_and_the_run_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let dir = dataset(&root, 1);
    let mut entries: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir.join("anns/test.json")).unwrap()).unwrap();
    // Entry 1: a missing image; entry 2: a mask of another size; entry 3: no p6;
    // entry 5: not an entry at all.
    entries[1]["img_name"] = "missing.jpg".into();
    let small = image::GrayImage::new(10, 10);
    small.save(dir.join("masks/small.png")).unwrap();
    entries[2]["mask_name"] = "small.png".into();
    entries[3]["prompts"].as_object_mut().unwrap().remove("p6");
    entries.push(serde_json::json!({"img_name": 3}));
    // Entries 6 and 7: a decompression bomb as the image, then as the mask.
    let bomb = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/hostile/bomb_30000x30000_1bit.png");
    std::fs::copy(&bomb, dir.join("images/bomb.png")).unwrap();
    std::fs::copy(&bomb, dir.join("masks/bomb.png")).unwrap();
    let mut bomb_image = entries[0].clone();
    bomb_image["img_name"] = "bomb.png".into();
    let mut bomb_mask = entries[0].clone();
    bomb_mask["mask_name"] = "bomb.png".into();
    entries.extend([bomb_image, bomb_mask]);
    std::fs::write(
        dir.join("anns/test.json"),
        serde_json::to_vec(&entries).unwrap(),
    )
    .unwrap();
    let out_dir = tmp.path().join("out");
    let model = fixture("clipseg_simple");
    let args = bench_args(
        root.to_str().unwrap(),
        model.to_str().unwrap(),
        out_dir.to_str().unwrap(),
        &[],
    );
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("with errors"), "{}", stderr(&out));
    let csv = std::fs::read_to_string(out_dir.join("results.csv")).unwrap();
    let errors: Vec<&str> = csv.lines().filter(|l| !l.ends_with(',')).skip(1).collect();
    let text = errors.join("\n");
    assert!(text.contains("missing.jpg not found"), "{text}");
    assert!(text.contains("is 10×10 but image"), "{text}");
    assert!(text.contains("entry 3 has no p6"), "{text}");
    assert!(text.contains("entry 5:"), "{text}");
    assert!(
        text.contains("bomb.png: image: 30000×30000 = 900000000 pixels"),
        "{text}"
    );
    // 7 rows each for the missing image, the wrong-size mask and the two bombs, 1 for the
    // missing p6, 1 for the unreadable entry.
    assert_eq!(errors.len(), 30, "{text}");
    // Entry 3's other prompts and entries 0 and 4 are scored.
    assert_eq!(csv.lines().count() - 1 - errors.len(), 7 * 3 - 1);
    let out = vlsm(&["report", out_dir.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(
        md.contains("rows with errors: 30") && md.contains("## Errors"),
        "{md}"
    );

    // After fixing the data, --retry-errors recomputes exactly the failed rows.
    entries[1]["img_name"] = entries[0]["img_name"].clone();
    std::fs::write(
        dir.join("anns/test.json"),
        serde_json::to_vec(&entries).unwrap(),
    )
    .unwrap();
    let mut retry = args.clone();
    retry.push("--retry-errors");
    let out = vlsm(&retry, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("retrying 30 rows"),
        "{}",
        stderr(&out)
    );
    // The bombs are still refused; the run still finishes.
    assert!(stderr(&out).contains("bench: 30 rows"), "{}", stderr(&out));

    // Bad invocations: one line each.
    let out = vlsm(
        &[
            "bench",
            "--data",
            root.to_str().unwrap(),
            "--datasets",
            "nope",
            "--weights",
            model.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "no dataset `nope`");
    let out = vlsm(
        &[
            "bench",
            "--data",
            "/nonexistent",
            "--weights",
            model.to_str().unwrap(),
        ],
        &[],
    );
    assert_clean_error(&out, "not a folder");
    let out = vlsm(
        &[
            "bench",
            "--data",
            root.to_str().unwrap(),
            "--weights",
            "/nonexistent",
        ],
        &[],
    );
    assert_clean_error(&out, "/nonexistent: no such file or folder");
    let out = vlsm(
        &["bench", "--data", root.to_str().unwrap(), "--shard", "3/2"],
        &[],
    );
    assert_clean_error(&out, "1 ≤ K ≤ N");
    let out = vlsm(&["report", tmp.path().join("none").to_str().unwrap()], &[]);
    assert_clean_error(&out, "no results file");
}

#[test]
fn prompts_reproduce_the_official_kvasir_size_count_and_location_words() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mine");
    copy_dir(&kvasir().join("images"), &dir.join("images"));
    copy_dir(&kvasir().join("masks"), &dir.join("masks"));
    let out = vlsm(
        &[
            "prompts",
            dir.to_str().unwrap(),
            "--class",
            "polyp",
            "--description",
            "a growth",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("left out: shape (give --shape), colour (give --color)"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).starts_with("image\tcount\tsize\tlocation"));
    let ours: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir.join("anns/test.json")).unwrap()).unwrap();
    let official: Vec<Value> =
        serde_json::from_slice(&std::fs::read(kvasir().join("anns/test.json")).unwrap()).unwrap();
    let text = |e: &Value, p: &str| e["prompts"][p].as_str().unwrap().to_string();
    let mut matched = 0;
    for o in &official {
        let mine = ours
            .iter()
            .find(|e| e["img_name"] == o["img_name"])
            .unwrap();
        // Official: p4 = "{size} {color} {shape} polyp", p3 = "{color} {shape} polyp",
        // p5 = "{number} " + p4, p6 = p5 + ", located in {location} of the image".
        let size = text(o, "p4")
            .strip_suffix(&format!(" {}", text(o, "p3")))
            .unwrap()
            .to_string();
        let number = text(o, "p5")
            .strip_suffix(&format!(" {}", text(o, "p4")))
            .unwrap()
            .to_string();
        let location = text(o, "p6")
            .split(", located in ")
            .nth(1)
            .unwrap()
            .trim_end_matches(" of the image")
            .to_string();
        // Ours, without shape and colour: p4 = "{size} polyp", p5 = "{number} {size} polyp".
        let our_size = text(mine, "p4").strip_suffix(" polyp").unwrap().to_string();
        let our_number = text(mine, "p5")
            .strip_suffix(&format!(" {}", text(mine, "p4")))
            .unwrap()
            .to_string();
        let our_location = text(mine, "p6")
            .split(", located in ")
            .nth(1)
            .unwrap()
            .trim_end_matches(" of the image")
            .to_string();
        if (size, number, location) == (our_size, our_number, our_location) {
            matched += 1;
        }
        assert_eq!(mine["prompts"]["p7"][0], "polyp which is a growth");
    }
    eprintln!(
        "vlsm prompts: {matched} of {} Kvasir entries have the official size/count/location words",
        official.len()
    );
    assert_eq!(matched, official.len());
    // Not overwritten without --force; a missing class is refused.
    let out = vlsm(&["prompts", dir.to_str().unwrap(), "--class", "polyp"], &[]);
    assert_clean_error(&out, "pass --force");
    let out = vlsm(
        &["prompts", dir.to_str().unwrap(), "--class", " ", "--force"],
        &[],
    );
    assert_clean_error(&out, "--class is empty");
    // Bad masks are warnings, one per image; one error line at the end counts them; the
    // others are written.
    let first_mask = std::fs::read_dir(dir.join("masks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    std::fs::write(&first_mask, b"not a mask").unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/hostile/bomb_30000x30000_1bit.png"),
        dir.join("images/zz_bomb.png"),
    )
    .unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/hostile/bomb_30000x30000_1bit.png"),
        dir.join("masks/zz_bomb.png"),
    )
    .unwrap();
    let out = vlsm(
        &[
            "prompts",
            dir.to_str().unwrap(),
            "--class",
            "polyp",
            "--force",
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors,
        ["error: 2 of 6 images could not be annotated (listed above)"],
        "{err}"
    );
    assert_eq!(err.matches("warning: skipped").count(), 2, "{err}");
    assert!(err.contains("over the limit"), "{err}");
}

#[test]
fn two_models_all_datasets_test_and_train_lists_and_seeded_list_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    dataset(&root, 1);
    // A test-only study dataset: its "test" is test.json + train.json.
    let etis = root.join("etis_polyp");
    copy_dir(&kvasir(), &etis);
    let entries: Vec<Value> =
        serde_json::from_slice(&std::fs::read(kvasir().join("anns/test.json")).unwrap()).unwrap();
    std::fs::write(
        etis.join("anns/test.json"),
        serde_json::to_vec(&entries[..2]).unwrap(),
    )
    .unwrap();
    std::fs::write(
        etis.join("anns/train.json"),
        serde_json::to_vec(&entries[2..3]).unwrap(),
    )
    .unwrap();
    // A folder without anns/ is not a dataset.
    std::fs::create_dir_all(root.join("notes")).unwrap();
    let endpoint = common::serve_hub(vec![(
        "tiny/clipseg".into(),
        common::copy_model("clipseg_refined", tmp.path()),
    )]);
    let home = tmp.path().join("hf-home");
    let out_dir = tmp.path().join("out");
    let simple = fixture("clipseg_simple");
    let out = vlsm(
        &[
            "bench",
            "--data",
            root.to_str().unwrap(),
            "--weights",
            simple.to_str().unwrap(),
            "--model",
            "tiny/clipseg",
            "--prompts",
            "p1,p8",
            "--list-prompts",
            "random",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[
            ("HF_ENDPOINT", &endpoint),
            ("HF_HOME", home.to_str().unwrap()),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mut reader = csv::Reader::from_path(out_dir.join("results.csv")).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    // 2 models × (5 kvasir + 3 etis entries) × (p1 + one member of p8).
    assert_eq!(rows.len(), 2 * 8 * 2);
    let models: std::collections::BTreeSet<&str> = rows.iter().map(|r| &r[0]).collect();
    assert_eq!(
        models.into_iter().collect::<Vec<_>>(),
        ["clipseg_simple", "tiny/clipseg"]
    );
    // The study's dataset comes first, with its test and train lists.
    assert_eq!(&rows[0][1], "etis_polyp");
    let splits: std::collections::BTreeSet<(&str, &str)> =
        rows.iter().map(|r| (&r[1], &r[2])).collect();
    assert_eq!(
        splits.into_iter().collect::<Vec<_>>(),
        [
            ("etis_polyp", "test"),
            ("etis_polyp", "train"),
            ("kvasir", "test")
        ]
    );
    // The seeded choice: the same member for both models, not always the first.
    let members: Vec<(&str, &str, &str)> = rows
        .iter()
        .filter(|r| &r[4] == "p8")
        .map(|r| (&r[1], &r[3], &r[5]))
        .collect();
    let (first, second) = members.split_at(members.len() / 2);
    assert_eq!(first, second);
    assert!(first.iter().any(|m| m.2 != "0"), "{first:?}");
    let out = vlsm(
        &["report", out_dir.to_str().unwrap(), "--prompt", "p8"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("| model | etis_polyp | kvasir |"), "{md}");
    assert!(md.contains("### tiny/clipseg"), "{md}");
    let out = vlsm(
        &["report", out_dir.to_str().unwrap(), "--prompt", "p5"],
        &[],
    );
    assert_clean_error(&out, "--prompt p5: the results have p1, p8");
}

/// Sorted lines of a results file (the order of rows depends on resumes).
fn sorted_rows(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[test]
fn mutated_results_and_config_are_refused_or_repaired_never_silently_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    dataset(&root, 1);
    let model = fixture("clipseg_simple");
    let clean = tmp.path().join("clean");
    let args = bench_args(
        root.to_str().unwrap(),
        model.to_str().unwrap(),
        clean.to_str().unwrap(),
        &[],
    );
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = sorted_rows(&clean.join("results.csv"));
    let results = std::fs::read(clean.join("results.csv")).unwrap();
    let config = std::fs::read(clean.join("bench.json")).unwrap();
    // Deterministic mutations: one byte changed, a run of bytes deleted or duplicated.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    };
    let (mut refused, mut repaired) = (0, 0);
    for i in 0..40 {
        let (file, original) = if i % 4 == 3 {
            ("bench.json", &config)
        } else {
            ("results.csv", &results)
        };
        let mut bytes = original.clone();
        let at = next(bytes.len());
        match next(3) {
            0 => bytes[at] = b"0123456789.,-\"\nx"[next(16)],
            1 => {
                let end = (at + 1 + next(40)).min(bytes.len());
                bytes.drain(at..end);
            }
            _ => {
                let end = (at + 1 + next(80)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
        }
        if bytes == *original {
            continue;
        }
        let run = tmp.path().join(format!("run{i}"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("results.csv"), &results).unwrap();
        std::fs::write(run.join("bench.json"), &config).unwrap();
        std::fs::write(run.join(file), &bytes).unwrap();
        let mut resume = args.clone();
        let out_pos = resume.iter().position(|a| *a == "--out").unwrap() + 1;
        let run_str = run.to_str().unwrap().to_string();
        resume[out_pos] = &run_str;
        let out = vlsm(&resume, &[]);
        if out.status.success() {
            // Repaired (a cut last row dropped and recomputed, say): the same rows.
            assert_eq!(
                sorted_rows(&run.join("results.csv")),
                expected,
                "mutation {i} of {file} was accepted with other rows: {}",
                stderr(&out)
            );
            repaired += 1;
        } else {
            let err = stderr(&out);
            let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
            assert_eq!(errors.len(), 1, "mutation {i} of {file}: {err}");
            assert!(!err.contains("panicked"), "{err}");
            refused += 1;
        }
    }
    assert!(refused > 10, "refused {refused}, repaired {repaired}");
}

/// `<root>/kvasir` with the masks of its first two entries blanked (empty masks, as BKAI,
/// BUSI, CAMUS and CheXlocalize have) and a `val.json` equal to `test.json`.
fn dataset_with_empty_masks(root: &Path) -> PathBuf {
    let dir = dataset(root, 1);
    let entries: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir.join("anns/test.json")).unwrap()).unwrap();
    for e in &entries[..2] {
        let path = dir.join("masks").join(e["mask_name"].as_str().unwrap());
        let (w, h) = image::image_dimensions(&path).unwrap();
        image::GrayImage::new(w, h).save(&path).unwrap();
    }
    std::fs::copy(dir.join("anns/test.json"), dir.join("anns/val.json")).unwrap();
    dir
}

fn report_json(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn threshold_study_empty_mask_conventions_and_paired_comparisons() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    dataset_with_empty_masks(&root);
    let (simple, refined) = (fixture("clipseg_simple"), fixture("clipseg_refined"));
    let bench = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--data",
            root.to_str().unwrap(),
            "--datasets",
            "kvasir",
            "--weights",
            simple.to_str().unwrap(),
            "--weights",
            refined.to_str().unwrap(),
            "--prompts",
            "p1,p6",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        vlsm(&args, &[])
    };
    // Three thresholds from one decoding each; 1 predicts nothing (sigmoid < 1 always).
    let test = tmp.path().join("test");
    let out = bench(&test, &["--thresholds", "0.3,0.5,1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut reader = csv::Reader::from_path(test.join("results.csv")).unwrap();
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 2 * 5 * 2 * 3);
    for r in &records {
        let n = |c: &str| r[col(c)].parse::<u64>().unwrap();
        let (w, h) = (n("width"), n("height"));
        assert_eq!(n("tp") + n("fp") + n("fn") + n("tn"), w * h);
        let threshold: f32 = r[col("threshold")].parse().unwrap();
        assert!([0.3, 0.5, 1.0].contains(&threshold));
        if threshold == 1.0 {
            assert_eq!((n("tp"), n("fp")), (0, 0), "nothing predicted at 1");
        }
    }
    // Resuming does nothing; other thresholds are refused.
    let out = bench(&test, &["--thresholds", "0.3,0.5,1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("bench: 0 rows"), "{}", stderr(&out));
    let out = bench(&test, &["--thresholds", "0.3,0.5"]);
    assert_clean_error(&out, "other options");
    let out = bench(&tmp.path().join("x"), &["--thresholds", "0:1:0.001"]);
    assert_clean_error(&out, "at most 100");

    // Thresholds chosen on validation results (here the same images), never on test ones.
    let val = tmp.path().join("val");
    let out = bench(&val, &["--split", "val", "--thresholds", "0.3,0.5,1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report = |results: &Path, extra: &[&str]| {
        let mut args = vec!["report", results.to_str().unwrap()];
        args.extend_from_slice(extra);
        vlsm(&args, &[])
    };
    let out = report(&test, &["--tune-on", test.to_str().unwrap()]);
    assert_clean_error(&out, "test-split results");
    let (a, b) = ("clipseg_simple", "clipseg_refined");
    let pair = format!("{a},{b}");
    let out = report(
        &test,
        &[
            "--tune-on",
            val.to_str().unwrap(),
            "--compare",
            &pair,
            "--compare-prompts",
            "p1,p6",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json = report_json(&test);
    let study = &json["threshold_study"];
    let curves = study["curves"].as_array().unwrap();
    assert_eq!(curves.len(), 2);
    for c in curves {
        let thresholds: Vec<f32> = c["thresholds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(thresholds, [0.3, 0.5, 1.0]);
        // At 1 the two empty masks score 1 (medvlsm's convention), the three others 0.
        assert!((c["dice"][2].as_f64().unwrap() - 0.4).abs() < 1e-12, "{c}");
    }
    for t in study["tuned"].as_array().unwrap() {
        // The same images: the chosen threshold gives here what it gave there.
        assert_eq!(t["dice_at_chosen"], t["val_dice"], "{t}");
        assert_eq!(t["table_threshold"].as_f64(), Some(0.5));
    }
    // The tables stay at the models' study threshold.
    for c in json["cells"].as_array().unwrap() {
        assert_eq!(c["images"], 5);
    }
    let comparisons = json["comparisons"].as_array().unwrap();
    assert_eq!(
        comparisons.len(),
        4,
        "two prompts for the models, two models for the prompts"
    );
    // The first: simple − refined on p1, recomputed from the rows at 0.5.
    let dice = |model: &str| -> Vec<f64> {
        let mut v: Vec<(usize, f64)> = records
            .iter()
            .filter(|r| {
                &r[col("model")] == model
                    && &r[col("prompt_id")] == "p1"
                    && &r[col("threshold")] == "0.5"
            })
            .map(|r| {
                (
                    r[col("entry")].parse().unwrap(),
                    r[col("dice")].parse().unwrap(),
                )
            })
            .collect();
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|x| x.1).collect()
    };
    let (da, db) = (dice(a), dice(b));
    let expected = da.iter().zip(&db).map(|(x, y)| x - y).sum::<f64>() / 5.0;
    let first = &comparisons[0];
    assert_eq!(
        (first["a"].as_str(), first["within"].as_str()),
        (Some(a), Some("p1"))
    );
    assert!((first["dice"]["mean_difference"].as_f64().unwrap() - expected).abs() < 1e-12);
    assert_eq!(first["dice"]["n"], 5);
    let p = first["dice"]["p_value"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
    let md = std::fs::read_to_string(test.join("report.md")).unwrap();
    for section in [
        "## Dice (%) vs threshold",
        "## Thresholds chosen on validation results",
        "## Paired comparisons",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    assert!(test.join("dice_vs_threshold.png").is_file());
    let out = report(&test, &["--compare", "clipseg_simple,nope"]);
    assert_clean_error(&out, "no model nope");

    // Empty masks: at threshold 1 every prediction is empty, so the two blank masks are
    // empty-on-empty pairs: Dice 1 for medvlsm, left out by nnU-Net.
    let empty = tmp.path().join("empty");
    let out = bench(&empty, &["--threshold", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = report(&empty, &["--nnunet-summary"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = report_json(&empty);
    let differ = json["empty_masks_differ"].as_array().unwrap();
    assert_eq!(differ.len(), 4, "two models × two prompts");
    for c in differ {
        assert_eq!(
            (c["empty_masks"].as_u64(), c["both_empty"].as_u64()),
            (Some(2), Some(2))
        );
        assert!((c["dice_medvlsm"]["mean"].as_f64().unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(c["dice_nnunet"]["mean"].as_f64(), Some(0.0));
        assert_eq!(c["dice_nnunet"]["n"], 3);
    }
    let out = report(
        &empty,
        &[
            "--empty-masks",
            "nnunet",
            "--out",
            tmp.path().join("nn").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for c in report_json(&tmp.path().join("nn"))["cells"]
        .as_array()
        .unwrap()
    {
        assert_eq!(
            (c["dice"]["mean"].as_f64(), c["dice"]["n"].as_u64()),
            (Some(0.0), Some(3))
        );
    }
    // nnU-Net's summary.json: NaN Dice for the empty pairs, nanmean over the others.
    let summary =
        std::fs::read_to_string(empty.join("nnunet/clipseg_simple/kvasir/p1/summary.json"))
            .unwrap();
    let summary: Value = serde_json::from_str(&summary.replace("NaN", "null")).unwrap();
    let cases = summary["metric_per_case"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    let empty_cases = cases
        .iter()
        .filter(|c| c["metrics"]["1"]["Dice"].is_null())
        .count();
    assert_eq!(empty_cases, 2);
    assert_eq!(summary["mean"]["1"]["Dice"].as_f64(), Some(0.0));
    assert_eq!(summary["foreground_mean"]["TP"].as_f64(), Some(0.0));
    let out = report(
        &empty,
        &["--empty-masks", "nnunet", "--resolution", "model"],
    );
    assert_clean_error(&out, "original resolution only");
}

#[test]
fn prompt_controls_are_scored_and_compared_with_the_entrys_own_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    dataset(&root, 1);
    let model = fixture("clipseg_simple");
    let out_dir = tmp.path().join("out");
    let args = bench_args(
        root.to_str().unwrap(),
        model.to_str().unwrap(),
        out_dir.to_str().unwrap(),
        &["--prompt-controls"],
    );
    let args: Vec<&str> = args
        .into_iter()
        .map(|a| if a == "p1,p6,p7" { "p1,p6" } else { a })
        .collect();
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut reader = csv::Reader::from_path(out_dir.join("results.csv")).unwrap();
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 5 * (2 + 6));
    let prompt = |entry: &str, id: &str| {
        records
            .iter()
            .find(|r| &r[col("entry")] == entry && &r[col("prompt_id")] == id)
            .map(|r| r[col("prompt")].to_string())
            .unwrap()
    };
    // Entry 1's p6 is "one large white round polyp, located in right of the image".
    assert_eq!(prompt("1", "ctl-empty"), "");
    assert_eq!(prompt("1", "ctl-nonsense"), "blicket");
    assert_eq!(prompt("1", "ctl-wrong-class"), "a healthy colon");
    assert_eq!(
        prompt("1", "ctl-wrong-location"),
        prompt("1", "p6").replace("in right of", "in left of")
    );
    assert_eq!(prompt("1", "ctl-class-alone"), prompt("1", "p1"));
    assert!(records.iter().all(|r| r[col("error")].is_empty()));
    let out = vlsm(&["report", out_dir.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json = report_json(&out_dir);
    assert_eq!(
        json["prompts"],
        serde_json::json!(["p1", "p6"]),
        "controls are not table columns"
    );
    let p6 = json["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt_id"] == "p6")
        .unwrap()["dice"]["mean"]
        .as_f64()
        .unwrap();
    let controls = json["controls"].as_array().unwrap();
    assert_eq!(controls.len(), 6);
    for c in controls {
        assert_eq!(
            (c["b"].as_str(), c["dice"]["n"].as_u64()),
            (Some("p6"), Some(5))
        );
        assert!((c["b_dice"].as_f64().unwrap() - p6).abs() < 1e-12);
        let d = c["a_dice"].as_f64().unwrap() - c["b_dice"].as_f64().unwrap();
        assert!((c["dice"]["mean_difference"].as_f64().unwrap() - d).abs() < 1e-12);
    }
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(md.contains("## Prompt controls"));
    // Resuming without the flag is another run.
    let args: Vec<&str> = args
        .into_iter()
        .filter(|a| *a != "--prompt-controls")
        .collect();
    assert_clean_error(&vlsm(&args, &[]), "prompt controls");
}

#[test]
fn prompts_read_dicom_images_and_label_masks_as_their_png_equivalents() {
    // A DICOM image and a DICOM label mask (foreground where the value is above 0) give the
    // same annotations as the same pixels in PNG files.
    let tmp = tempfile::tempdir().unwrap();
    let dicom = fixture("dicom");
    let (dcm_dir, png_dir) = (tmp.path().join("dcm"), tmp.path().join("png"));
    for d in [&dcm_dir, &png_dir] {
        std::fs::create_dir_all(d.join("images")).unwrap();
        std::fs::create_dir_all(d.join("masks")).unwrap();
    }
    std::fs::copy(dicom.join("ct_explicit.dcm"), dcm_dir.join("images/a.dcm")).unwrap();
    std::fs::copy(dicom.join("ct_explicit.dcm"), dcm_dir.join("masks/a.dcm")).unwrap();
    // The PNG twins: the image as the model sees it, the mask as 255 where the CT value
    // (Hounsfield units) is above 0.
    let ct = vlsm::dicom::DicomFile::read(&std::fs::read(dicom.join("ct_explicit.dcm")).unwrap())
        .unwrap();
    ct.frame_rgb(0, vlsm::window::Window::File)
        .unwrap()
        .save(png_dir.join("images/a.png"))
        .unwrap();
    let grey: Vec<u8> = ct
        .frame_values(0)
        .unwrap()
        .iter()
        .map(|&v| if v > 0.0 { 255 } else { 0 })
        .collect();
    image::GrayImage::from_raw(ct.columns, ct.rows, grey)
        .unwrap()
        .save(png_dir.join("masks/a.png"))
        .unwrap();
    let anns = |dir: &Path| -> Value {
        let out = vlsm(
            &["prompts", dir.to_str().unwrap(), "--class", "lesion"],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let mut v: Value =
            serde_json::from_slice(&std::fs::read(dir.join("anns/test.json")).unwrap()).unwrap();
        for e in v.as_array_mut().unwrap() {
            e.as_object_mut().unwrap().remove("img_name");
            e.as_object_mut().unwrap().remove("mask_name");
        }
        v
    };
    let (from_dicom, from_png) = (anns(&dcm_dir), anns(&png_dir));
    assert_eq!(from_dicom, from_png);
    assert_ne!(from_dicom[0]["prompts"]["p1"], "no lesion");
}

#[test]
fn nifti_volumes_are_annotated_and_evaluated_slice_by_slice() {
    // A volume and its label volume: `vlsm prompts` writes an entry per slice (attributes
    // measured on the label slice), and `vlsm bench` scores each slice as `vlsm segment`'s
    // mask of that slice against the label slice.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    let dir = volume_dataset(&root);
    let label_path = dir.join("masks/vol.nii.gz");
    let args = [
        "prompts",
        dir.to_str().unwrap(),
        "--class",
        "lesion",
        "--slices",
        "axial:2-5",
        "--window",
        "40,400",
    ];
    let out = vlsm(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let anns: Vec<Value> =
        serde_json::from_slice(&std::fs::read(dir.join("anns/test.json")).unwrap()).unwrap();
    assert_eq!(anns.len(), 4);
    let label_file = vlsm::clinical::ClinicalImage::read(
        &std::fs::read(&label_path).unwrap(),
        vlsm::nifti::MAX_VOXELS,
    )
    .unwrap();
    for (k, entry) in (2..=5).zip(&anns) {
        assert_eq!(entry["slice"], format!("axial:{k}"));
        assert_eq!(entry["window"], "40,400");
        assert_eq!(entry["segment_id"], format!("vol_axial_{k:03}"));
        let (w, h, mask) = label_file
            .label_mask(format!("axial:{k}").parse().unwrap())
            .unwrap();
        let grey: Vec<u8> = mask.iter().map(|&m| m * 255).collect();
        let measured = vlsm::prompts::mask_attributes(&grey, w as usize, h as usize);
        assert!(measured.count > 0, "slice {k} has no foreground");
        let p4 = entry["prompts"]["p4"].as_str().unwrap();
        assert!(p4.contains(&measured.size), "{p4} lacks {}", measured.size);
    }
    // One more entry, of the volume without its slice: a row error, the others scored.
    let mut with_bad = anns.clone();
    let mut bad = anns[0].clone();
    bad.as_object_mut().unwrap().remove("slice");
    with_bad.push(bad);
    std::fs::write(
        dir.join("anns/test.json"),
        serde_json::to_vec(&with_bad).unwrap(),
    )
    .unwrap();
    let model = fixture("clipseg_simple");
    let out_dir = tmp.path().join("bench");
    let out = vlsm(
        &[
            "bench",
            "--data",
            root.to_str().unwrap(),
            "--datasets",
            "ctvol",
            "--weights",
            model.to_str().unwrap(),
            "--prompts",
            "p1",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
    );
    let mut reader = csv::Reader::from_path(out_dir.join("results.csv")).unwrap();
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let headers = reader.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    assert_eq!(rows.len(), 5, "{}", stderr(&out));
    assert!(
        rows[4][col("error")].contains("must name its slice"),
        "{:?}",
        &rows[4]
    );
    // Slice 3's score, from `vlsm segment`'s mask of that slice.
    let row = &rows[1];
    assert_eq!(&row[col("image")], "vol.nii.gz#axial:3");
    let seg = tmp.path().join("seg");
    let prompt = anns[1]["prompts"]["p1"].as_str().unwrap();
    let out = vlsm(
        &[
            "segment",
            dir.join("images/vol.nii.gz").to_str().unwrap(),
            "--weights",
            model.to_str().unwrap(),
            "--prompt",
            prompt,
            "--slices",
            "axial:3-3",
            "--window",
            "40,400",
            "--out",
            seg.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let png = std::fs::read(
        seg.join("vol_axial_003")
            .join(format!("00_{}.mask.png", vlsm::prompts::slug(prompt))),
    )
    .unwrap();
    let (_, _, predicted) = vlsm::preprocess::decode_mask(&png).unwrap();
    let (_, _, truth) = label_file.label_mask("axial:3".parse().unwrap()).unwrap();
    let dice = vlsm::metrics::dice(&predicted, &truth).unwrap();
    let bench_dice: f64 = row[col("dice")].parse().unwrap();
    assert!(
        (bench_dice - dice).abs() < 1e-9,
        "bench {bench_dice} vs segment {dice}"
    );
}
