//! Fine-tuning CLIPSeg's decoder with the study's recipe (reference §4): the CLIP towers stay
//! frozen (as HF's `no_grad` makes them in medvlsm), so their outputs — the vision taps of each
//! image and the FiLM conditioning of each prompt — are computed once and cached, and only
//! the decoder (reduces, FiLM, transformer layers, head) trains on the cache.
//!
//! Loss: soft Dice on sigmoid probabilities, MONAI's `DiceLoss` (smooth 1e-5, per sample, mean
//! over the batch) — what medvlsm's `DiceCELoss(lambda_ce=0.2)` reduces to under MONAI 1.1.0,
//! whose CE term on one channel is identically 0. `Loss::DiceBce` adds λ·BCE-with-logits
//! (what newer MONAI versions would compute), a different loss. AdamW (weight decay 1e-3),
//! gradient clipping by the global norm (PyTorch's `clip_grad_norm_`, Lightning's
//! `gradient_clip_val`), ReduceLROnPlateau on the validation loss, early stopping on the
//! validation Dice.
//!
//! Mixed precision (the study trains with Lightning's `16-mixed`): the forward and backward
//! passes run in float16 or bfloat16 on a half-precision copy of the weights made by
//! differentiable casts, while the weights, the optimizer moments and the loss stay float32;
//! float16 gradients are protected from underflow by PyTorch's dynamic loss scaling
//! (`GradScaler`: scale 2¹⁶, halved and the step skipped on an overflow, doubled after 2000
//! clean steps).

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, FloatDType, Tensor, TensorData, activation};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::clipseg::Decoder;
use crate::stats::SplitMix64;

/// MONAI's `smooth_nr` and `smooth_dr` defaults.
const SMOOTH: f64 = 1e-5;

/// Soft Dice loss of logits `[B, S, S]` against binary targets: per sample
/// `1 − (2Σpg + 1e-5) / (Σp + Σg + 1e-5)` with `p = sigmoid(logit)`, then the batch mean.
pub fn soft_dice_loss(logits: Tensor<3>, targets: Tensor<3>) -> Tensor<1> {
    let [b, h, w] = logits.dims();
    let p = activation::sigmoid(logits).reshape([b, h * w]);
    let g = targets.reshape([b, h * w]);
    let intersection = (p.clone() * g.clone()).sum_dim(1);
    let denominator = p.sum_dim(1) + g.sum_dim(1);
    let dice = (intersection * 2.0 + SMOOTH) / (denominator + SMOOTH);
    (dice.neg() + 1.0).mean().reshape([1])
}

/// Binary cross-entropy with logits, mean over pixels and batch (numerically stable form
/// `max(x,0) − x·g + log(1 + e^{−|x|})`).
pub fn bce_with_logits(logits: Tensor<3>, targets: Tensor<3>) -> Tensor<1> {
    let loss = activation::relu(logits.clone()) - logits.clone() * targets
        + (logits.abs().neg().exp() + 1.0).log();
    loss.mean().reshape([1])
}

/// The training loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Loss {
    /// Soft Dice: the study's effective loss.
    Dice,
    /// Soft Dice + `bce_weight` × BCE-with-logits.
    DiceBce { bce_weight: f64 },
}

impl Loss {
    pub fn compute(&self, logits: Tensor<3>, targets: Tensor<3>) -> Tensor<1> {
        match self {
            Loss::Dice => soft_dice_loss(logits, targets),
            Loss::DiceBce { bce_weight } => {
                soft_dice_loss(logits.clone(), targets.clone())
                    + bce_with_logits(logits, targets) * *bce_weight
            }
        }
    }
}

/// The prompts a sample can be shown: groups (prompt ids) of alternatives (the members of a
/// list-valued prompt). Every epoch draws a group uniformly, then a member — medvlsm's
/// `random` prompt and list prompts, which it redraws at every `__getitem__`. One group of
/// one prompt is a fixed prompt.
pub type PromptChoices<T> = Vec<Vec<T>>;

/// Which prompt of its [`PromptChoices`] a sample is shown: (group, member).
pub type Draw = (usize, usize);

