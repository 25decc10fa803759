//! `vlsm train`: fine-tune CLIPSeg's decoder on medvlsm-layout datasets with the study's
//! recipe (see `vlsm::train`). The frozen encoders run once per image and prompt; epochs then
//! train the decoder on the cached activations. Checkpoints survive a kill (`--resume`), and
//! the best model is exported as a Hugging Face CLIPSeg directory (`RUN/model/`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use vlsm::burn::tensor::{Device, Tensor};
use vlsm::dataset::{self, ListPrompts, PromptValue};
use vlsm::model::ClipSeg;
use vlsm::model::clipseg::{Decoder, pixels_tensor};
use vlsm::model::layers::NamedTensor;
use vlsm::train::{
    CachedSample, DecoderModel, EpochLog, ImageSample, Loss, Precision, Progress, PromptChoices,
    Recipe, Trainer, TrainingModel, target_tensor, write_synced,
};
use vlsm::{Segmenter, preprocess};

use crate::backend::{self, Backend};
use crate::model_source::{ModelArgs, ModelSource};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The base model (or the --config file's `base`). BiomedCLIPSeg (`--arch
    /// biomedclipseg` on the BiomedCLIP towers) starts from a decoder initialised at random
    /// from the seed, as the study; BiomedCLIPSeg-D from CIDAS's decoder.
    #[command(flatten)]
    model: ModelArgs,
    /// The folder holding `<dataset>/anns/{train,val}.json`, `images/`, `masks/` (or the
    /// --config file's `data`).
    #[arg(long, value_name = "ROOT")]
    data: Option<PathBuf>,
    /// Comma-separated datasets, pooled (or the --config file's `datasets`).
    #[arg(long)]
    datasets: Option<String>,
    /// The prompt id (p0…p9), or `random`: a prompt among p1..pN per sample (as medvlsm's
    /// pooled runs) [default: p1, or the --config file's `prompt`].
    #[arg(long)]
    prompt: Option<String>,
    /// Run folder: config.toml, metrics.csv, training.png/.svg, checkpoint/, model/.
    #[arg(long)]
    out: PathBuf,
    /// Most epochs to train (early stopping may end sooner) [default: 1000, the study's].
    #[arg(long)]
    epochs: Option<usize>,
    /// Samples per optimizer step [default: 128, the study's].
    #[arg(long)]
    batch_size: Option<usize>,
    /// AdamW learning rate [default: 0.002, the study's].
    #[arg(long)]
    lr: Option<f64>,
    /// `dice` (the study's effective loss) or `dice-bce` (Dice + 0.2·BCE-with-logits).
    #[arg(long)]
    loss: Option<String>,
    /// Mixed precision: `f16` (the study's `16-mixed`: float16 passes, dynamic loss
    /// scaling), `bf16`, or `f32` (none, the default). Weights and optimizer stay float32.
    #[arg(long)]
    precision: Option<String>,
    /// A TOML file overriding any recipe field (epochs, min_epochs, batch_size, lr,
    /// weight_decay, grad_clip_norm, plateau_factor, plateau_patience,
    /// early_stopping_patience, seed, threshold, precision, [loss]) and giving base, data,
    /// datasets, prompt: a run's own RUN/config.toml is one. Command-line options win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Also write the exported model's weights as float16 (`model-fp16/`, for the browser).
    #[arg(long)]
    fp16: bool,
    /// Full fine-tuning: train the CLIP towers too (all but the vision position table),
    /// running them in every step. The study trains only CLIPSeg's decoder; CRIS always
    /// trains whole, as in the study.
    #[arg(long, conflicts_with = "no_cache")]
    full: bool,
    /// Gradient accumulation: run each batch as N smaller passes and take one optimizer step
    /// on their summed gradients (the batch's step in less memory; BatchNorm sees the
    /// passes' statistics) [default: 1].
    #[arg(long, value_name = "N")]
    accumulate: Option<usize>,
    /// Run the frozen encoders again for every epoch instead of caching their outputs once
    /// (same results, much slower: for measuring what the cache saves).
    #[arg(long)]
    no_cache: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
}

