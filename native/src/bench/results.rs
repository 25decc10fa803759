//! `results.csv`: one row per (model, dataset, split, entry, prompt id, list member), appended
//! as the benchmark goes, and `bench.json`: the options a results folder was made with.
//!
//! Crash safety: rows are only ever appended, one image's rows per write, each write flushed
//! to disk (fsync) unless asked otherwise. A kill can only leave a partial last line; reading
//! the file back drops it (and truncates the file to its last complete row).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

pub const RESULTS: &str = "results.csv";
pub const CONFIG: &str = "bench.json";

/// One result row. Metrics without a suffix are at the image's original resolution (the
/// prediction resized back with nearest); `_model` ones at the model's input resolution
/// against the ground truth resized there (nearest), as medvlsm's logged metrics. HD95 and
/// NSD are in pixels of their resolution; NaN where MONAI gives NaN (empty masks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    pub dataset: String,
    pub split: String,
    /// Index of the entry in `anns/<split>.json`; empty for a problem with the whole file.
    pub entry: Option<usize>,
    /// Empty when the entry itself could not be read.
    pub prompt_id: String,
    /// Index in a list-valued prompt (0 for a string prompt).
    pub member: usize,
    /// Foreground where sigmoid(logit) > this (the model's threshold, or one of
    /// `--thresholds`).
    pub threshold: f32,
    pub prompt: String,
    pub image: String,
    pub mask: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub dice: Option<f64>,
    pub iou: Option<f64>,
    pub hd95: Option<f64>,
    pub nsd: Option<f64>,
    pub dice_model: Option<f64>,
    pub iou_model: Option<f64>,
    pub hd95_model: Option<f64>,
    pub nsd_model: Option<f64>,
    /// Foreground share of the prediction at original resolution.
    pub foreground: Option<f64>,
    /// Pixel counts at the original resolution (true/false positives/negatives): what
    /// either empty-mask convention and nnU-Net's `summary.json` are computed from.
    pub tp: Option<u64>,
    pub fp: Option<u64>,
    #[serde(rename = "fn")]
    pub fn_: Option<u64>,
    pub tn: Option<u64>,
    /// The first 16 hex digits of the sha256 of the row's other fields as CSV: a resumed
    /// or merged run refuses a row that does not match it (an edit, a flipped bit).
    pub check: String,
    /// Why this row has no scores (missing image, mask of another size, bad entry, …).
    pub error: String,
}

/// What identifies a row: a rerun recomputes only the keys not yet present.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    pub model: String,
    pub dataset: String,
    pub split: String,
    pub entry: Option<usize>,
    pub prompt_id: String,
    pub member: usize,
    /// The threshold's bits (f32 has no `Eq`).
    pub threshold: u32,
}

impl Row {
    pub fn key(&self) -> RowKey {
        RowKey {
            model: self.model.clone(),
            dataset: self.dataset.clone(),
            split: self.split.clone(),
            entry: self.entry,
            prompt_id: self.prompt_id.clone(),
            member: self.member,
            threshold: self.threshold.to_bits(),
        }
    }
}

/// The header line, from the field names.
pub fn header() -> String {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.serialize(Row::empty()).expect("a row serialises");
    let bytes = w.into_inner().expect("in memory");
    String::from_utf8(bytes)
        .expect("utf-8")
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

impl Row {
    /// A row with every field empty, to fill in.
    pub fn empty() -> Self {
        Row {
            model: String::new(),
            dataset: String::new(),
            split: String::new(),
            entry: None,
            prompt_id: String::new(),
            member: 0,
            threshold: 0.5,
            prompt: String::new(),
            image: String::new(),
            mask: String::new(),
            width: None,
            height: None,
            dice: None,
            iou: None,
            hd95: None,
            nsd: None,
            dice_model: None,
            iou_model: None,
            hd95_model: None,
            nsd_model: None,
            foreground: None,
            tp: None,
            fp: None,
            fn_: None,
            tn: None,
            check: String::new(),
            error: String::new(),
        }
    }
}

/// CSV text of rows, without a header.
pub fn encode_rows(rows: &[Row]) -> Result<Vec<u8>> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    for row in rows {
        w.serialize(Row {
            check: row_check(row)?,
            ..row.clone()
        })?;
    }
    w.into_inner().context("encoding rows")
}

/// See [`Row::check`].
fn row_check(row: &Row) -> Result<String> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new());
    w.serialize(Row {
        check: String::new(),
        ..row.clone()
    })?;
    let bytes = w.into_inner().context("encoding a row")?;
    Ok(vlsm::share::sha256_hex(&bytes)[..16].to_string())
}

