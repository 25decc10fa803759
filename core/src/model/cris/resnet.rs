//! CLIP's ModifiedResNet as CRIS uses it (medvlsm `cris_model/clip.py`): a 3-convolution
//! stem with an average pool, Bottlenecks whose strides are anti-aliased average pools, and
//! CRIS's attention pool, which attends over every position (no mean token), adds a
//! position table resized bicubically to the feature grid, projects with `c_proj`, adds the
//! `connect` 1×1 conv + BatchNorm residual and applies ReLU. Returns C3 (layer2), C4
//! (layer3) and C5 (the pool over layer4). BatchNorm runs on its running statistics, or, on
//! an autodiff device (training), on batch statistics while updating the running ones.

use burn::module::{Module, Param, RunningState};
use burn::tensor::module::{avg_pool2d, conv2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions};
use burn::tensor::{Device, Tensor, TensorData, activation};

use crate::error::{Error, Result};
use crate::model::layers::{NamedTensor, SelfAttention, export_linear, linear, named, values};
use crate::weights::Weights;

/// The sizes of a ModifiedResNet, derived from its weights as CLIP's `build_model` does.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    /// Bottlenecks per stage (RN50: [3, 4, 6, 3]).
    pub layers: [usize; 4],
    /// Stem width (RN50: 64); the stages are 1, 2, 4, 8 × width planes, ×4 channels out.
    pub width: usize,
    /// The attention pool's output width (RN50: 1024).
    pub output_dim: usize,
    /// The attention pool's heads: 32 · width / 64, as CLIP derives them.
    pub heads: usize,
    /// The side of the attention pool's position grid (RN50 at 224: 7).
    pub pos_grid: usize,
}

impl ResNetConfig {
    /// Reads the sizes from the tensors under `prefix` (`backbone.visual`).
    pub fn from_weights(w: &Weights, prefix: &str) -> Result<Self> {
        let shape = |key: &str| {
            w.shape(&format!("{prefix}.{key}"))
                .map(<[usize]>::to_vec)
                .ok_or_else(|| Error::Weights(format!("{}: missing `{prefix}.{key}`", w.source())))
        };
        let width = shape("layer1.0.conv1.weight")?[0];
        let mut layers = [0; 4];
        for (i, count) in layers.iter_mut().enumerate() {
            while w.contains(&format!("{prefix}.layer{}.{}.conv1.weight", i + 1, *count)) {
                *count += 1;
                if *count > 64 {
                    return Err(Error::Weights(format!(
                        "{}: more than 64 blocks in layer{}",
                        w.source(),
                        i + 1
                    )));
                }
            }
            if *count == 0 {
                return Err(Error::Weights(format!(
                    "{}: no `{prefix}.layer{}` blocks",
                    w.source(),
                    i + 1
                )));
            }
        }
        let output_dim = shape("attnpool.c_proj.weight")?[0];
        let rows = shape("attnpool.positional_embedding")?[0];
        let pos_grid = (rows.saturating_sub(1) as f64).sqrt().round() as usize;
        if width == 0 || width > 1024 || pos_grid * pos_grid + 1 != rows || pos_grid > 64 {
            return Err(Error::Weights(format!(
                "{}: not a ModifiedResNet (width {width}, {rows} position rows)",
                w.source()
            )));
        }
        Ok(Self {
            layers,
            width,
            output_dim,
            heads: (width * 32 / 64).max(1),
            pos_grid,
        })
    }
}

/// PyTorch's BatchNorm momentum.
const BN_MOMENTUM: f64 = 0.1;

/// `nn.BatchNorm2d` (and `BatchNorm1d` on `[N, C, 1, 1]`). In eval mode
/// `(x − mean) / √(var + eps) · weight + bias` with the running statistics; in training (an
/// autodiff device) with the batch's mean and biased variance, updating the running ones as
/// PyTorch does: momentum 0.1, the variance unbiased (`n / (n − 1)`).
#[derive(Module, Debug)]
pub struct BatchNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
    pub eps: f64,
}