/// What a run was started with (`RUN/config.toml`); `--resume` refuses a different one.
/// The file is flat TOML — `base`, `data`, `datasets`, `prompt` beside the recipe's fields —
/// the same schema `--config` reads, so a run's config starts another run.
#[derive(Debug, Clone, PartialEq)]
struct RunConfig {
    base: String,
    data: String,
    datasets: Vec<String>,
    prompt: String,
    recipe: Recipe,
}

/// A `--config` file (or `RUN/config.toml`): every run field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFields {
    base: Option<String>,
    data: Option<String>,
    datasets: Option<Vec<String>>,
    prompt: Option<String>,
}

const RUN_FIELDS: [&str; 4] = ["base", "data", "datasets", "prompt"];

impl RunConfig {
    fn to_toml(&self) -> Result<String> {
        let mut table = toml::Table::try_from(&self.recipe)?;
        table.insert("base".into(), self.base.clone().into());
        table.insert("data".into(), self.data.clone().into());
        table.insert(
            "datasets".into(),
            toml::Value::Array(self.datasets.iter().map(|d| d.clone().into()).collect()),
        );
        table.insert("prompt".into(), self.prompt.clone().into());
        Ok(toml::to_string_pretty(&table)?)
    }
}

/// Reads a config file: the run fields, then the recipe from the rest (unknown keys refused).
fn read_config(path: &Path) -> Result<(RunFields, Recipe)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = |e: toml::de::Error| anyhow::anyhow!("{}: {}", path.display(), e.message());
    let mut table: toml::Table = toml::from_str(&text).map_err(bad)?;
    let mut run = toml::Table::new();
    for key in RUN_FIELDS {
        if let Some(v) = table.remove(key) {
            run.insert(key.into(), v);
        }
    }
    let fields: RunFields = run.try_into().map_err(bad)?;
    let recipe: Recipe = table.try_into().map_err(bad)?;
    Ok((fields, recipe))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let (file, file_recipe) = match &args.config {
        Some(path) => {
            let (file, recipe) = read_config(path)?;
            (file, Some(recipe))
        }
        None => (RunFields::default(), None),
    };
    let data_root = args
        .data
        .clone()
        .or_else(|| file.data.clone().map(PathBuf::from))
        .context("--data ROOT is required (or `data` in the --config file)")?;
    let dataset_list = args
        .datasets
        .clone()
        .or_else(|| file.datasets.as_ref().map(|d| d.join(",")))
        .context("--datasets is required (or `datasets` in the --config file)")?;
    let prompt = args
        .prompt
        .clone()
        .or_else(|| file.prompt.clone())
        .unwrap_or_else(|| "p1".into());
    // The command line's recipe options, applied to the family's base recipe below; first
    // checked on the default one, so bad options fail before any model is fetched.
    let apply = |recipe: &mut Recipe| -> Result<()> {
        apply_recipe_options(&args, recipe)?;
        Ok(recipe.check()?)
    };
    apply(&mut file_recipe.clone().unwrap_or_default())?;
    let datasets = crate::bench::named_datasets(&data_root, &dataset_list)?;
    if prompt != "random" && dataset::prompt_number(&prompt) == u32::MAX {
        bail!("--prompt {prompt}: expected p0…p9 or random");
    }
    let mut model_args = args.model.clone();
    if model_args.model.is_none()
        && model_args.weights.is_none()
        && let Some(base) = &file.base
    {
        model_args.weights = Some(PathBuf::from(base));
    }
    let source = model_args.resolve()?;
    let arch = source.arch()?;
    // The study's recipe for the family, unless a config file gives one.
    let mut recipe = file_recipe.unwrap_or_else(|| match arch {
        vlsm::Arch::Cris => Recipe::cris(),
        _ => Recipe::default(),
    });
    apply(&mut recipe)?;
    let config = RunConfig {
        base: match (&model_args.weights, &model_args.model) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(id)) => id.clone(),
            (None, None) => source.describe(),
        },
        data: data_root.display().to_string(),
        datasets: datasets.clone(),
        prompt: prompt.clone(),
        recipe: recipe.clone(),
    };
    if args.resume {
        let path = args.out.join("config.toml");
        if !path.is_file() {
            bail!("--resume: {} has no config.toml", args.out.display());
        }
        let (fields, old_recipe) = read_config(&path)?;
        let old = RunConfig {
            base: fields.base.unwrap_or_default(),
            data: fields.data.unwrap_or_default(),
            datasets: fields.datasets.unwrap_or_default(),
            prompt: fields.prompt.unwrap_or_default(),
            recipe: old_recipe,
        };
        if old != config {
            bail!(
                "--resume: {} was started with other options; use them, or another --out",
                args.out.display()
            );
        }
    } else if args.out.join("config.toml").exists() {
        bail!(
            "{} holds a run: pass --resume to continue it, or use another --out",
            args.out.display()
        );
    }
    let device = backend::device(args.backend)?;
    recipe.precision.check(&device)?;
    // CRIS trains whole, as the study trains it.
    let full = args.full || arch == vlsm::Arch::Cris;
    let segmenter = source.load_for_training(&device, recipe.seed, full)?;
    let data = Data {
        root: &data_root,
        datasets: &datasets,
        prompt: &prompt,
        choice: ListPrompts::Random { seed: recipe.seed },
        precision: recipe.precision,
    };
    let run = Run {
        args: &args,
        source: &source,
        config: &config,
        recipe: &recipe,
        segmenter: &segmenter,
        device: &device,
    };
    if full {
        let started = std::time::Instant::now();
        let train = image_samples(&segmenter, &data, "train")?;
        let val = image_samples(&segmenter, &data, "val")?;
        eprintln!(
            "full fine-tuning: {} training and {} validation samples read in {:.1} s",
            train.len(),
            val.len(),
            started.elapsed().as_secs_f64()
        );
        match &segmenter.model {
            vlsm::Model::Cris(cris) => fit(&run, cris.clone(), train, val, None),
            model => fit(&run, model.clipseg()?.clone(), train, val, None),
        }
    } else {
        let started = std::time::Instant::now();
        let train = cached_samples(&segmenter, &data, "train")?;
        let val = cached_samples(&segmenter, &data, "val")?;
        let bytes: usize = train
            .iter()
            .chain(&val)
            .flat_map(|s| &s.taps)
            .map(|t| t.shape().num_elements() * t.dtype().size())
            .sum();
        eprintln!(
            "cached the frozen encoders' outputs: {} training and {} validation samples in {:.1} s ({:.1} MiB of vision taps)",
            train.len(),
            val.len(),
            started.elapsed().as_secs_f64(),
            bytes as f64 / (1 << 20) as f64
        );
        let refresh = || -> Result<(Vec<CachedSample>, Vec<CachedSample>)> {
            Ok((
                cached_samples(&segmenter, &data, "train")?,
                cached_samples(&segmenter, &data, "val")?,
            ))
        };
        let model = DecoderModel {
            decoder: segmenter.model.decoder()?.clone(),
            grid: segmenter.model.grid(),
        };
        fit(
            &run,
            model,
            train,
            val,
            args.no_cache.then_some(&refresh as &dyn Fn() -> _),
        )
    }
}

