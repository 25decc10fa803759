//! `vlsm bench`: evaluate models on medvlsm-layout datasets across prompts; one CSV row per
//! (model, dataset, split, entry, prompt id, list member). Resumable (rerun the same command
//! after a kill) and shardable (`--shard K/N`, then `vlsm bench merge`).

mod merge;
pub mod results;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use vlsm::dataset::{self, Entry, ListPrompts, PromptValue};
use vlsm::metrics::{Overlap, Scores};
use vlsm::model::Arch;
use vlsm::{Segmenter, preprocess};

use crate::backend::{self, Backend};
use crate::hub;
use crate::model_source::ModelSource;
use crate::segment::parse_threshold;
use results::{Appender, ModelId, RESULTS, Row, RowKey, RunConfig};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Subcommand)]
enum BenchCommand {
    /// Combine the result folders of `--shard K/N` runs into one; refuses shards made with
    /// different options, missing or unfinished shards, and rows in two shards.
    Merge(merge::MergeArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ListMode {
    /// Every member of a list-valued prompt, each its own row.
    All,
    /// One member per entry and prompt id, chosen with --seed (as medvlsm's random choice).
    Random,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The folder holding `<dataset>/anns/<split>.json`, `<dataset>/images/`, `<dataset>/masks/`.
    #[arg(long, value_name = "ROOT", required = true)]
    data: Option<PathBuf>,
    /// Comma-separated dataset folder names, or `all` (every folder under ROOT with `anns/`).
    #[arg(long, default_value = "all")]
    datasets: String,
    /// A model folder (Hugging Face CLIPSeg, or vlsm's BiomedCLIPSeg folder) or a
    /// BiomedCLIPSeg decoder checkpoint (medvlsm's best.ckpt); repeat to compare models.
    #[arg(long = "weights", value_name = "PATH")]
    weights: Vec<PathBuf>,
    /// A hub model (mirror, cache, then network), repeatable: a Hugging Face id, a family
    /// name for its default repositories (`biomedclipseg-d`: BiomedCLIP with CIDAS's decoder),
    /// or FAMILY:ID. Default when no --weights: CIDAS/clipseg-rd64-refined.
    #[arg(long = "model", value_name = "HF_ID")]
    models: Vec<String>,
    /// Comma-separated prompt ids (p0,p3,…) or `all` (each dataset's own: the study's
    /// p0–p9, CAMUS p0–p7, BUSI/CheXlocalize p0–p6; for other datasets every id present).
    #[arg(long, default_value = "all")]
    prompts: String,
    /// The annotation split to evaluate (`test` covers test+train for CVC-300/ColonDB/ETIS).
    #[arg(long, default_value = "test")]
    split: String,
    /// Foreground where sigmoid(logit) > threshold, for every model [default: each model's
    /// study threshold: 0.35 for CRIS, 0.5 for the others].
    #[arg(long, value_parser = parse_threshold)]
    threshold: Option<f32>,
    /// A threshold study: score every model at each of these thresholds, from one decoding
    /// of each image: a comma-separated list, or FROM:TO:STEP (`0.1:0.9:0.05`); each row
    /// records its threshold. At most 100 thresholds.
    #[arg(long, value_name = "LIST", value_parser = parse_thresholds, conflicts_with = "threshold")]
    thresholds: Option<ThresholdList>,
    /// Also score control prompts per entry (empty, a nonsense word, the wrong class, a
    /// mirrored location, the class alone, the most detailed prompt; ids `ctl-…`), which the
    /// report compares with the entry's p6: does the model read the prompt at all?
    #[arg(long)]
    prompt_controls: bool,
    /// List-valued prompts (p7–p9, radiology pairs): every member, or one seeded choice.
    #[arg(long, value_enum, default_value = "all")]
    list_prompts: ListMode,
    /// Seed of `--list-prompts random`.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// NSD tolerance in pixels (at each resolution the metric is computed at).
    #[arg(long, default_value_t = 2.0, value_parser = parse_tolerance)]
    nsd_tolerance: f64,
    /// Do only part K of N of the work (1 ≤ K ≤ N), e.g. `--shard $SLURM_ARRAY_TASK_ID/8`.
    #[arg(long, value_name = "K/N", value_parser = parse_shard)]
    shard: Option<[usize; 2]>,
    /// Results folder: results.csv and bench.json. Rerunning the same command resumes.
    #[arg(long, default_value = "vlsm-bench")]
    out: PathBuf,
    /// Recompute rows that recorded an error (after fixing the data).
    #[arg(long)]
    retry_errors: bool,
    /// Do not fsync after each image's rows: a little faster; a machine crash (not a
    /// killed process) may then lose the last rows.
    #[arg(long)]
    no_fsync: bool,
    /// Re-encode the image for every prompt instead of once per image (for measuring).
    #[arg(long)]
    no_encode_once: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// How the linears of the transformer blocks compute: `f32` or `bf16` (as `vlsm segment
    /// --precision`; recorded in bench.json, so a resumed run keeps it).
    #[arg(long, default_value = "f32")]
    precision: vlsm::Precision,
}

fn parse_shard(s: &str) -> std::result::Result<[usize; 2], String> {
    let (k, n) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not K/N (e.g. 2/8)"))?;
    let k: usize = k
        .trim()
        .parse()
        .map_err(|_| format!("`{k}` is not a shard number"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("`{n}` is not a shard count"))?;
    if n == 0 || k == 0 || k > n {
        return Err(format!("shard {k}/{n}: need 1 ≤ K ≤ N"));
    }
    Ok([k, n])
}

/// `--thresholds`' values, in increasing order.
#[derive(Clone, Debug)]
struct ThresholdList(Vec<f32>);

/// The most thresholds one run scores: each multiplies the rows and the metric work.
const MAX_THRESHOLDS: usize = 100;

fn parse_thresholds(s: &str) -> std::result::Result<ThresholdList, String> {
    let mut values: Vec<f32> = match s.split(':').collect::<Vec<_>>()[..] {
        [from, to, step] => {
            let [from, to] = [parse_threshold(from)?, parse_threshold(to)?];
            let step: f64 = step
                .parse()
                .map_err(|_| format!("step `{step}` is not a number"))?;
            if step.is_nan() || step <= 0.0 || step.is_infinite() || from > to {
                return Err("FROM:TO:STEP needs FROM ≤ TO and a positive STEP".into());
            }
            let count = ((f64::from(to) - f64::from(from)) / step + 1e-6).floor() + 1.0;
            if count > MAX_THRESHOLDS as f64 {
                return Err(format!("{count} thresholds; at most {MAX_THRESHOLDS}"));
            }
            // Each value computed from FROM (not accumulated), rounded to 6 decimals, so
            // 0.1:0.9:0.05 gives 0.15, not 0.15000001.
            (0..count as usize)
                .map(|i| {
                    let t = f64::from(from) + i as f64 * step;
                    ((t * 1e6).round() / 1e6) as f32
                })
                .collect()
        }
        [_] => s
            .split(',')
            .map(|t| parse_threshold(t.trim()))
            .collect::<std::result::Result<_, _>>()?,
        _ => return Err("expected a list (0.3,0.5) or FROM:TO:STEP (0.1:0.9:0.05)".into()),
    };
    values.sort_by(f32::total_cmp);
    values.dedup();
    if values.len() > MAX_THRESHOLDS {
        return Err(format!(
            "{} thresholds; at most {MAX_THRESHOLDS}",
            values.len()
        ));
    }
    Ok(ThresholdList(values))
}

fn parse_tolerance(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("`{s}` is not a tolerance in pixels (a number ≥ 0)")),
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        Some(BenchCommand::Merge(m)) => merge::run(m),
        None => bench(args.run),
    }
}

/// Which shard a (dataset, split, entry) belongs to: round robin within each annotation file,
/// offset by a hash of its name so small files spread over shards too.
pub fn shard_of(dataset: &str, split: &str, entry: Option<usize>, n: usize) -> usize {
    let offset = format!("{dataset}/{split}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    match entry {
        Some(i) => (offset.wrapping_add(i as u64) % n as u64) as usize + 1,
        // A problem with a whole annotation file is recorded by shard 1.
        None => 1,
    }
}

/// A model to evaluate.
struct ModelSpec {
    id: ModelId,
    source: ModelSource,
}

/// One entry of an annotation file (or a problem reading it), with the rows it should give.
struct Item {
    dataset: String,
    split: String,
    entry: Option<usize>,
    source: Result<Entry, String>,
    rows: Vec<PlannedRow>,
}

struct PlannedRow {
    prompt_id: String,
    member: usize,
    /// The prompt, or why there is none.
    text: Result<String, String>,
}

fn bench(args: RunArgs) -> Result<()> {
    let root = args.data.clone().expect("clap requires --data");
    if !root.is_dir() {
        bail!("--data {}: not a folder", root.display());
    }
    let datasets = select_datasets(&root, &args.datasets, &args.split)?;
    let wanted_prompts: Option<Vec<String>> = match args.prompts.trim() {
        "all" => None,
        list => Some(parse_prompt_list(list)?),
    };
    let list_prompts = match args.list_prompts {
        ListMode::All => ListPrompts::All,
        ListMode::Random => ListPrompts::Random { seed: args.seed },
    };
    let models = resolve_models(&args.weights, &args.models, args.threshold)?;

    // Resume: the folder must have been made with the same options.
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut config = RunConfig {
        vlsm_version: env!("CARGO_PKG_VERSION").into(),
        models: models.iter().map(|m| m.id.clone()).collect(),
        data: root.display().to_string(),
        datasets: datasets.clone(),
        prompts: wanted_prompts.clone().unwrap_or_else(|| vec!["all".into()]),
        split: args.split.clone(),
        threshold: args.threshold,
        thresholds: args.thresholds.clone().map(|t| t.0),
        prompt_controls: args.prompt_controls,
        list_prompts,
        nsd_tolerance: args.nsd_tolerance,
        shard: args.shard,
        precision: crate::segment::effective_precision(args.precision, args.backend)
            .name()
            .into(),
        finished: false,
    };
    let results_path = args.out.join(RESULTS);
    match RunConfig::read(&args.out)? {
        Some(old) => {
            let diffs = old.differences(&config, false);
            if !diffs.is_empty() {
                bail!(
                    "{} holds a run made with other options ({}); rerun with the same options to resume, or use another --out",
                    args.out.display(),
                    diffs.join("; ")
                );
            }
        }
        None if results_path.exists() => bail!(
            "{} has a results.csv but no bench.json; use another --out",
            args.out.display()
        ),
        None => {}
    }
    config.write(&args.out)?;
    let mut existing = if results_path.exists() {
        results::read(&results_path, true)?
    } else {
        Vec::new()
    };
    if args.retry_errors {
        let before = existing.len();
        existing.retain(|r| r.error.is_empty());
        if existing.len() != before {
            results::write_all(&results_path, &existing)?;
            eprintln!("retrying {} rows that had errors", before - existing.len());
        }
    }
    let done = results::done_keys(&existing);

    let items = plan(
        &root,
        &datasets,
        &args.split,
        wanted_prompts.as_deref(),
        list_prompts,
        args.prompt_controls,
        args.shard,
    );
    // A scored row that this run would not produce (another prompt text, image or mask
    // than the annotations now give) was edited in, or the data changed since: refuse it
    // rather than report it.
    let planned: HashMap<RowKey, Row> = models
        .iter()
        .flat_map(|m| {
            let thresholds = config.thresholds_of(&m.id);
            items.iter().flat_map(move |item| {
                let thresholds = thresholds.clone();
                item.rows.iter().flat_map(move |r| {
                    thresholds.clone().into_iter().map(move |t| {
                        let row = base_row(&m.id.name, item, r, t);
                        (row.key(), row)
                    })
                })
            })
        })
        .collect();
    for row in existing.iter().filter(|r| r.error.is_empty()) {
        let what = match planned.get(&row.key()) {
            None => "a row this run does not produce",
            Some(p) if (&p.prompt, &p.image, &p.mask) != (&row.prompt, &row.image, &row.mask) => {
                "a row whose prompt, image or mask differs from the annotations'"
            }
            Some(_) => continue,
        };
        bail!(
            "{} has {what} (model {}, dataset {}, entry {:?}, prompt {} #{}): the file or the data changed since; use another --out",
            results_path.display(),
            row.model,
            row.dataset,
            row.entry,
            row.prompt_id,
            row.member
        );
    }
    let pending = planned.keys().filter(|k| !done.contains(*k)).count();
    let total = planned.len();
    if !existing.is_empty() {
        eprintln!(
            "resuming: {} rows already in {}, {pending} to do",
            existing.len(),
            results_path.display()
        );
    }
    let mut appender = Appender::open(&results_path, !args.no_fsync)?;
    let mut stats = RunStats::default();
    let started = Instant::now();
    if pending > 0 {
        let bar = progress_bar(pending as u64);
        let device = backend::device(args.backend)?;
        for model in &models {
            let thresholds = config.thresholds_of(&model.id);
            let missing = |item: &Item, r: &PlannedRow| {
                thresholds
                    .iter()
                    .any(|&t| !done.contains(&key(&model.id.name, item, r, t)))
            };
            let todo: Vec<&Item> = items
                .iter()
                .filter(|item| item.rows.iter().any(|r| missing(item, r)))
                .collect();
            if todo.is_empty() {
                continue;
            }
            bar.set_message(format!("loading {}", model.id.name));
            let precision = config.precision.parse().map_err(anyhow::Error::msg)?;
            let segmenter = crate::segment::with_precision(
                model.source.load_in(&device, precision)?,
                precision,
            )?;
            let mut evaluator = Evaluator {
                segmenter: &segmenter,
                model: &model.id.name,
                root: &root,
                thresholds: thresholds.clone(),
                nsd_tolerance: args.nsd_tolerance,
                encode_once: !args.no_encode_once,
                text_cache: HashMap::new(),
                stats: &mut stats,
            };
            for item in todo {
                bar.set_message(format!("{} {}", model.id.name, item.dataset));
                // A prompt is decoded when any of its thresholds is missing; only the
                // missing rows are written.
                let rows: Vec<&PlannedRow> =
                    item.rows.iter().filter(|r| missing(item, r)).collect();
                let out: Vec<Row> = evaluator
                    .evaluate(item, &rows)
                    .into_iter()
                    .filter(|r| !done.contains(&r.key()))
                    .collect();
                let t = Instant::now();
                appender.append(&out)?;
                evaluator.stats.write_s += t.elapsed().as_secs_f64();
                evaluator.stats.rows += out.len();
                evaluator.stats.errors += out.iter().filter(|r| !r.error.is_empty()).count();
                bar.inc(out.len() as u64);
            }
        }
        bar.finish_and_clear();
    }
    config.finished = true;
    config.write(&args.out)?;
    let wall = started.elapsed().as_secs_f64();
    eprintln!(
        "bench: {} rows in {wall:.1} s ({:.2} rows/s; {} images encoded {} times{}), {} with errors; encode {:.1} s, decode {:.1} s, metrics {:.1} s, read {:.1} s, write{} {:.3} s; {} of {total} rows in {}",
        stats.rows,
        stats.rows as f64 / wall.max(1e-9),
        stats.images,
        stats.encodes,
        if args.no_encode_once {
            " (--no-encode-once)"
        } else {
            ""
        },
        stats.errors,
        stats.encode_s,
        stats.decode_s,
        stats.metrics_s,
        stats.read_s,
        if args.no_fsync { "" } else { "+fsync" },
        stats.write_s,
        existing.len() + stats.rows,
        results_path.display(),
    );
    Ok(())
}

fn key(model: &str, item: &Item, row: &PlannedRow, threshold: f32) -> RowKey {
    base_row(model, item, row, threshold).key()
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} rows {per_sec} ETA {eta} {msg}",
        )
        .expect("a valid template"),
    );
    bar
}