impl BatchNorm {
    pub fn load(w: &Weights, prefix: &str, c: usize, device: &Device) -> Result<Self> {
        let p = |name: &str| w.param(&format!("{prefix}.{name}"), [c], device);
        let stat = |name: &str| -> Result<RunningState<Tensor<1>>> {
            Ok(RunningState::new(w.tensor(
                &format!("{prefix}.{name}"),
                [c],
                device,
            )?))
        };
        Ok(Self {
            weight: p("weight")?,
            bias: p("bias")?,
            running_mean: stat("running_mean")?,
            running_var: stat("running_var")?,
            eps: 1e-5,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let device = x.device();
        let per_channel = |t: Tensor<1>| t.reshape([1, c, 1, 1]);
        if device.is_autodiff() {
            let count = n * h * w;
            // Statistics in float32 whatever the pass's precision (as cuDNN's half-precision
            // BatchNorm keeps them): a float16 variance overflows on ordinary activations.
            let dtype = x.dtype();
            let x = x.cast(burn::tensor::FloatDType::F32);
            let mean = x.clone().mean_dims(&[0, 2, 3]);
            let centred = x - mean.clone();
            let var = centred.clone().powi_scalar(2).mean_dims(&[0, 2, 3]);
            let out = (centred / (var.clone() + self.eps).sqrt()).cast(dtype);
            let unbiased = count as f64 / (count.max(2) - 1) as f64;
            let update = |state: &RunningState<Tensor<1>>, batch: Tensor<4>, factor: f64| {
                let old = state.value_sync().to_device(&device);
                let batch = batch.detach().reshape([c]).cast(old.dtype()) * factor;
                state.update((old * (1.0 - BN_MOMENTUM) + batch * BN_MOMENTUM).detach());
            };
            update(&self.running_mean, mean, 1.0);
            update(&self.running_var, var, unbiased);
            return out * per_channel(self.weight.val()) + per_channel(self.bias.val());
        }
        // `value_sync`: `value` may lag one update behind (the last training step's).
        let mean = self.running_mean.value_sync().to_device(&device);
        let var = self.running_var.value_sync().to_device(&device);
        let scale = self.weight.val() / (var.cast(x.dtype()) + self.eps).sqrt();
        let shift = self.bias.val() - mean.cast(x.dtype()) * scale.clone();
        x * per_channel(scale) + per_channel(shift)
    }

    /// medvlsm's keys: `weight`, `bias`, `running_mean`, `running_var`.
    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        out.push(named(format!("{prefix}.weight"), &self.weight)?);
        out.push(named(format!("{prefix}.bias"), &self.bias)?);
        for (name, state) in [
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ] {
            let t = state.value_sync();
            out.push((format!("{prefix}.{name}"), t.dims().to_vec(), values(t)?));
        }
        Ok(())
    }
}

/// A bias-free `Conv2d` (stride 1 or 2, padding k/2) followed by a BatchNorm.
#[derive(Module, Debug)]
pub struct ConvBn {
    pub weight: Param<Tensor<4>>,
    pub bn: BatchNorm,
    pub stride: usize,
}

impl ConvBn {
    pub fn load(
        w: &Weights,
        conv: &str,
        bn: &str,
        [c_in, c_out, k]: [usize; 3],
        stride: usize,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.param(&format!("{conv}.weight"), [c_out, c_in, k, k], device)?,
            bn: BatchNorm::load(w, bn, c_out, device)?,
            stride,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let k = self.weight.dims()[2];
        let options = ConvOptions::new([self.stride; 2], [k / 2; 2], [1, 1], 1);
        self.bn.forward(conv2d(x, self.weight.val(), None, options))
    }