/// One training sample from the frozen encoders: the vision taps of its image (deepest
/// first, each `[1, 1 + g², H]`), the conditioning of each of its prompts (`[1, D]`), and its
/// mask at the model's resolution `[1, S, S]` (0/1).
#[derive(Debug, Clone)]
pub struct CachedSample {
    pub taps: Vec<Tensor<3>>,
    pub conditioning: PromptChoices<Tensor<2>>,
    pub target: Tensor<3>,
}

/// One sample for full fine-tuning: the preprocessed image `[1, 3, S, S]`, its tokenized
/// prompts and the mask at the model's resolution `[1, S, S]`.
#[derive(Debug, Clone)]
pub struct ImageSample {
    pub pixels: Tensor<4>,
    pub prompts: PromptChoices<crate::tokenize::TokenizedPrompt>,
    pub target: Tensor<3>,
}

/// What can be trained: a module that turns a batch of its samples into logits.
pub trait TrainingModel: Module + Clone + Sized {
    type Sample;
    /// Logits `[B, S, S]` for a batch, each sample with its drawn prompt, computed on
    /// `device` with the sample tensors cast to `dtype`, the dtype of the module's weights.
    fn logits(
        &self,
        batch: &[(&Self::Sample, Draw)],
        device: &Device,
        dtype: FloatDType,
    ) -> Result<Tensor<3>>;
    fn target(sample: &Self::Sample) -> Tensor<3>;
    /// The sizes of the sample's prompt groups.
    fn prompt_groups(sample: &Self::Sample) -> Vec<usize>;
    /// Parameters to keep fixed, after [`trainable`].
    fn keep_fixed(self) -> Self {
        self
    }
    /// The model as inference runs it, from the trained module without autodiff (models
    /// that precompute something from their weights at load redo it here).
    fn for_inference(self) -> Result<Self> {
        Ok(self)
    }
    /// The fewest samples a training batch may hold (CRIS's BatchNorm1d needs two, as in
    /// PyTorch): a shorter last batch joins the one before it.
    fn min_batch() -> usize {
        1
    }
}

/// The prompt `draw` picks from `choices`.
fn drawn<T>(choices: &PromptChoices<T>, (group, member): Draw) -> Result<&T> {
    choices
        .get(group)
        .and_then(|g| g.get(member))
        .ok_or_else(|| Error::Input(format!("a sample has no prompt {group}.{member}")))
}

/// Group sizes of prompt choices.
fn group_sizes<T>(choices: &PromptChoices<T>) -> Vec<usize> {
    choices.iter().map(Vec::len).collect()
}

/// The decoder alone, trained on cached encoder outputs (the study's setup).
#[derive(Module, Debug)]
pub struct DecoderModel {
    pub decoder: Decoder,
    /// Side of the token grid.
    pub grid: usize,
}

impl TrainingModel for DecoderModel {
    type Sample = CachedSample;

    fn logits(
        &self,
        samples: &[(&CachedSample, Draw)],
        device: &Device,
        dtype: FloatDType,
    ) -> Result<Tensor<3>> {
        let taps: Vec<Tensor<3>> = (0..samples[0].0.taps.len())
            .map(|t| {
                batch(
                    samples.iter().map(|(s, _)| s.taps[t].clone()),
                    device,
                    dtype,
                )
            })
            .collect();
        let conditioning = samples
            .iter()
            .map(|(s, draw)| drawn(&s.conditioning, *draw).cloned())
            .collect::<Result<Vec<_>>>()?;
        let conditioning = batch(conditioning, device, dtype);
        let features = self.decoder.reduce(&taps);
        self.decoder.decode(&features, conditioning, self.grid)
    }

    fn target(sample: &CachedSample) -> Tensor<3> {
        sample.target.clone()
    }

    fn prompt_groups(sample: &CachedSample) -> Vec<usize> {
        group_sizes(&sample.conditioning)
    }
}

/// A batch of image samples: their pixels on `device` in `dtype`, and each one's drawn prompt.
fn image_batch(
    samples: &[(&ImageSample, Draw)],
    device: &Device,
    dtype: FloatDType,
) -> Result<(Tensor<4>, Vec<crate::tokenize::TokenizedPrompt>)> {
    let pixels = batch(samples.iter().map(|(s, _)| s.pixels.clone()), device, dtype);
    let prompts = samples
        .iter()
        .map(|(s, draw)| drawn(&s.prompts, *draw).cloned())
        .collect::<Result<Vec<_>>>()?;
    Ok((pixels, prompts))
}