/// `--epochs`, `--batch-size`, `--lr`, `--loss`, `--precision`, `--accumulate` on a recipe.
fn apply_recipe_options(args: &TrainArgs, recipe: &mut Recipe) -> Result<()> {
    if let Some(e) = args.epochs {
        recipe.epochs = e;
    }
    if let Some(b) = args.batch_size {
        recipe.batch_size = b;
    }
    if let Some(lr) = args.lr {
        recipe.lr = lr;
    }
    match args.loss.as_deref() {
        None => {}
        Some("dice") => recipe.loss = Loss::Dice,
        Some("dice-bce") => recipe.loss = Loss::DiceBce { bce_weight: 0.2 },
        Some(other) => bail!("--loss {other}: expected dice or dice-bce"),
    }
    if let Some(p) = &args.precision {
        recipe.precision = p.parse().map_err(|e| anyhow::anyhow!("--precision: {e}"))?;
    }
    if let Some(n) = args.accumulate {
        recipe.accumulate = n;
    }
    Ok(())
}

/// What one `vlsm train` invocation works with.
struct Run<'a> {
    args: &'a TrainArgs,
    source: &'a ModelSource,
    config: &'a RunConfig,
    recipe: &'a Recipe,
    segmenter: &'a Segmenter,
    device: &'a Device,
}

