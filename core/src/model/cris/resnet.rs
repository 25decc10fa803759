//! CLIP's ModifiedResNet as CRIS uses it (medvlsm `cris_model/clip.py`): a 3-convolution
//! stem with an average pool, Bottlenecks whose strides are anti-aliased average pools, and
//! CRIS's attention pool, which attends over every position (no mean token), adds a
//! position table resized bicubically to the feature grid, projects with `c_proj`, adds the
//! `connect` 1×1 conv + BatchNorm residual and applies ReLU. Returns C3 (layer2), C4
//! (layer3) and C5 (the pool over layer4). BatchNorm runs on its running statistics.

use burn::module::{Module, Param};
use burn::tensor::module::{avg_pool2d, conv2d};
use burn::tensor::ops::{AvgPoolOptions, ConvOptions};
use burn::tensor::{Device, Tensor, TensorData, activation};

use crate::error::{Error, Result};
use crate::model::clip::vision::resize_position_table;
use crate::model::layers::{SelfAttention, linear};
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

/// `nn.BatchNorm2d` in eval mode: `(x − mean) / √(var + eps) · weight + bias`.
#[derive(Module, Debug)]
pub struct BatchNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: Param<Tensor<1>>,
    pub running_var: Param<Tensor<1>>,
    pub eps: f64,
}

impl BatchNorm {
    pub fn load(w: &Weights, prefix: &str, c: usize, device: &Device) -> Result<Self> {
        let p = |name: &str| w.param(&format!("{prefix}.{name}"), [c], device);
        Ok(Self {
            weight: p("weight")?,
            bias: p("bias")?,
            running_mean: p("running_mean")?,
            running_var: p("running_var")?,
            eps: 1e-5,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let c = self.weight.dims()[0];
        let scale = self.weight.val() / (self.running_var.val() + self.eps).sqrt();
        let shift = self.bias.val() - self.running_mean.val() * scale.clone();
        x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1])
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
    /// The position table's grid rows (no class row), `[g², C]`.
    pub positions: Param<Tensor<2>>,
    pub grid: usize,
    pub connect: ConvBn,
}

impl AttentionPool {
    fn load(w: &Weights, prefix: &str, cfg: &ResNetConfig, device: &Device) -> Result<Self> {
        let (c, out) = (cfg.width * 32, cfg.output_dim);
        let proj =
            |name: &str, d_out| linear(w, &format!("{prefix}.{name}"), c, d_out, true, device);
        let g = cfg.pos_grid;
        let table = w.read_f32(&format!("{prefix}.positional_embedding"), &[g * g + 1, c])?;
        Ok(Self {
            attention: SelfAttention {
                q_proj: proj("q_proj", c)?,
                k_proj: proj("k_proj", c)?,
                v_proj: proj("v_proj", c)?,
                out_proj: proj("c_proj", out)?,
                num_heads: cfg.heads,
            },
            positions: Param::from_tensor(Tensor::from_data(
                TensorData::new(table[c..].to_vec(), [g * g, c]),
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

    /// The position table resized to an `h`×`w` grid (`F.interpolate` bicubic,
    /// `align_corners=False`), `[h·w, C]`.
    pub fn positions_for(&self, h: usize, w: usize) -> Result<Tensor<2>> {
        let c = self.positions.dims()[1];
        if h == self.grid && w == self.grid {
            return Ok(self.positions.val());
        }
        if h != w {
            return Err(Error::Input(format!(
                "a {h}×{w} feature grid: the position table is resized to square grids only"
            )));
        }
        let device = self.positions.val().device();
        let rows = self
            .positions
            .val()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| Error::Weights(format!("reading the position table: {e:?}")))?;
        // The resize keeps a leading class row; CRIS has none, so a zero row stands in.
        let mut table = vec![0.0; c];
        table.extend(rows);
        let resized = resize_position_table(&table, self.grid, h, c);
        Ok(Tensor::from_data(
            TensorData::new(resized[c..].to_vec(), [h * w, c]),
            &device,
        ))
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
    pub fn load(w: &Weights, prefix: &str, cfg: &ResNetConfig, device: &Device) -> Result<Self> {
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
            attnpool: AttentionPool::load(w, &format!("{prefix}.attnpool"), cfg, device)?,
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

    /// layer4's output, before the pool (for parity checks).
    pub fn layer4(&self, pixels: Tensor<4>) -> Tensor<4> {
        let run = |x: Tensor<4>, stage: &[Bottleneck]| stage.iter().fold(x, |x, b| b.forward(x));
        self.layers
            .iter()
            .fold(self.stem(pixels), |x, stage| run(x, stage))
    }
}