/// Datasets named by `--datasets`, or every folder with `anns/` (the study's in the paper's
/// order first).
fn select_datasets(root: &Path, spec: &str, split: &str) -> Result<Vec<String>> {
    let has_anns = |name: &str| root.join(name).join("anns").is_dir();
    if spec.trim() != "all" {
        return named_datasets(root, spec);
    }
    let mut found: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("reading {}", root.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .filter(|n| has_anns(n))
        .collect();
    found.sort_by_key(|n| {
        let study = dataset::STUDY_DATASETS.iter().position(|s| s.name == n);
        (study.unwrap_or(usize::MAX), n.clone())
    });
    if found.is_empty() {
        bail!(
            "no dataset under {} (expected <dataset>/anns/{split}.json folders)",
            root.display()
        );
    }
    Ok(found)
}

/// The datasets a comma-separated `--datasets` names (each a folder with `anns/` under
/// `root`), without repeats.
pub fn named_datasets(root: &Path, spec: &str) -> Result<Vec<String>> {
    let names: Vec<String> = spec
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if names.is_empty() {
        bail!("--datasets is empty");
    }
    for name in &names {
        dataset::check_relative(name)?;
        let anns = root.join(name).join("anns");
        if !anns.is_dir() {
            bail!(
                "no dataset `{name}` under {} ({} is not a folder)",
                root.display(),
                anns.display()
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    Ok(names
        .into_iter()
        .filter(|n| seen.insert(n.clone()))
        .collect())
}

fn parse_prompt_list(list: &str) -> Result<Vec<String>> {
    let ids: Vec<String> = list
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if ids.is_empty() {
        bail!("--prompts is empty");
    }
    for id in &ids {
        if dataset::prompt_number(id) == u32::MAX {
            bail!("`{id}` is not a prompt id (p0, p1, …)");
        }
    }
    Ok(ids)
}

fn resolve_models(
    weights: &[PathBuf],
    ids: &[String],
    threshold: Option<f32>,
) -> Result<Vec<ModelSpec>> {
    let mut models = Vec::new();
    for path in weights {
        // Fails early, before any work, on something that is not a model.
        let source = ModelSource::resolve(None, Some(path), None)
            .with_context(|| format!("--weights {}", path.display()))?;
        if let ModelSource::Dir(dir) = &source {
            vlsm::files::DirFiles::read(dir)
                .with_context(|| format!("--weights {}", dir.display()))?;
        }
        models.push((model_name(path), path.display().to_string(), source));
    }
    let ids: Vec<String> = if ids.is_empty() && weights.is_empty() {
        vec![hub::DEFAULT_MODEL.to_string()]
    } else {
        ids.to_vec()
    };
    for spec in ids {
        let (arch, id) = match spec.split_once(':') {
            Some((arch, id)) => (Some(arch), Some(id)),
            None if Arch::from_name(&spec).is_some() => (Some(spec.as_str()), None),
            None => (None, Some(spec.as_str())),
        };
        let arch = arch
            .map(|a| {
                Arch::from_name(a).with_context(|| {
                    format!(
                        "--model {spec}: `{a}` is not a model family ({})",
                        Arch::ALL.map(Arch::name).join(", ")
                    )
                })
            })
            .transpose()?;
        let source =
            ModelSource::resolve(id, None, arch).with_context(|| format!("--model {spec}"))?;
        models.push((spec.clone(), spec, source));
    }
    let mut seen = std::collections::HashSet::new();
    let mut specs = Vec::new();
    for (name, origin, source) in models {
        if !seen.insert(name.clone()) {
            bail!("two models are named `{name}`: give their folders different names");
        }
        let weights_sha256 = weights_sha256(&source)?;
        let arch = source.arch()?;
        specs.push(ModelSpec {
            id: ModelId {
                name,
                source: origin,
                weights_sha256,
                arch: Some(arch.name().into()),
                threshold: Some(threshold.unwrap_or(arch.default_threshold())),
            },
            source,
        });
    }
    Ok(specs)
}

/// A model folder's name in the results: the folder's own name, except for the exports
/// of `vlsm train` (`RUN/model/`, `RUN/model-fp16/`), named by their run (`RUN`,
/// `RUN-fp16`), so two trained runs can be compared. A checkpoint file is named by its
/// stem, except medvlsm's `<run>/checkpoints/{best,last}.ckpt`: by the run (`<run>-best`).
fn model_name(dir: &Path) -> String {
    let Some(canonical) = dir.canonicalize().ok() else {
        return dir.display().to_string();
    };
    if canonical.is_file() {
        let stem = canonical
            .file_stem()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let run = canonical
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "checkpoints"))
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().to_string());
        return match run {
            Some(run) => format!("{run}-{stem}"),
            None => stem,
        };
    }
    let own = canonical
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| dir.display().to_string());
    let run = canonical
        .parent()
        .filter(|p| p.join("config.toml").is_file())
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().to_string());
    match (own.as_str(), run) {
        ("model", Some(run)) => run,
        ("model-fp16", Some(run)) => format!("{run}-fp16"),
        _ => own,
    }
}