/// Where samples come from.
struct Data<'a> {
    root: &'a Path,
    datasets: &'a [String],
    prompt: &'a str,
    choice: ListPrompts,
    /// The cache holds the vision taps in the training's precision (half the memory in
    /// f16/bf16, as autocast's frozen encoders would hand them over).
    precision: Precision,
}

type Refresh<'a, S> = &'a dyn Fn() -> Result<(Vec<S>, Vec<S>)>;

/// Trains `model` (resuming when asked), writing checkpoints and the log each epoch, then
/// exports the best model. `refresh` (for `--no-cache`) rebuilds the samples every epoch.
fn fit<M: Trained>(
    run: &Run,
    model: M,
    mut train: Vec<M::Sample>,
    mut val: Vec<M::Sample>,
    refresh: Option<Refresh<M::Sample>>,
) -> Result<()> {
    let (args, recipe) = (run.args, run.recipe);
    let checkpoint_dir = args.out.join("checkpoint");
    // The data are usable: the run folder starts here.
    std::fs::create_dir_all(&checkpoint_dir)
        .with_context(|| format!("creating {}", checkpoint_dir.display()))?;
    write_synced(
        &args.out.join("config.toml"),
        run.config.to_toml()?.as_bytes(),
    )?;
    let mut trainer = Trainer::new(model, recipe.clone(), run.device)?;
    let mut log: Vec<EpochLog> = Vec::new();
    if args.resume {
        let last = checkpoint::find(&checkpoint_dir, "last")
            .with_context(|| format!("--resume: no checkpoint in {}", checkpoint_dir.display()))?;
        let (model, progress, optimizer, epochs) = checkpoint::read::<M>(&last, run)?;
        trainer = Trainer::new(model, recipe.clone(), run.device)?;
        trainer.progress = progress;
        trainer.optimizer = trainer
            .optimizer
            .clone()
            .from_bytes(vlsm::burn::tensor::Bytes::from_bytes_vec(optimizer))
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: the optimizer state is unreadable: {e:?}",
                    last.display()
                )
            })?;
        log = epochs;
        eprintln!(
            "resuming after epoch {} (lr {:e})",
            trainer.progress.epoch, trainer.progress.lr
        );
    }
    let started = std::time::Instant::now();
    let mut trained = 0usize;
    while !trainer.progress.done(recipe) {
        if let Some(refresh) = refresh {
            (train, val) = refresh()?;
        }
        let bar = ProgressBar::new(train.len().div_ceil(recipe.batch_size) as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} epoch {msg} {wide_bar} {pos}/{len} steps {per_sec} ETA {eta}",
            )
            .expect("a valid template"),
        );
        bar.set_message(format!("{}", trainer.progress.epoch + 1));
        let epoch = trainer.epoch(&train, &val, |_, _, _| bar.inc(1))?;
        bar.finish_and_clear();
        trained += train.len();
        log.push(epoch);
        eprintln!(
            "epoch {:>4}  train loss {:.4}  val loss {:.4}  val Dice {:.4}  lr {:e}{}{}",
            epoch.epoch,
            epoch.train_loss,
            epoch.val_loss,
            epoch.val_dice,
            epoch.lr,
            if epoch.improved { "  (best)" } else { "" },
            match epoch.skipped_steps {
                0 => String::new(),
                n => format!(
                    "  ({n} step(s) skipped: float16 overflow, loss scale now {})",
                    trainer.progress.loss_scale
                ),
            }
        );
        // Best first: a kill between the two writes leaves "last" one epoch behind, which a
        // resume redoes exactly.
        if epoch.improved {
            checkpoint::write(&checkpoint_dir, "best", &trainer, &log, run)?;
        }
        checkpoint::write(&checkpoint_dir, "last", &trainer, &log, run)?;
        write_metrics(&args.out, &log)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    if trained > 0 {
        eprintln!(
            "trained {trained} samples in {elapsed:.1} s: {:.1} samples/s{}",
            trained as f64 / elapsed,
            if trainer.progress.stopped_early {
                " (stopped early)"
            } else {
                ""
            }
        );
    }
    if let Err(e) = crate::plot::training_curves(&log, &args.out) {
        eprintln!("warning: no training plot: {e:#}");
    }
    // Export the best model as a Hugging Face model directory.
    let best = checkpoint::find(&checkpoint_dir, "best").context("no best checkpoint")?;
    let (model, progress, _, _) = checkpoint::read::<M>(&best, run)?;
    let model_dir = args.out.join("model");
    run.source.export(model.export()?, &model_dir, false)?;
    if args.fp16 {
        run.source
            .export(model.export()?, &args.out.join("model-fp16"), true)?;
    }
    println!(
        "best val Dice {:.4} at epoch {} → {}",
        progress.best_val_dice,
        progress.best_epoch,
        model_dir.display()
    );
    Ok(())
}