/// Reads a results file. A partial last line (a write cut by a kill) is dropped; with
/// `repair`, the file is also truncated to its complete rows so appends start clean.
pub fn read(path: &Path, repair: bool) -> Result<Vec<Row>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() && repair {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_len(complete as u64)
            .with_context(|| format!("truncating {}", path.display()))?;
        file.sync_all()?;
        eprintln!(
            "note: dropped a half-written row at the end of {}",
            path.display()
        );
    }
    let text = &bytes[..complete];
    let first_line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let first_line = String::from_utf8_lossy(first_line);
    if first_line.trim_end() != header() {
        if first_line.starts_with("model,dataset,split,entry,prompt_id,member,prompt,") {
            bail!(
                "{} was written by an earlier vlsm (without the threshold and pixel-count columns): recompute it with another --out",
                path.display()
            );
        }
        bail!(
            "{} is not a vlsm results file (its header differs from `{}`)",
            path.display(),
            header()
        );
    }
    let mut reader = csv::Reader::from_reader(text);
    let mut rows = Vec::new();
    let mut lines: HashMap<RowKey, usize> = HashMap::new();
    for (i, row) in reader.deserialize().enumerate() {
        let line = i + 2;
        let mut row: Row =
            row.with_context(|| format!("{} row {line} is malformed", path.display()))?;
        let stored = std::mem::take(&mut row.check);
        if stored != row_check(&row)? {
            bail!(
                "{} row {line} does not match its checksum: the file was edited or damaged; use another --out, or delete the row to recompute it",
                path.display()
            );
        }
        if let Err(why) = row.check() {
            bail!(
                "{} row {line} is not a row vlsm wrote ({why}): the file was edited or damaged",
                path.display()
            );
        }
        if let Some(first) = lines.insert(row.key(), line) {
            bail!(
                "{} row {line} repeats the key of row {first} (model, dataset, split, entry, prompt, member): the file was edited or damaged",
                path.display()
            );
        }
        rows.push(row);
    }
    Ok(rows)
}

impl Row {
    /// What vlsm itself always writes: scores in range and consistent, or an error and no
    /// scores. A resumed or merged run refuses other rows instead of trusting them.
    fn check(&self) -> std::result::Result<(), String> {
        let scores = [
            ("dice", self.dice),
            ("iou", self.iou),
            ("nsd", self.nsd),
            ("dice_model", self.dice_model),
            ("iou_model", self.iou_model),
            ("nsd_model", self.nsd_model),
            ("foreground", self.foreground),
        ];
        let distances = [("hd95", self.hd95), ("hd95_model", self.hd95_model)];
        let present = scores
            .iter()
            .chain(&distances)
            .filter(|(_, v)| v.is_some())
            .count();
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(format!("threshold {} is outside [0, 1]", self.threshold));
        }
        let counts = [self.tp, self.fp, self.fn_, self.tn];
        if !self.error.is_empty() {
            return match present + counts.iter().flatten().count() {
                0 => Ok(()),
                _ => Err("a row with an error has scores".into()),
            };
        }
        if present != scores.len() + distances.len() {
            return Err("a row without an error lacks scores".into());
        }
        let (Some(w), Some(h)) = (self.width, self.height) else {
            return Err("width or height missing".into());
        };
        let [Some(tp), Some(fp), Some(fn_), Some(tn)] = counts else {
            return Err("a row without an error lacks pixel counts".into());
        };
        let total = [tp, fp, fn_, tn]
            .iter()
            .try_fold(0u64, |sum, &n| sum.checked_add(n));
        if w == 0 || h == 0 || total != Some(u64::from(w) * u64::from(h)) {
            return Err("pixel counts do not add up to the image size".into());
        }
        let counted = vlsm::metrics::Overlap {
            predicted: tp + fp,
            truth: tp + fn_,
            both: tp,
        };
        if (counted.dice() - self.dice.unwrap_or(f64::NAN)).abs() > 1e-9 {
            return Err("Dice does not match the pixel counts".into());
        }
        for (name, v) in scores {
            let v = v.unwrap_or(f64::NAN);
            // NSD is NaN where a mask is empty (as MONAI gives it); the others never are.
            let nan_allowed = name.starts_with("nsd") && v.is_nan();
            if !(0.0..=1.0).contains(&v) && !nan_allowed {
                return Err(format!("{name} {v} is outside [0, 1]"));
            }
        }
        for (name, v) in distances {
            if v.is_some_and(|v| v < 0.0) {
                return Err(format!("{name} is negative"));
            }
        }
        // IoU = Dice / (2 - Dice) for the same mask pair.
        for (dice, iou) in [(self.dice, self.iou), (self.dice_model, self.iou_model)] {
            let (d, i) = (dice.unwrap_or(0.0), iou.unwrap_or(0.0));
            if (d / (2.0 - d) - i).abs() > 1e-9 {
                return Err(format!("IoU {i} does not match Dice {d}"));
            }
        }
        Ok(())
    }
}