/// The whole model (full fine-tuning): the towers train too, except the vision position
/// table, which was resampled from the checkpoint's grid at load and so could not be
/// exported back exactly.
impl TrainingModel for crate::model::ClipSeg {
    type Sample = ImageSample;

    fn logits(
        &self,
        samples: &[(&ImageSample, Draw)],
        device: &Device,
        dtype: FloatDType,
    ) -> Result<Tensor<3>> {
        let (pixels, prompts) = image_batch(samples, device, dtype)?;
        self.forward(pixels, &prompts, device)
    }

    fn target(sample: &ImageSample) -> Tensor<3> {
        sample.target.clone()
    }

    fn prompt_groups(sample: &ImageSample) -> Vec<usize> {
        group_sizes(&sample.prompts)
    }

    fn keep_fixed(mut self) -> Self {
        let table = &self.vision.position_embedding;
        self.vision.position_embedding =
            Param::initialized(table.id, table.val().detach().set_require_grad(false));
        self
    }
}

/// The whole CRIS (the study's CRIS recipe: everything trains). On the autodiff device its
/// BatchNorms use batch statistics and update their running ones, and its decoder's dropout
/// is active; validation runs on the plain device, in eval mode.
impl TrainingModel for crate::model::Cris {
    type Sample = ImageSample;

    fn logits(
        &self,
        samples: &[(&ImageSample, Draw)],
        device: &Device,
        dtype: FloatDType,
    ) -> Result<Tensor<3>> {
        if samples.len() < 2 && device.is_autodiff() {
            return Err(Error::Input(
                "CRIS trains on batches of at least 2 samples (its neck's BatchNorm1d, as in \
                 PyTorch)"
                    .into(),
            ));
        }
        let (pixels, prompts) = image_batch(samples, device, dtype)?;
        let image = self.encode_image(pixels)?;
        let text = self.embed_prompts(&prompts, device)?;
        self.decode(&image, &text)
    }

    fn target(sample: &ImageSample) -> Tensor<3> {
        sample.target.clone()
    }

    fn prompt_groups(sample: &ImageSample) -> Vec<usize> {
        group_sizes(&sample.prompts)
    }

    fn min_batch() -> usize {
        2
    }

    fn for_inference(self) -> Result<Self> {
        self.refresh_after_training()
    }
}

/// `order` in batches of `size` (at most), a last batch shorter than `min` joined to the one
/// before it.
fn batches_of(order: &[usize], size: usize, min: usize) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = (0..order.len())
        .step_by(size.max(1))
        .map(|start| start..(start + size).min(order.len()))
        .collect();
    if out.len() > 1 && out.last().is_some_and(|r| r.len() < min) {
        let last = out.pop().expect("two batches");
        out.last_mut().expect("one batch").end = last.end;
    }
    out
}

/// Adds `more` to the gradients already in `total` (gradient accumulation).
fn add_gradients<M: Module>(module: &M, total: &mut GradientsParams, mut more: GradientsParams) {
    struct Add<'a> {
        total: &'a mut GradientsParams,
        more: &'a mut GradientsParams,
    }
    impl ModuleVisitor for Add<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.more.remove::<D>(param.id) {
                let sum = match self.total.remove::<D>(param.id) {
                    Some(t) => t + g,
                    None => g,
                };
                self.total.register(param.id, sum);
            }
        }
    }
    module.visit(&mut Add {
        total,
        more: &mut more,
    });
}

/// `tensor` in `dtype` (no operation when it already is).
fn cast<const D: usize>(tensor: Tensor<D>, dtype: FloatDType) -> Tensor<D> {
    if tensor.dtype() == dtype.into() {
        tensor
    } else {
        tensor.cast(dtype)
    }
}

/// The module with every parameter cast to `dtype`. On an autodiff device the casts are
/// part of the graph, so gradients flow back, in float32, to the parameters of `module`.
pub fn cast_params<M: Module>(module: M, dtype: FloatDType) -> M {
    struct Cast(FloatDType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            Param::initialized(param.id, cast(param.val(), self.0))
        }
    }
    module.map(&mut Cast(dtype))
}