    pub fn export(&self, conv: &str, bn: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        out.push(named(format!("{conv}.weight"), &self.weight)?);
        self.bn.export(bn, out)
    }
}

fn avg_pool(x: Tensor<4>, k: usize) -> Tensor<4> {
    if k == 1 {
        x
    } else {
        avg_pool2d(x, AvgPoolOptions::new([k, k]))
    }
}

/// CLIP's `Bottleneck`: 1×1 → 3×3 → avg-pool(stride) → 1×1 (×4), and a downsample branch
/// avg-pool → 1×1 → BN when the stride or the width changes.
#[derive(Module, Debug)]
pub struct Bottleneck {
    pub conv1: ConvBn,
    pub conv2: ConvBn,
    pub conv3: ConvBn,
    pub downsample: Option<ConvBn>,
    pub stride: usize,
}

impl Bottleneck {
    fn load(
        w: &Weights,
        prefix: &str,
        inplanes: usize,
        planes: usize,
        stride: usize,
        device: &Device,
    ) -> Result<Self> {
        let cb = |i: usize, shape: [usize; 3]| {
            ConvBn::load(
                w,
                &format!("{prefix}.conv{i}"),
                &format!("{prefix}.bn{i}"),
                shape,
                1,
                device,
            )
        };
        let downsample = (stride > 1 || inplanes != planes * 4)
            .then(|| {
                ConvBn::load(
                    w,
                    &format!("{prefix}.downsample.0"),
                    &format!("{prefix}.downsample.1"),
                    [inplanes, planes * 4, 1],
                    1,
                    device,
                )
            })
            .transpose()?;
        Ok(Self {
            conv1: cb(1, [inplanes, planes, 1])?,
            conv2: cb(2, [planes, planes, 3])?,
            conv3: cb(3, [planes, planes * 4, 1])?,
            downsample,
            stride,
        })
    }

    fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        for (i, conv) in [&self.conv1, &self.conv2, &self.conv3]
            .into_iter()
            .enumerate()
        {
            conv.export(
                &format!("{prefix}.conv{}", i + 1),
                &format!("{prefix}.bn{}", i + 1),
                out,
            )?;
        }
        if let Some(d) = &self.downsample {
            d.export(
                &format!("{prefix}.downsample.0"),
                &format!("{prefix}.downsample.1"),
                out,
            )?;
        }
        Ok(())
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let out = activation::relu(self.conv1.forward(x.clone()));
        let out = activation::relu(self.conv2.forward(out));
        let out = self.conv3.forward(avg_pool(out, self.stride));
        let identity = match &self.downsample {
            Some(d) => d.forward(avg_pool(x, self.stride)),
            None => x,
        };
        activation::relu(out + identity)
    }
}

/// CRIS's attention pool over the layer4 grid.
#[derive(Module, Debug)]
pub struct AttentionPool {
    /// q/k/v projections and `c_proj` as the output projection (embed → output width).
    pub attention: SelfAttention,
    /// The whole position table, `[1 + g², C]`: CLIP's class row (which CRIS never uses,
    /// kept for the export) and the grid rows.
    pub positional_embedding: Param<Tensor<2>>,
    pub grid: usize,
    pub connect: ConvBn,
    /// The grid rows resized to the input size's grid once at load, in float64 on the host
    /// (what inference uses; training resizes the table itself, differentiably).
    pub resized: Tensor<2>,
    pub resized_grid: usize,
}

/// `F.interpolate(mode="bicubic", align_corners=False)` from `from` to `to` points along one
/// axis as a `[to, from]` matrix (PyTorch's cubic, A = −0.75, borders clamped).
fn bicubic_weights(from: usize, to: usize) -> Vec<f64> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = from as f64 / to as f64;
    let mut m = vec![0.0; to * from];
    for o in 0..to {
        let src = scale * (o as f64 + 0.5) - 0.5;
        let base = src.floor();
        let t = src - base;
        let weights = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for (k, wk) in [-1i64, 0, 1, 2].into_iter().zip(weights) {
            let i = (base as i64 + k).clamp(0, from as i64 - 1) as usize;
            m[o * from + i] += wk;
        }
    }
    m
}

impl AttentionPool {
    fn load(
        w: &Weights,
        prefix: &str,
        cfg: &ResNetConfig,
        input_grid: usize,
        device: &Device,
    ) -> Result<Self> {
        let (c, out) = (cfg.width * 32, cfg.output_dim);
        let proj =
            |name: &str, d_out| linear(w, &format!("{prefix}.{name}"), c, d_out, true, device);
        let g = cfg.pos_grid;
        let key = format!("{prefix}.positional_embedding");
        let table = w.read_f32(&key, &[g * g + 1, c])?;
        if input_grid == 0 || input_grid > 1024 {
            return Err(Error::Input(format!(
                "a {input_grid}×{input_grid} feature grid is out of range"
            )));
        }
        let n = input_grid;
        let resized = crate::model::clip::vision::resize_position_table(&table, g, n, c);
        Ok(Self {
            resized: Tensor::from_data(TensorData::new(resized[c..].to_vec(), [n * n, c]), device),
            resized_grid: n,
            attention: SelfAttention {
                q_proj: proj("q_proj", c)?,
                k_proj: proj("k_proj", c)?,
                v_proj: proj("v_proj", c)?,
                out_proj: proj("c_proj", out)?,
                num_heads: cfg.heads,
            },
            // From the values read above: a streamed checkpoint gives each tensor once.
            positional_embedding: Param::from_tensor(Tensor::from_data(
                TensorData::new(table, [g * g + 1, c]),
                device,
            )),
            grid: g,
            connect: ConvBn::load(
                w,
                &format!("{prefix}.connect.0"),
                &format!("{prefix}.connect.1"),
                [c, out, 1],
                1,
                device,
            )?,
        })
    }