/// Appends rows to `results.csv`, each batch in one write, synced to disk when `fsync`.
pub struct Appender {
    file: File,
    path: PathBuf,
    fsync: bool,
}

impl Appender {
    /// Opens (creating with a header) the results file for appending.
    pub fn open(path: &Path, fsync: bool) -> Result<Self> {
        let new = !path.exists() || std::fs::metadata(path)?.len() == 0;
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            file.write_all(format!("{}\n", header()).as_bytes())?;
            file.sync_all()?;
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            fsync,
        })
    }

    pub fn append(&mut self, rows: &[Row]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let bytes = encode_rows(rows)?;
        self.file
            .write_all(&bytes)
            .with_context(|| format!("writing {}", self.path.display()))?;
        if self.fsync {
            self.file
                .sync_data()
                .with_context(|| format!("syncing {}", self.path.display()))?;
        }
        Ok(())
    }
}

/// Writes a whole results file atomically (temp file, fsync, rename).
pub fn write_all(path: &Path, rows: &[Row]) -> Result<()> {
    let mut bytes = format!("{}\n", header()).into_bytes();
    bytes.extend(encode_rows(rows)?);
    write_atomic_synced(path, &bytes)
}

pub fn write_atomic_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Keys already present.
pub fn done_keys(rows: &[Row]) -> HashSet<RowKey> {
    rows.iter().map(Row::key).collect()
}

/// A model as the run knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelId {
    /// The name in the `model` column.
    pub name: String,
    /// `--weights` directory or `--model` hub id.
    pub source: String,
    /// sha256 of its weights file: a resumed or merged run must use the same weights.
    pub weights_sha256: String,
    /// Its family (`clipseg`, `cris`, …); absent in runs made before families were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The threshold its rows were scored at: `--threshold`, else the model's study
    /// threshold; absent in runs made before it was per model (the run's `threshold` then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
}

impl ModelId {
    /// The threshold on sigmoid(logit) this model's rows use.
    pub fn threshold(&self) -> f32 {
        self.threshold.unwrap_or(0.5)
    }
}

/// `bench.json`: everything that decides the rows' values. Resuming with other options, or
/// merging shards made with different ones, is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub vlsm_version: String,
    pub models: Vec<ModelId>,
    pub data: String,
    pub datasets: Vec<String>,
    pub prompts: Vec<String>,
    pub split: String,
    /// `--threshold` when given (every model at it); `None`: each model at its study
    /// threshold ([`ModelId::threshold`]).
    pub threshold: Option<f32>,
    /// `--thresholds`: every model scored at each of these (a threshold study).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<f32>>,
    /// `--prompt-controls`: control prompts (`ctl-…`) scored beside the prompt ids.
    #[serde(default)]
    pub prompt_controls: bool,
    pub list_prompts: vlsm::dataset::ListPrompts,
    pub nsd_tolerance: f64,
    /// `[K, N]`: this folder holds shard K of N; absent for a whole run or a merge.
    pub shard: Option<[usize; 2]>,
    /// How the linears computed (`--precision`): `f32` (also runs made before the option)
    /// or `bf16`.
    #[serde(default = "f32_precision")]
    pub precision: String,
    /// Set when the run got through all its work (a kill leaves it false).
    pub finished: bool,
}

impl RunConfig {
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(CONFIG);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut config: Self = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a vlsm bench config", path.display()))?;
                // Runs made before thresholds were per model scored every model at the
                // run's threshold.
                for m in &mut config.models {
                    if m.threshold.is_none() {
                        m.threshold = config.threshold;
                    }
                }
                Ok(Some(config))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The thresholds `model`'s rows are scored at: `--thresholds`, else its one threshold.
    pub fn thresholds_of(&self, model: &ModelId) -> Vec<f32> {
        self.thresholds
            .clone()
            .unwrap_or_else(|| vec![model.threshold()])
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        write_atomic_synced(&dir.join(CONFIG), &json)
    }