/// Makes every parameter of a module on an autodiff device trainable, with a fixed id (its
/// order in the module), so a saved optimizer state finds its parameters again after the
/// module is rebuilt from a checkpoint.
pub fn trainable<M: Module>(module: M) -> M {
    struct Numbering(u64);
    impl ModuleMapper for Numbering {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            self.0 += 1;
            Param::initialized(
                ParamId::from(self.0),
                param.val().detach().autodiff().require_grad(),
            )
        }
    }
    module.map(&mut Numbering(0))
}

/// The global L2 norm of the gradients of `module`'s parameters (PyTorch's
/// `clip_grad_norm_` norm); infinite or NaN when a gradient overflowed.
pub fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        sum: f64,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.sum += f64::from(g.powi_scalar(2).sum().into_scalar::<f32>());
            }
        }
    }
    let mut sum = SumSquares { grads, sum: 0.0 };
    module.visit(&mut sum);
    sum.sum.sqrt()
}

/// Multiplies the gradients of `module`'s parameters by `factor`.
pub fn scale_gradients<M: Module>(module: &M, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g * self.factor);
            }
        }
    }
    module.visit(&mut Scale { grads, factor });
}

/// The floating-point type of the forward and backward passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32.
    #[default]
    F32,
    /// float16 passes with dynamic loss scaling (the study's `16-mixed`).
    F16,
    /// bfloat16 passes (float32's range: no loss scaling).
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::F16 => FloatDType::F16,
            Precision::Bf16 => FloatDType::BF16,
        }
    }

    /// An error when `device` has no arithmetic in this precision.
    pub fn check(self, device: &Device) -> Result<()> {
        if self == Precision::F32 || device.supports_dtype(self.dtype()) {
            Ok(())
        } else {
            Err(Error::Input(format!(
                "this device cannot compute in {}: use precision f32",
                self.name()
            )))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::Input(format!(
                "precision `{s}`: expected f32, f16 or bf16"
            ))),
        }
    }
}

/// PyTorch `GradScaler`'s defaults.
const INITIAL_LOSS_SCALE: f64 = 65536.0;
const LOSS_SCALE_GROWTH_INTERVAL: usize = 2000;

/// The recipe's knobs; `Default` is the study's CLIPSeg recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipe {
    pub epochs: usize,
    pub min_epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub grad_clip_norm: f64,
    /// ReduceLROnPlateau on the validation loss.
    pub plateau_factor: f64,
    pub plateau_patience: usize,
    /// Early stopping on the validation Dice (min improvement 1e-4).
    pub early_stopping_patience: usize,
    pub seed: u64,
    pub loss: Loss,
    /// Threshold of the validation Dice.
    pub threshold: f32,
    /// Mixed precision: `f16` (the study's), `bf16`, or `f32` (none, the default).
    pub precision: Precision,
    /// Gradient accumulation: each batch runs as this many smaller passes whose gradients
    /// add up to the batch's before one optimizer step (the same step as the whole batch,
    /// except that BatchNorm's batch statistics are the passes').
    pub accumulate: usize,
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            epochs: 1000,
            min_epochs: 10,
            batch_size: 128,
            lr: 2e-3,
            weight_decay: 1e-3,
            grad_clip_norm: 0.5,
            plateau_factor: 0.1,
            plateau_patience: 5,
            early_stopping_patience: 20,
            seed: 42,
            loss: Loss::Dice,
            threshold: 0.5,
            precision: Precision::F32,
            accumulate: 1,
        }
    }
}

impl Recipe {
    /// The study's CRIS recipe (configs/model/cris.yaml, experiment/cris.yaml): AdamW at
    /// 2e-5 (weight decay 1e-3), batch 32, validation Dice at 0.35, everything else as
    /// CLIPSeg's.
    pub fn cris() -> Self {
        Self {
            batch_size: 32,
            lr: 2e-5,
            threshold: 0.35,
            ..Self::default()
        }
    }
}