/// The sha256 of the model's weight file; of several (BiomedCLIPSeg's towers and decoder
/// checkpoints), the sha256 of their hashes, one per line, in order.
fn weights_sha256(source: &ModelSource) -> Result<String> {
    let files = match source {
        ModelSource::Dir(dir) => vec![
            vlsm::files::DirFiles::read(dir)?
                .weights_file()
                .to_path_buf(),
        ],
        ModelSource::Biomed(s) => s.weight_files()?,
        ModelSource::Cris(s) => vec![s.checkpoint.clone()],
    };
    let hashes = files
        .iter()
        .map(|f| crate::share::hash_file(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(match hashes.as_slice() {
        [one] => one.clone(),
        several => vlsm::share::sha256_hex(several.join("\n").as_bytes()),
    })
}

/// Reads every annotation file and lists the rows each entry should give, for this shard.
fn plan(
    root: &Path,
    datasets: &[String],
    split: &str,
    wanted: Option<&[String]>,
    list_prompts: ListPrompts,
    controls: bool,
    shard: Option<[usize; 2]>,
) -> Vec<Item> {
    let mut items = Vec::new();
    let in_shard = |dataset: &str, split: &str, entry: Option<usize>| match shard {
        Some([k, n]) => shard_of(dataset, split, entry, n) == k,
        None => true,
    };
    for name in datasets {
        for split in dataset::splits_for(name, split) {
            let path = root.join(name).join("anns").join(format!("{split}.json"));
            let parsed = std::fs::read(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|bytes| {
                    dataset::parse_annotations_indexed(&bytes, &path.display().to_string())
                        .map_err(|e| e.to_string())
                });
            let (entries, bad) = match parsed {
                Ok(parsed) => parsed,
                Err(message) => {
                    if in_shard(name, &split, None) {
                        items.push(problem(name, &split, None, message));
                    }
                    continue;
                }
            };
            let ids = dataset::prompt_ids(
                name,
                &entries.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            );
            let ids: Vec<String> = match wanted {
                None => ids,
                // Ids a dataset does not have (p9 for BUSI) are left out, not errors.
                Some(w) => w.iter().filter(|id| ids.contains(id)).cloned().collect(),
            };
            // Entries in file order, unreadable ones included (as a merge sorts them).
            let first_item = items.len();
            for b in bad {
                if in_shard(name, &split, Some(b.index)) {
                    let message = format!("{} entry {}: {}", path.display(), b.index, b.message);
                    items.push(problem(name, &split, Some(b.index), message));
                }
            }
            for (index, entry) in entries {
                if !in_shard(name, &split, Some(index)) {
                    continue;
                }
                let mut rows = Vec::new();
                for id in &ids {
                    match entry.prompts.get(id) {
                        None => rows.push(PlannedRow {
                            prompt_id: id.clone(),
                            member: 0,
                            text: Err(format!("entry {index} has no {id}")),
                        }),
                        Some(PromptValue::List(l)) if l.is_empty() => rows.push(PlannedRow {
                            prompt_id: id.clone(),
                            member: 0,
                            text: Err(format!("entry {index}: {id} is an empty list")),
                        }),
                        Some(value) => {
                            let key = format!(
                                "{name}/{split}/{}/{}/{id}",
                                entry.img_name, entry.mask_name
                            );
                            for member in list_prompts.members(value, &key) {
                                rows.push(PlannedRow {
                                    prompt_id: id.clone(),
                                    member,
                                    text: Ok(value.texts()[member].clone()),
                                });
                            }
                        }
                    }
                }
                if controls {
                    for (id, text) in vlsm::prompts::control_prompts(name, &entry.prompts) {
                        rows.push(PlannedRow {
                            prompt_id: id.to_string(),
                            member: 0,
                            text: text.map_err(|why| format!("entry {index}: {why}")),
                        });
                    }
                }
                items.push(Item {
                    dataset: name.clone(),
                    split: split.clone(),
                    entry: Some(index),
                    source: Ok(entry),
                    rows,
                });
            }
            items[first_item..].sort_by_key(|item| item.entry);
        }
    }
    items
}

fn problem(dataset: &str, split: &str, entry: Option<usize>, message: String) -> Item {
    Item {
        dataset: dataset.into(),
        split: split.into(),
        entry,
        source: Err(message.clone()),
        rows: vec![PlannedRow {
            prompt_id: String::new(),
            member: 0,
            text: Err(message),
        }],
    }
}

/// A row of `item` with nothing measured yet.
fn base_row(model: &str, item: &Item, row: &PlannedRow, threshold: f32) -> Row {
    Row {
        threshold,
        model: model.to_string(),
        dataset: item.dataset.clone(),
        split: item.split.clone(),
        entry: item.entry,
        prompt_id: row.prompt_id.clone(),
        member: row.member,
        prompt: row.text.clone().unwrap_or_default(),
        image: item
            .source
            .as_ref()
            .map(Entry::image_label)
            .unwrap_or_default(),
        mask: item
            .source
            .as_ref()
            .map(|e| e.mask_name.clone())
            .unwrap_or_default(),
        ..Row::empty()
    }
}

#[derive(Default)]
struct RunStats {
    rows: usize,
    errors: usize,
    images: usize,
    encodes: usize,
    read_s: f64,
    encode_s: f64,
    decode_s: f64,
    metrics_s: f64,
    write_s: f64,
}

struct Evaluator<'a> {
    segmenter: &'a Segmenter,
    model: &'a str,
    root: &'a Path,
    /// Each prompt's logits are scored at every one of these.
    thresholds: Vec<f32>,
    nsd_tolerance: f64,
    encode_once: bool,
    /// The embedding of each prompt text (one row): the text tower runs once per distinct
    /// prompt.
    text_cache: HashMap<String, vlsm::Conditioning>,
    stats: &'a mut RunStats,
}

/// One prompt's scores at one threshold.
struct Scored {
    at_image: Scores,
    at_model: Scores,
    /// Pixel counts at the original resolution.
    counts: Overlap,
}

/// An image and its ground truth, checked to match.
struct Sample {
    image: image::RgbImage,
    truth: Vec<u8>,
}

impl Evaluator<'_> {
    /// The rows of one entry. Whatever goes wrong with it (an unreadable image, a failing
    /// model call, even a bug that panics) becomes an error on its rows, and the run goes
    /// on: one bad entry must not stop a benchmark, nor every resume of it.
    fn evaluate(&mut self, item: &Item, rows: &[&PlannedRow]) -> Vec<Row> {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.evaluate_entry(item, rows)
        }));
        let message = match result {
            Ok(Ok(out)) => return out,
            Ok(Err(e)) => format!("{e:#}").replace('\n', " "),
            Err(panic) => format!("internal error: {}", crate::panic_message(&*panic)),
        };
        rows.iter()
            .flat_map(|r| {
                self.thresholds.iter().map(|&t| Row {
                    error: message.clone(),
                    ..base_row(self.model, item, r, t)
                })
            })
            .collect()
    }

    fn evaluate_entry(&mut self, item: &Item, rows: &[&PlannedRow]) -> Result<Vec<Row>> {
        let thresholds = self.thresholds.clone();
        let base = |row: &PlannedRow, t: f32| base_row(self.model, item, row, t);
        // One row per (prompt, threshold), all with the same message.
        let failed = |error: String| -> Vec<Row> {
            rows.iter()
                .flat_map(|r| {
                    thresholds.iter().map(|&t| Row {
                        error: error.clone(),
                        ..base(r, t)
                    })
                })
                .collect()
        };
        let entry = match &item.source {
            Ok(entry) => entry,
            Err(message) => return Ok(failed(message.clone())),
        };
        let t = Instant::now();
        let sample = self.load(item, entry);
        self.stats.read_s += t.elapsed().as_secs_f64();
        let sample = match sample {
            Ok(s) => s,
            Err(e) => return Ok(failed(format!("{e:#}").replace('\n', " "))),
        };
        let (w, h) = sample.image.dimensions();
        let size = self.segmenter.input_size();
        let truth_model =
            preprocess::resize_nearest(&sample.truth, w as usize, h as usize, size, size);
        let texts: Vec<&str> = rows
            .iter()
            .filter_map(|r| r.text.as_ref().ok().map(String::as_str))
            .collect();
        let logits = self.logits(&sample.image, &texts)?;
        let t = Instant::now();
        // Scores of every prompt at every threshold, in parallel: HD95/NSD at the original
        // size cost about as much as decoding a prompt.
        let tolerance = self.nsd_tolerance;
        let pairs: Vec<(&vlsm::Logits, f32)> = logits
            .iter()
            .flat_map(|l| thresholds.iter().map(move |&t| (l, t)))
            .collect();
        let scored: Vec<Result<Scored>> = pairs
            .par_iter()
            .map(|&(l, threshold)| {
                let pred_model = l.mask(threshold);
                let pred = l.mask_at(threshold, w, h);
                Ok(Scored {
                    at_model: Scores::of(&pred_model, &truth_model, size, size, tolerance)?,
                    at_image: Scores::of(&pred, &sample.truth, w as usize, h as usize, tolerance)?,
                    counts: Overlap::of(&pred, &sample.truth)?,
                })
            })
            .collect();
        let mut scored = scored.into_iter();
        let mut out = Vec::with_capacity(rows.len() * thresholds.len());
        let pixels = u64::from(w) * u64::from(h);
        for row in rows {
            for &threshold in &thresholds {
                let mut r = base(row, threshold);
                r.width = Some(w);
                r.height = Some(h);
                if let Err(message) = &row.text {
                    r.error = message.clone();
                    out.push(r);
                    continue;
                }
                let Scored {
                    at_image,
                    at_model,
                    counts,
                } = scored.next().expect("one score per prompt and threshold")?;
                r.dice = Some(at_image.dice);
                r.iou = Some(at_image.iou);
                r.hd95 = Some(at_image.hd95);
                r.nsd = Some(at_image.nsd);
                r.dice_model = Some(at_model.dice);
                r.iou_model = Some(at_model.iou);
                r.hd95_model = Some(at_model.hd95);
                r.nsd_model = Some(at_model.nsd);
                r.foreground = Some(counts.predicted as f64 / pixels as f64);
                r.tp = Some(counts.both);
                r.fp = Some(counts.predicted - counts.both);
                r.fn_ = Some(counts.truth - counts.both);
                r.tn = Some(pixels - (counts.predicted + counts.truth - counts.both));
                out.push(r);
            }
        }
        self.stats.metrics_s += t.elapsed().as_secs_f64();
        Ok(out)
    }

    fn load(&self, item: &Item, entry: &Entry) -> Result<Sample> {
        let (image, truth) =
            dataset::read_sample(&self.root.join(&item.dataset), &item.split, entry)?;
        Ok(Sample { image, truth })
    }

    /// Logits for each prompt: one encoding for all of them, or (without encode-once) one
    /// per prompt.
    fn logits(&mut self, image: &image::RgbImage, texts: &[&str]) -> Result<Vec<vlsm::Logits>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        self.stats.images += 1;
        let missing: Vec<&str> = {
            let mut m: Vec<&str> = texts
                .iter()
                .copied()
                .filter(|t| !self.text_cache.contains_key(*t))
                .collect();
            m.sort();
            m.dedup();
            m
        };
        let t = Instant::now();
        if !missing.is_empty() {
            let embedded = self.segmenter.embed_prompts(&missing)?;
            for (i, text) in missing.iter().enumerate() {
                let row = embedded.conditioning.rows(i, 1);
                self.text_cache.insert(text.to_string(), row);
            }
        }
        self.stats.decode_s += t.elapsed().as_secs_f64();
        let conditioning = |texts: &[&str]| {
            vlsm::Conditioning::cat(texts.iter().map(|t| self.text_cache[*t].clone()).collect())
        };
        if self.encode_once {
            let t = Instant::now();
            let encoded = self.segmenter.encode_image(image)?;
            self.stats.encodes += 1;
            self.stats.encode_s += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let logits = self
                .segmenter
                .decode_conditioning(&encoded, &conditioning(texts)?)?;
            self.stats.decode_s += t.elapsed().as_secs_f64();
            Ok(logits)
        } else {
            let mut all = Vec::with_capacity(texts.len());
            for text in texts {
                let t = Instant::now();
                let encoded = self.segmenter.encode_image(image)?;
                self.stats.encodes += 1;
                self.stats.encode_s += t.elapsed().as_secs_f64();
                let t = Instant::now();
                all.extend(
                    self.segmenter
                        .decode_conditioning(&encoded, &conditioning(&[text])?)?,
                );
                self.stats.decode_s += t.elapsed().as_secs_f64();
            }
            Ok(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_entries() {
        for n in [1, 2, 3, 7] {
            let mut counts = vec![0; n];
            for i in 0..100 {
                counts[shard_of("kvasir_polyp", "test", Some(i), n) - 1] += 1;
            }
            assert_eq!(counts.iter().sum::<usize>(), 100);
            assert!(counts.iter().all(|&c| c >= 100 / n - 1), "{counts:?}");
        }
        assert_eq!(shard_of("d", "test", None, 4), 1);
    }

    #[test]
    fn shard_and_prompt_arguments() {
        assert_eq!(parse_shard("2/8").unwrap(), [2, 8]);
        for bad in ["0/2", "3/2", "1/0", "x/2", "2"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_prompt_list("p0, p3").unwrap(), ["p0", "p3"]);
        assert!(parse_prompt_list("p1,foo").is_err());
        assert!(parse_tolerance("-1").is_err() && parse_tolerance("2.5").is_ok());
    }
}