    /// What differs from `other`, ignoring `finished` (and the shard index when `ignore_shard`).
    pub fn differences(&self, other: &Self, ignore_shard: bool) -> Vec<String> {
        let mut d = Vec::new();
        let mut check = |what: &str, a: String, b: String| {
            if a != b {
                d.push(format!("{what} {a} vs {b}"));
            }
        };
        check("models", names(&self.models), names(&other.models));
        let sums = |m: &[ModelId]| {
            m.iter()
                .map(|m| m.weights_sha256[..12.min(m.weights_sha256.len())].to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        check("weights sha256", sums(&self.models), sums(&other.models));
        check(
            "datasets",
            self.datasets.join(","),
            other.datasets.join(","),
        );
        check("prompts", self.prompts.join(","), other.prompts.join(","));
        check("split", self.split.clone(), other.split.clone());
        let thresholds = |c: &Self| {
            let each = c
                .models
                .iter()
                .map(|m| m.threshold().to_string())
                .collect::<Vec<_>>()
                .join(",");
            match (&c.thresholds, c.threshold) {
                (Some(list), _) => format!("{list:?} (--thresholds)"),
                (None, Some(t)) => format!("{t} (--threshold)"),
                (None, None) => format!("{each} (each model's)"),
            }
        };
        check("threshold", thresholds(self), thresholds(other));
        check(
            "prompt controls",
            self.prompt_controls.to_string(),
            other.prompt_controls.to_string(),
        );
        check(
            "list prompts",
            format!("{:?}", self.list_prompts),
            format!("{:?}", other.list_prompts),
        );
        check(
            "NSD tolerance",
            self.nsd_tolerance.to_string(),
            other.nsd_tolerance.to_string(),
        );
        let shard = |s: Option<[usize; 2]>| match s {
            Some([_, n]) if ignore_shard => format!("?/{n}"),
            Some([k, n]) => format!("{k}/{n}"),
            None => "none".into(),
        };
        check("shard", shard(self.shard), shard(other.shard));
        check("precision", self.precision.clone(), other.precision.clone());
        d
    }
}

fn f32_precision() -> String {
    "f32".into()
}

fn names(models: &[ModelId]) -> String {
    models
        .iter()
        .map(|m| m.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(entry: usize, dice: f64) -> Row {
        Row {
            model: "m".into(),
            dataset: "d".into(),
            split: "test".into(),
            entry: Some(entry),
            prompt_id: "p1".into(),
            prompt: "a \"quoted\", comma prompt".into(),
            width: Some(4),
            height: Some(3),
            dice: Some(dice),
            iou: Some(dice / (2.0 - dice)),
            hd95: Some(f64::NAN),
            nsd: Some(0.5),
            dice_model: Some(1.0),
            iou_model: Some(1.0),
            hd95_model: Some(0.0),
            nsd_model: Some(1.0),
            foreground: Some(0.1),
            // 4 × 3 pixels whose counts give that Dice.
            tp: Some(if dice == 0.75 { 3 } else { 1 }),
            fp: Some(if dice == 0.25 { 3 } else { 1 }),
            fn_: Some(if dice == 0.25 { 3 } else { 1 }),
            tn: Some(match dice {
                0.25 => 5,
                0.75 => 7,
                _ => 9,
            }),
            ..Row::empty()
        }
    }

    #[test]
    fn rows_round_trip_and_a_partial_line_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RESULTS);
        let mut a = Appender::open(&path, true).unwrap();
        a.append(&[row(0, 0.5), row(1, 0.25)]).unwrap();
        drop(a);
        let rows = read(&path, false).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].prompt, "a \"quoted\", comma prompt");
        assert!(rows[0].hd95.unwrap().is_nan() && rows[0].iou == Some(0.5 / 1.5));
        // (NaN ≠ NaN, so compared as written.)
        assert_eq!(
            encode_rows(&rows[..1]).unwrap(),
            encode_rows(&[row(0, 0.5)]).unwrap()
        );
        // A write cut in the middle of a row.
        let full = std::fs::read(&path).unwrap();
        let extra = encode_rows(&[row(2, 0.75)]).unwrap();
        let mut cut = full.clone();
        cut.extend_from_slice(&extra[..extra.len() / 2]);
        std::fs::write(&path, &cut).unwrap();
        assert_eq!(read(&path, true).unwrap().len(), 2);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            full,
            "truncated back to complete rows"
        );
        // One digit changed, a duplicated row, a row with an error and scores: refused.
        let text = String::from_utf8(full.clone()).unwrap();
        for (edited, needle) in [
            (text.replacen(",0.25,", ",0.26,", 1), "checksum"),
            (
                format!("{text}{}", text.lines().nth(1).unwrap()) + "\n",
                "repeats the key of row 2",
            ),
        ] {
            std::fs::write(&path, edited).unwrap();
            let e = read(&path, false).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let bad = Row {
            error: "x".into(),
            ..row(3, 0.5)
        };
        let mut with_bad = full.clone();
        with_bad.extend(encode_rows(&[bad]).unwrap());
        std::fs::write(&path, with_bad).unwrap();
        let e = read(&path, false).unwrap_err().to_string();
        assert!(e.contains("a row with an error has scores"), "{e}");
        std::fs::write(&path, b"a,b\n1,2\n").unwrap();
        assert!(
            read(&path, false)
                .unwrap_err()
                .to_string()
                .contains("not a vlsm results file")
        );
    }
}