impl Recipe {
    pub fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Input(format!("training config: {what}")));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.accumulate == 0 || self.accumulate > self.batch_size {
            return bad("accumulate must be between 1 and batch_size");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr must be a positive number");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be ≥ 0");
        }
        if !(self.grad_clip_norm.is_finite() && self.grad_clip_norm > 0.0) {
            return bad("grad_clip_norm must be a positive number");
        }
        if !(self.plateau_factor > 0.0 && self.plateau_factor < 1.0) {
            return bad("plateau_factor must be in (0, 1)");
        }
        if self.epochs == 0 {
            return bad("epochs must be at least 1");
        }
        if let Loss::DiceBce { bce_weight } = self.loss
            && !(bce_weight.is_finite() && bce_weight >= 0.0)
        {
            return bad("bce_weight must be ≥ 0");
        }
        Ok(())
    }
}

/// Where the schedule stands: everything besides weights and optimizer moments that a
/// resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Epochs completed.
    pub epoch: usize,
    pub lr: f64,
    pub best_val_loss: f64,
    pub epochs_without_loss_gain: usize,
    pub best_val_dice: f64,
    pub best_epoch: usize,
    pub epochs_without_dice_gain: usize,
    pub rng: u64,
    pub stopped_early: bool,
    /// float16 training's loss scale, and the clean steps since it last changed.
    #[serde(default = "initial_loss_scale")]
    pub loss_scale: f64,
    #[serde(default)]
    pub clean_steps: usize,
}

fn initial_loss_scale() -> f64 {
    INITIAL_LOSS_SCALE
}

impl Progress {
    pub fn start(recipe: &Recipe) -> Self {
        Self {
            epoch: 0,
            lr: recipe.lr,
            best_val_loss: f64::INFINITY,
            epochs_without_loss_gain: 0,
            best_val_dice: f64::NEG_INFINITY,
            best_epoch: 0,
            epochs_without_dice_gain: 0,
            rng: recipe.seed,
            stopped_early: false,
            loss_scale: INITIAL_LOSS_SCALE,
            clean_steps: 0,
        }
    }

    pub fn done(&self, recipe: &Recipe) -> bool {
        self.stopped_early || self.epoch >= recipe.epochs
    }
}

/// One epoch's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_dice: f64,
    /// The learning rate the epoch trained with.
    pub lr: f64,
    pub improved: bool,
    /// float16 steps skipped because the scaled gradients overflowed.
    #[serde(default)]
    pub skipped_steps: usize,
}

/// A model in training, with its optimizer and schedule.
pub struct Trainer<M: TrainingModel> {
    /// On the autodiff device.
    pub model: M,
    pub optimizer: ModuleOptimizer,
    pub recipe: Recipe,
    pub progress: Progress,
    device: Device,
}

impl<M: TrainingModel> Trainer<M> {
    /// `model` on any device; `device` the (non-autodiff) device to train on.
    pub fn new(model: M, recipe: Recipe, device: &Device) -> Result<Self> {
        recipe.check()?;
        recipe.precision.check(device)?;
        let ad = device.clone().autodiff();
        let model = trainable(model.fork(&ad)).keep_fixed();
        let optimizer = AdamWConfig::new()
            .with_weight_decay(recipe.weight_decay as f32)
            .with_epsilon(1e-8)
            .init();
        Ok(Self {
            model,
            optimizer,
            progress: Progress::start(&recipe),
            recipe,
            device: ad,
        })
    }