/// A trainable model that can be saved in and rebuilt from a checkpoint folder.
trait Trained: TrainingModel {
    /// Its trained tensors, under Hugging Face names.
    fn export(&self) -> Result<Vec<NamedTensor>>;
    fn save(&self, dir: &Path, run: &Run) -> Result<()>;
    fn load(dir: &Path, run: &Run) -> Result<Self>;
}

impl Trained for DecoderModel {
    fn export(&self) -> Result<Vec<NamedTensor>> {
        Ok(self.decoder.export()?)
    }

    /// Only the decoder: `decoder.safetensors`.
    fn save(&self, dir: &Path, _: &Run) -> Result<()> {
        let bytes =
            vlsm::weights::write_safetensors(&self.decoder.export()?, vlsm::weights::Storage::F32)?;
        Ok(write_synced(&dir.join("decoder.safetensors"), &bytes)?)
    }

    fn load(dir: &Path, run: &Run) -> Result<Self> {
        let bytes = std::fs::read(dir.join("decoder.safetensors"))
            .with_context(|| format!("{}/decoder.safetensors", dir.display()))?;
        let weights = vlsm::Weights::from_safetensors(&bytes, "decoder.safetensors")?;
        Ok(DecoderModel {
            decoder: Decoder::load(
                &weights,
                "decoder",
                &run.segmenter
                    .pipeline
                    .config
                    .decoder()
                    .context("this model has no CLIPSeg decoder")?,
                run.device,
            )?,
            grid: run.segmenter.model.grid(),
        })
    }
}

impl Trained for ClipSeg {
    fn export(&self) -> Result<Vec<NamedTensor>> {
        Ok(ClipSeg::export(self)?)
    }

    /// The whole model, as a Hugging Face directory.
    fn save(&self, dir: &Path, run: &Run) -> Result<()> {
        run.source.export(ClipSeg::export(self)?, dir, false)
    }

    fn load(dir: &Path, run: &Run) -> Result<Self> {
        Ok(Segmenter::from_dir(dir, run.device)
            .with_context(|| dir.display().to_string())?
            .model
            .clipseg()?
            .clone())
    }
}

impl Trained for vlsm::model::Cris {
    fn export(&self) -> Result<Vec<NamedTensor>> {
        Ok(vlsm::model::Cris::export(self)?)
    }

    /// The whole model, as vlsm's CRIS folder.
    fn save(&self, dir: &Path, run: &Run) -> Result<()> {
        run.source
            .export(vlsm::model::Cris::export(self)?, dir, false)
    }

    fn load(dir: &Path, run: &Run) -> Result<Self> {
        match Segmenter::from_dir(dir, run.device)
            .with_context(|| dir.display().to_string())?
            .model
        {
            vlsm::Model::Cris(m) => Ok(m),
            _ => bail!("{}: not a CRIS checkpoint", dir.display()),
        }
    }
}