    /// The grid rows resized to an `h`×`w` grid (`F.interpolate` bicubic,
    /// `align_corners=False`), `[h·w, C]`: one matrix product with the table, so gradients
    /// reach it when training.
    pub fn positions_for(&self, h: usize, w: usize) -> Result<Tensor<2>> {
        let g = self.grid;
        let table = self.positional_embedding.val().narrow(0, 1, g * g);
        if h == g && w == g {
            return Ok(table);
        }
        if h == self.resized_grid && w == h && !table.device().is_autodiff() {
            return Ok(self.resized.clone().cast(table.dtype()));
        }
        if h > 1024 || w > 1024 {
            return Err(Error::Input(format!("a {h}×{w} feature grid is too large")));
        }
        let (ry, rx) = (bicubic_weights(g, h), bicubic_weights(g, w));
        let mut m = Vec::with_capacity(h * w * g * g);
        for oy in 0..h {
            for ox in 0..w {
                for iy in 0..g {
                    for ix in 0..g {
                        m.push((ry[oy * g + iy] * rx[ox * g + ix]) as f32);
                    }
                }
            }
        }
        let device = table.device();
        let m =
            Tensor::<2>::from_data(TensorData::new(m, [h * w, g * g]), &device).cast(table.dtype());
        Ok(m.matmul(table))
    }

    /// Recomputes the resized table from the current position table (after training
    /// changed it). Reads the table back to the host: native backends only.
    pub fn refresh_resized(&mut self) -> Result<()> {
        let table = self.positional_embedding.val();
        let [rows, c] = table.dims();
        let device = table.device();
        let values = values(table)?;
        let n = self.resized_grid;
        let resized = crate::model::clip::vision::resize_position_table(&values, self.grid, n, c);
        debug_assert_eq!(rows, self.grid * self.grid + 1);
        self.resized =
            Tensor::from_data(TensorData::new(resized[c..].to_vec(), [n * n, c]), &device);
        Ok(())
    }

    fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        let a = &self.attention;
        for (name, l) in [
            ("q_proj", &a.q_proj),
            ("k_proj", &a.k_proj),
            ("v_proj", &a.v_proj),
            ("c_proj", &a.out_proj),
        ] {
            export_linear(out, &format!("{prefix}.{name}"), l)?;
        }
        out.push(named(
            format!("{prefix}.positional_embedding"),
            &self.positional_embedding,
        )?);
        self.connect.export(
            &format!("{prefix}.connect.0"),
            &format!("{prefix}.connect.1"),
            out,
        )
    }

    fn forward(&self, x: Tensor<4>) -> Result<Tensor<4>> {
        let [b, c, h, w] = x.dims();
        let residual = self.connect.forward(x.clone());
        let tokens =
            x.reshape([b, c, h * w]).swap_dims(1, 2) + self.positions_for(h, w)?.unsqueeze_dim(0);
        let out = self.attention.forward(tokens, None, false);
        let d = out.dims()[2];
        let out = out.swap_dims(1, 2).reshape([b, d, h, w]);
        Ok(activation::relu(out + residual))
    }
}

/// The image backbone: stem, four stages, attention pool.
#[derive(Module, Debug)]
pub struct ModifiedResNet {
    pub stem: Vec<ConvBn>,
    pub layers: Vec<Vec<Bottleneck>>,
    pub attnpool: AttentionPool,
}

/// What the backbone hands on: C3 (layer2, stride 8), C4 (layer3, 16), C5 (pool, 32).
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    pub c3: Tensor<4>,
    pub c4: Tensor<4>,
    pub c5: Tensor<4>,
}