    /// One epoch over `train` (shuffled with the run's generator), then validation; updates
    /// the schedule. Returns the epoch's numbers.
    pub fn epoch(
        &mut self,
        train: &[M::Sample],
        val: &[M::Sample],
        mut on_step: impl FnMut(usize, usize, f64),
    ) -> Result<EpochLog> {
        if train.is_empty() || val.is_empty() {
            return Err(Error::Input(
                "training needs at least one training and one validation sample".into(),
            ));
        }
        let mut order: Vec<usize> = (0..train.len()).collect();
        let mut rng = SplitMix64(self.progress.rng);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        // This epoch's prompt of each sample (in training order).
        let mut below = |n: usize| if n > 1 { rng.below(n) } else { 0 };
        let draws: Vec<Draw> = order
            .iter()
            .map(|&i| {
                let groups = M::prompt_groups(&train[i]);
                let group = below(groups.len());
                (group, below(groups.get(group).copied().unwrap_or(0)))
            })
            .collect();
        self.progress.rng = rng.0;
        let lr = self.progress.lr;
        let precision = self.recipe.precision;
        let dtype = precision.dtype();
        let ranges = batches_of(&order, self.recipe.batch_size, M::min_batch());
        let steps = ranges.len();
        let (mut total, mut skipped_steps) = (0.0, 0);
        for (step, range) in ranges.into_iter().enumerate() {
            let (chunk, chunk_draws) = (&order[range.clone()], &draws[range]);
            // Dropout masks from a generator seeded by the run, the epoch and the step: a
            // resumed run draws the same ones.
            self.device.seed(
                self.recipe.seed
                    ^ ((self.progress.epoch as u64) << 32)
                    ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let samples: Vec<(&M::Sample, Draw)> = chunk
                .iter()
                .zip(chunk_draws)
                .map(|(&i, &d)| (&train[i], d))
                .collect();
            // float16: the loss is scaled up before the backward pass so small gradients
            // survive in half precision, and the gradients scaled back down before clipping.
            let scale = match precision {
                Precision::F16 => self.progress.loss_scale,
                _ => 1.0,
            };
            let passes = self.recipe.accumulate.min(samples.len());
            let per_pass = samples.len().div_ceil(passes);
            let (mut value, mut grads) = (0.0, GradientsParams::new());
            for part in samples.chunks(per_pass) {
                let logits =
                    cast_params(self.model.clone(), dtype).logits(part, &self.device, dtype)?;
                let target = targets::<M>(part, &self.device);
                // The batch loss is the mean over samples: each pass weighs its share.
                let share = part.len() as f64 / samples.len() as f64;
                let loss = self
                    .recipe
                    .loss
                    .compute(cast(logits, FloatDType::F32), target)
                    * share;
                let part_value = f64::from(loss.clone().into_scalar::<f32>());
                value += part_value;
                let part_grads =
                    GradientsParams::from_grads((loss * scale).backward(), &self.model);
                add_gradients(&self.model, &mut grads, part_grads);
            }
            let diverged = |what: &str| {
                Error::Input(format!(
                    "the {what} became non-finite at epoch {} step {}{}: lower the learning rate",
                    self.progress.epoch + 1,
                    step + 1,
                    match precision {
                        Precision::F32 => String::new(),
                        p => format!(" in {}", p.name()),
                    }
                ))
            };
            if !value.is_finite() {
                return Err(diverged("loss"));
            }
            total += value * chunk.len() as f64;
            let norm = global_norm(&self.model, &grads) / scale;
            if !norm.is_finite() {
                if precision != Precision::F16 {
                    return Err(diverged("gradient"));
                }
                // An overflow: skip the step, halve the scale (GradScaler).
                self.progress.loss_scale *= 0.5;
                self.progress.clean_steps = 0;
                skipped_steps += 1;
                on_step(step + 1, steps, value);
                continue;
            }
            let clip = (self.recipe.grad_clip_norm / (norm + 1e-6)).min(1.0);
            if clip / scale != 1.0 {
                scale_gradients(&self.model, &mut grads, clip / scale);
            }
            // Modules are cheap handles: the clone shares the tensors the step replaces.
            self.model = self.optimizer.step(lr, self.model.clone(), grads);
            if precision == Precision::F16 {
                self.progress.clean_steps += 1;
                if self.progress.clean_steps == LOSS_SCALE_GROWTH_INTERVAL {
                    self.progress.loss_scale *= 2.0;
                    self.progress.clean_steps = 0;
                }
            }
            on_step(step + 1, steps, value);
        }
        let train_loss = total / train.len() as f64;
        let (val_loss, val_dice) = self.evaluate(val)?;
        let p = &mut self.progress;
        p.epoch += 1;
        // ReduceLROnPlateau (mode min, threshold 1e-4 relative, as PyTorch's defaults).
        if val_loss < p.best_val_loss * (1.0 - 1e-4) {
            p.best_val_loss = val_loss;
            p.epochs_without_loss_gain = 0;
        } else {
            p.epochs_without_loss_gain += 1;
            if p.epochs_without_loss_gain > self.recipe.plateau_patience {
                p.lr *= self.recipe.plateau_factor;
                p.epochs_without_loss_gain = 0;
            }
        }
        // Early stopping and "best" on the validation Dice (min_delta 1e-4, Lightning's).
        let improved = val_dice > p.best_val_dice + 1e-4 || p.best_val_dice == f64::NEG_INFINITY;
        if improved {
            p.best_val_dice = val_dice;
            p.best_epoch = p.epoch;
            p.epochs_without_dice_gain = 0;
        } else {
            p.epochs_without_dice_gain += 1;
            if p.epochs_without_dice_gain >= self.recipe.early_stopping_patience
                && p.epoch >= self.recipe.min_epochs
            {
                p.stopped_early = true;
            }
        }
        Ok(EpochLog {
            epoch: p.epoch,
            train_loss,
            val_loss,
            val_dice,
            lr,
            improved,
            skipped_steps,
        })
    }

    /// Mean loss and mean per-image Dice (threshold at model resolution, empty/empty = 1)
    /// over `samples`, each with its first prompt, without gradients, in the recipe's precision (as Lightning validates
    /// under autocast).
    pub fn evaluate(&self, samples: &[M::Sample]) -> Result<(f64, f64)> {
        let dtype = self.recipe.precision.dtype();
        let model = cast_params(self.model.valid().for_inference()?, dtype);
        let device = self.device.clone().inner();
        let (mut loss_sum, mut dice_sum) = (0.0, 0.0);
        for chunk in samples.chunks(self.recipe.batch_size) {
            let refs: Vec<(&M::Sample, Draw)> = chunk.iter().map(|s| (s, (0, 0))).collect();
            let logits = cast(model.logits(&refs, &device, dtype)?, FloatDType::F32);
            let target = targets::<M>(&refs, &device);
            let loss = self.recipe.loss.compute(logits.clone(), target.clone());
            loss_sum += f64::from(loss.into_scalar::<f32>()) * chunk.len() as f64;
            dice_sum += batch_dice(logits, target, self.recipe.threshold)?
                .iter()
                .sum::<f64>();
        }
        Ok((
            loss_sum / samples.len() as f64,
            dice_sum / samples.len() as f64,
        ))
    }

    /// The trained model, without autodiff, ready for inference.
    pub fn trained(&self) -> Result<M> {
        self.model.valid().for_inference()
    }
}

fn targets<M: TrainingModel>(samples: &[(&M::Sample, Draw)], device: &Device) -> Tensor<3> {
    batch(
        samples.iter().map(|(s, _)| M::target(s)),
        device,
        FloatDType::F32,
    )
}

/// Per-sample tensors `[1, …]` joined into a batch on `device`, in `dtype`.
fn batch<const D: usize>(
    parts: impl IntoIterator<Item = Tensor<D>>,
    device: &Device,
    dtype: FloatDType,
) -> Tensor<D> {
    cast(
        Tensor::cat(parts.into_iter().collect(), 0).to_device(device),
        dtype,
    )
}

/// Per-sample Dice of thresholded logits against 0/1 targets.
pub fn batch_dice(logits: Tensor<3>, targets: Tensor<3>, threshold: f32) -> Result<Vec<f64>> {
    let [b, h, w] = logits.dims();
    let read = |t: Tensor<3>| -> Result<Vec<f32>> {
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| Error::Input(format!("reading a tensor: {e:?}")))
    };
    let logits = read(logits)?;
    let targets = read(targets)?;
    let n = h * w;
    Ok((0..b)
        .map(|i| {
            let pred: Vec<u8> = logits[i * n..(i + 1) * n]
                .iter()
                .map(|&l| u8::from(1.0 / (1.0 + (-l).exp()) > threshold))
                .collect();
            let truth: Vec<u8> = targets[i * n..(i + 1) * n]
                .iter()
                .map(|&t| u8::from(t > 0.5))
                .collect();
            crate::metrics::dice(&pred, &truth).unwrap_or(0.0)
        })
        .collect())
}