fn write_metrics(out: &Path, log: &[EpochLog]) -> Result<()> {
    let mut csv = String::from("epoch,train_loss,val_loss,val_dice,lr\n");
    for e in log {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            e.epoch, e.train_loss, e.val_loss, e.val_dice, e.lr
        ));
    }
    write_synced(&out.join("metrics.csv"), csv.as_bytes())?;
    Ok(())
}

/// One entry, read and preprocessed: pixels `[3, S, S]`, its prompts, its mask at `S`×`S`.
struct Loaded {
    pixels: Vec<f32>,
    texts: PromptChoices<String>,
    mask: Vec<u8>,
}

/// Reads a split of the pooled datasets: one sample per entry. The training split keeps
/// every prompt a sample may be shown (each epoch draws one, as medvlsm at every
/// `__getitem__`); the validation split one seeded draw per sample, so the early-stopping
/// signal does not move with the prompts.
fn load_split(segmenter: &Segmenter, data: &Data, split: &str) -> Result<Vec<Loaded>> {
    let size = segmenter.input_size();
    let every_prompt = split == "train";
    let mut samples = Vec::new();
    for name in data.datasets {
        let path = data
            .root
            .join(name)
            .join("anns")
            .join(format!("{split}.json"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let (entries, bad) =
            dataset::parse_annotations_indexed(&bytes, &path.display().to_string())?;
        if let Some(b) = bad.first() {
            bail!("{} entry {}: {}", path.display(), b.index, b.message);
        }
        let dir = data.root.join(name);
        let ids = dataset::prompt_ids(
            name,
            &entries.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        );
        // The prompt ids: fixed, or (`random`) p1..pN.
        let pool: Vec<String> = if data.prompt == "random" {
            ids.iter().filter(|i| *i != "p0").cloned().collect()
        } else {
            vec![data.prompt.to_string()]
        };
        if pool.is_empty() {
            bail!("{}: no prompts besides p0 to draw from", path.display());
        }
        for (index, entry) in entries {
            let key = format!("{name}/{split}/{index}");
            let texts_of = |id: &String| -> Result<Vec<String>> {
                let texts = entry
                    .prompts
                    .get(id)
                    .with_context(|| format!("{} entry {index} has no {id}", path.display()))?
                    .texts();
                if texts.is_empty() {
                    bail!("{} entry {index}: {id} is an empty list", path.display());
                }
                Ok(texts.to_vec())
            };
            let texts = if every_prompt {
                pool.iter().map(texts_of).collect::<Result<Vec<_>>>()?
            } else {
                let id = &pool[data
                    .choice
                    .members(&PromptValue::List(pool.clone()), &format!("{key}/random"))[0]];
                let value = PromptValue::List(texts_of(id)?);
                let member = data.choice.members(&value, &format!("{key}/{id}"))[0];
                vec![vec![value.texts()[member].clone()]]
            };
            let (image, mask) = dataset::read_sample(&dir, split, &entry)?;
            let (mw, mh) = image.dimensions();
            samples.push(Loaded {
                pixels: preprocess::pixel_values(&image, &segmenter.pipeline.preprocess)?,
                texts,
                mask: preprocess::resize_nearest(&mask, mw as usize, mh as usize, size, size),
            });
        }
    }
    if samples.is_empty() {
        bail!(
            "the {split} split of {} has no entries",
            data.datasets.join(", ")
        );
    }
    Ok(samples)
}

/// A split with the frozen encoders already run: vision taps and prompt conditioning.
fn cached_samples(segmenter: &Segmenter, data: &Data, split: &str) -> Result<Vec<CachedSample>> {
    let size = segmenter.input_size();
    let device = &segmenter.device;
    let mut conditioning: HashMap<String, Tensor<2>> = HashMap::new();
    let mut samples = Vec::new();
    for l in load_split(segmenter, data, split)? {
        let taps = segmenter
            .model
            .vision_taps(pixels_tensor(&[l.pixels], size, device))?
            .into_iter()
            .map(|t| match data.precision {
                Precision::F32 => t,
                half => t.cast(half.dtype()),
            })
            .collect();
        let mut embed = |text: &String| -> Result<Tensor<2>> {
            if let Some(c) = conditioning.get(text) {
                return Ok(c.clone());
            }
            let embedded = segmenter.embed_prompts(&[text.as_str()])?;
            let c = embedded.conditioning.film()?.clone();
            conditioning.insert(text.clone(), c.clone());
            Ok(c)
        };
        samples.push(CachedSample {
            taps,
            conditioning: l
                .texts
                .iter()
                .map(|group| group.iter().map(&mut embed).collect())
                .collect::<Result<_>>()?,
            target: target_tensor(&l.mask, size, device),
        });
    }
    Ok(samples)
}

/// A split for full fine-tuning: pixels and tokens, the encoders run in every step.
fn image_samples(segmenter: &Segmenter, data: &Data, split: &str) -> Result<Vec<ImageSample>> {
    let size = segmenter.input_size();
    let device = &segmenter.device;
    load_split(segmenter, data, split)?
        .into_iter()
        .map(|l| {
            let tokenizer = &segmenter.pipeline.tokenizer;
            Ok(ImageSample {
                pixels: pixels_tensor(&[l.pixels], size, device),
                prompts: l
                    .texts
                    .iter()
                    .map(|group| group.iter().map(|t| tokenizer.encode(t)).collect())
                    .collect::<std::result::Result<_, _>>()?,
                target: target_tensor(&l.mask, size, device),
            })
        })
        .collect()
}

/// `RUN/checkpoint/{last,best}/`: the model's weights, the optimizer state, the schedule
/// and the epoch log, written into a fresh folder that then replaces the old one.
mod checkpoint {
    use super::*;

    pub fn write<M: Trained>(
        dir: &Path,
        name: &str,
        trainer: &Trainer<M>,
        log: &[EpochLog],
        run: &Run,
    ) -> Result<()> {
        let tmp = dir.join(format!("{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        trainer.trained()?.save(&tmp, run)?;
        let optimizer = trainer
            .optimizer
            .into_bytes()
            .map_err(|e| anyhow::anyhow!("saving the optimizer state: {e:?}"))?;
        write_synced(&tmp.join("optimizer.bpk"), &optimizer)?;
        write_synced(&tmp.join("epochs.json"), &serde_json::to_vec_pretty(log)?)?;
        // Last: its presence marks a complete checkpoint.
        write_synced(
            &tmp.join("progress.json"),
            &serde_json::to_vec_pretty(&trainer.progress)?,
        )?;
        // Swap folders: `name` is always either the old or the new complete checkpoint
        // (`name.old` holds the old one for the instant between the renames).
        let target = dir.join(name);
        let old = dir.join(format!("{name}.old"));
        let _ = std::fs::remove_dir_all(&old);
        if target.exists() {
            std::fs::rename(&target, &old)?;
        }
        std::fs::rename(&tmp, &target)?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The complete checkpoint folder `name` (or its `.old` copy after a kill mid-swap).
    pub fn find(dir: &Path, name: &str) -> Option<PathBuf> {
        [dir.join(name), dir.join(format!("{name}.old"))]
            .into_iter()
            .find(|p| p.join("progress.json").is_file())
    }

    pub fn read<M: Trained>(
        dir: &Path,
        run: &Run,
    ) -> Result<(M, Progress, Vec<u8>, Vec<EpochLog>)> {
        let model = M::load(dir, run)?;
        let progress: Progress = serde_json::from_slice(&std::fs::read(dir.join("progress.json"))?)
            .with_context(|| format!("{}/progress.json", dir.display()))?;
        let optimizer = std::fs::read(dir.join("optimizer.bpk"))
            .with_context(|| format!("{}/optimizer.bpk", dir.display()))?;
        let log: Vec<EpochLog> = serde_json::from_slice(&std::fs::read(dir.join("epochs.json"))?)
            .with_context(|| format!("{}/epochs.json", dir.display()))?;
        Ok((model, progress, optimizer, log))
    }
}