impl ImageFeatures {
    /// The features of image `index` of a batch alone.
    pub fn image(&self, index: usize) -> Self {
        let one = |t: &Tensor<4>| t.clone().narrow(0, index, 1);
        Self {
            c3: one(&self.c3),
            c4: one(&self.c4),
            c5: one(&self.c5),
        }
    }
}

impl ModifiedResNet {
    /// `input_size`: the side of the images it will see (the attention pool's position table
    /// is resized for its grid once, here).
    pub fn load(
        w: &Weights,
        prefix: &str,
        cfg: &ResNetConfig,
        input_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let width = cfg.width;
        let stem = [
            (1, [3, width / 2, 3], 2),
            (2, [width / 2, width / 2, 3], 1),
            (3, [width / 2, width, 3], 1),
        ]
        .into_iter()
        .map(|(i, shape, stride)| {
            ConvBn::load(
                w,
                &format!("{prefix}.conv{i}"),
                &format!("{prefix}.bn{i}"),
                shape,
                stride,
                device,
            )
        })
        .collect::<Result<Vec<_>>>()?;
        let mut inplanes = width;
        let mut layers = Vec::new();
        for (stage, &blocks) in cfg.layers.iter().enumerate() {
            let planes = width << stage;
            let stride = if stage == 0 { 1 } else { 2 };
            let mut stage_blocks = Vec::new();
            for i in 0..blocks {
                let key = format!("{prefix}.layer{}.{i}", stage + 1);
                let s = if i == 0 { stride } else { 1 };
                stage_blocks.push(Bottleneck::load(w, &key, inplanes, planes, s, device)?);
                inplanes = planes * 4;
            }
            layers.push(stage_blocks);
        }
        Ok(Self {
            stem,
            layers,
            attnpool: AttentionPool::load(
                w,
                &format!("{prefix}.attnpool"),
                cfg,
                input_size / 32,
                device,
            )?,
        })
    }

    /// The stem's output (after its average pool).
    pub fn stem(&self, pixels: Tensor<4>) -> Tensor<4> {
        let x = self
            .stem
            .iter()
            .fold(pixels, |x, conv| activation::relu(conv.forward(x)));
        avg_pool(x, 2)
    }

    /// C3, C4, C5 for `[B, 3, S, S]` pixels (S divisible by 32).
    pub fn forward(&self, pixels: Tensor<4>) -> Result<ImageFeatures> {
        let [_, _, h, w] = pixels.dims();
        if !h.is_multiple_of(32) || !w.is_multiple_of(32) {
            return Err(Error::Input(format!(
                "CRIS needs an input side divisible by 32, got {h}×{w}"
            )));
        }
        let run = |x: Tensor<4>, stage: &[Bottleneck]| stage.iter().fold(x, |x, b| b.forward(x));
        let x = run(self.stem(pixels), &self.layers[0]);
        let c3 = run(x, &self.layers[1]);
        let c4 = run(c3.clone(), &self.layers[2]);
        let x4 = run(c4.clone(), &self.layers[3]);
        Ok(ImageFeatures {
            c3,
            c4,
            c5: self.attnpool.forward(x4)?,
        })
    }

    /// medvlsm's keys under `prefix` (`backbone.visual`).
    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        for (i, conv) in self.stem.iter().enumerate() {
            conv.export(
                &format!("{prefix}.conv{}", i + 1),
                &format!("{prefix}.bn{}", i + 1),
                out,
            )?;
        }
        for (stage, blocks) in self.layers.iter().enumerate() {
            for (i, block) in blocks.iter().enumerate() {
                block.export(&format!("{prefix}.layer{}.{i}", stage + 1), out)?;
            }
        }
        self.attnpool.export(&format!("{prefix}.attnpool"), out)
    }

    /// layer4's output, before the pool (for parity checks).
    pub fn layer4(&self, pixels: Tensor<4>) -> Tensor<4> {
        let run = |x: Tensor<4>, stage: &[Bottleneck]| stage.iter().fold(x, |x, b| b.forward(x));
        self.layers
            .iter()
            .fold(self.stem(pixels), |x, stage| run(x, stage))
    }
}