/// A 0/1 mask `[1, S, S]` as a training target.
pub fn target_tensor(mask: &[u8], size: usize, device: &Device) -> Tensor<3> {
    let values: Vec<f32> = mask.iter().map(|&m| f32::from(u8::from(m != 0))).collect();
    Tensor::from_data(TensorData::new(values, [1, size, size]), device)
}

/// Writes a Hugging Face CLIPSeg directory: `source`'s config, tokenizer and preprocessing
/// files, and its weights with the `trained` tensors (HF names, e.g. every `decoder.*`)
/// replaced, the rest copied as they are, as `model.safetensors` (f32, or f16 with `fp16`).
pub fn export_model(
    source: &std::path::Path,
    trained: Vec<crate::model::layers::NamedTensor>,
    out: &std::path::Path,
    fp16: bool,
) -> Result<()> {
    let files = crate::files::DirFiles::read(source)?;
    let weights = files.weights()?;
    let trained: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> = trained
        .into_iter()
        .map(|(k, shape, v)| (k, (shape, v)))
        .collect();
    let mut tensors = Vec::new();
    let mut replaced = 0;
    for key in weights.keys() {
        let shape = weights.shape(key).expect("listed key").to_vec();
        match trained.get(key) {
            Some((trained_shape, values)) => {
                if *trained_shape != shape {
                    return Err(Error::Weights(format!(
                        "{key}: the trained tensor has shape {trained_shape:?}, the base checkpoint {shape:?}"
                    )));
                }
                tensors.push((key.to_string(), shape, values.clone()));
                replaced += 1;
            }
            None => tensors.push((
                key.to_string(),
                shape.clone(),
                weights.read_f32(key, &shape)?,
            )),
        }
    }
    if replaced != trained.len() {
        return Err(Error::Weights(format!(
            "the base checkpoint has {replaced} of the {} trained tensors",
            trained.len()
        )));
    }
    let bytes = crate::weights::write_safetensors(&tensors, crate::weights::Storage::f16_if(fp16))?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    for (name, content) in files.side_files() {
        write_synced(&out.join(name), content)?;
    }
    write_synced(&out.join("model.safetensors"), &bytes)
}

pub use crate::files::write_synced;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_loss_by_hand() {
        let device = Device::flex();
        // Logits ±20 make p ≈ 0/1: a perfect prediction has loss ≈ 0, the inverse ≈ 1.
        let logits = Tensor::<3>::from_data(
            TensorData::new(vec![20.0, -20.0, 20.0, -20.0], [1, 2, 2]),
            &device,
        );
        let target = Tensor::<3>::from_data(
            TensorData::new(vec![1.0, 0.0, 1.0, 0.0], [1, 2, 2]),
            &device,
        );
        let good = soft_dice_loss(logits.clone(), target.clone()).into_scalar::<f32>();
        let bad = soft_dice_loss(logits.neg(), target).into_scalar::<f32>();
        assert!(good < 1e-6 && (bad - 1.0).abs() < 1e-5, "{good} {bad}");
        // p = 0.5 everywhere, g = [1,0,0,0]: 1 − (2·0.5 + ε)/(2 + 1 + ε).
        let zero = Tensor::<3>::zeros([1, 2, 2], &device);
        let g = Tensor::<3>::from_data(
            TensorData::new(vec![1.0, 0.0, 0.0, 0.0], [1, 2, 2]),
            &device,
        );
        let l = soft_dice_loss(zero.clone(), g.clone()).into_scalar::<f32>();
        let expected = 1.0 - (1.0 + 1e-5) / (3.0 + 1e-5);
        assert!((f64::from(l) - expected).abs() < 1e-6);
        // BCE of logit 0 is ln 2.
        let bce = bce_with_logits(zero, g).into_scalar::<f32>();
        assert!((f64::from(bce) - std::f64::consts::LN_2).abs() < 1e-6);
    }

    #[test]
    fn bad_recipes_are_refused() {
        assert!(Recipe::default().check().is_ok());
        for r in [
            Recipe {
                batch_size: 0,
                ..Recipe::default()
            },
            Recipe {
                lr: -1.0,
                ..Recipe::default()
            },
            Recipe {
                plateau_factor: 1.5,
                ..Recipe::default()
            },
            Recipe {
                loss: Loss::DiceBce {
                    bce_weight: f64::NAN,
                },
                ..Recipe::default()
            },
        ] {
            assert!(r.check().is_err(), "{r:?}");
        }
    }
}
