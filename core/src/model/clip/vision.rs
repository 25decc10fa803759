//! CLIP's vision transformer as CLIPSeg uses it (transformers `CLIPSegVisionModel`,
//! keys under `clip.vision_model.`): patch embedding, class token, position embeddings
//! (bicubically resized once for the model's input size), pre-LayerNorm, pre-norm blocks.
//! Only the blocks up to the deepest one the decoder taps are loaded and run.
//!
//! timm's `VisionTransformer` (BiomedCLIP's image tower, keys under `visual.trunk.`) is the
//! same network with a biased patch embedding, no pre-LayerNorm and a fused qkv projection:
//! [`VisionTransformer::load_timm`] loads it into the same blocks.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::{Device, Tensor, TensorData};

use crate::config::{Activation, VisionConfig};
use crate::error::{Error, Result};
use crate::model::biomedclipseg::TimmVitConfig;
use crate::model::layers::{
    LayerShape, NamedTensor, TIMM_BLOCK, TransformerLayer, export_norm, layer_norm,
    linear_from_rows, load_packed_block, named, values,
};
use crate::weights::Weights;

#[derive(Module, Debug)]
pub struct VisionTransformer {
    pub class_embedding: Param<Tensor<1>>,
    /// The patch `Conv2d` (k = s = patch, no bias) as a `[C·p·p, D]` matmul.
    pub patch_embedding: Linear,
    /// Position embeddings for [`Self::input_size`], class row first: `[1 + g², D]`.
    pub position_embedding: Param<Tensor<2>>,
    /// CLIP's `pre_layrnorm`; timm ViTs have none (`norm_pre` is Identity).
    pub pre_layrnorm: Option<LayerNorm>,
    pub layers: Vec<TransformerLayer>,
    pub patch_size: usize,
    pub num_channels: usize,
    pub input_size: usize,
}

impl VisionTransformer {
    /// Loads `{prefix}.embeddings`, `{prefix}.pre_layrnorm` and the first `num_layers` blocks,
    /// ready for `input_size`×`input_size` images.
    pub fn load(
        w: &Weights,
        prefix: &str,
        cfg: &VisionConfig,
        num_layers: usize,
        input_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        if input_size == 0 || !input_size.is_multiple_of(p) {
            return Err(Error::Config(format!(
                "input size {input_size} is not a positive multiple of the patch size {p}"
            )));
        }
        let emb = format!("{prefix}.embeddings");
        // Conv weight [D, C, p, p] → matmul weight [C·p·p, D].
        let conv = w.read_f32(&format!("{emb}.patch_embedding.weight"), &[d, c, p, p])?;
        let k = c * p * p;
        let patch = crate::weights::transpose(&conv, d, k);
        let grid = cfg.image_size / p;
        let table = w.read_f32(
            &format!("{emb}.position_embedding.weight"),
            &[grid * grid + 1, d],
        )?;
        let new_grid = input_size / p;
        let positions = if new_grid == grid {
            table
        } else {
            resize_position_table(&table, grid, new_grid, d)
        };
        let shape = LayerShape {
            hidden: d,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            act: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        let layers = (0..num_layers)
            .map(|i| {
                TransformerLayer::load(w, &format!("{prefix}.encoder.layers.{i}"), shape, device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            class_embedding: w.param(&format!("{emb}.class_embedding"), [d], device)?,
            patch_embedding: Linear {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(patch, [k, d]),
                    device,
                )),
                bias: None,
            },
            position_embedding: Param::from_tensor(Tensor::from_data(
                TensorData::new(positions, [new_grid * new_grid + 1, d]),
                device,
            )),
            pre_layrnorm: Some(layer_norm(
                w,
                &format!("{prefix}.pre_layrnorm"),
                d,
                cfg.layer_norm_eps,
                device,
            )?),
            layers,
            patch_size: p,
            num_channels: c,
            input_size,
        })
    }

    /// Loads a timm `VisionTransformer` (`{prefix}.cls_token`, `.pos_embed`,
    /// `.patch_embed.proj`, `.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`):
    /// its first `num_layers` blocks, for inputs of the size it was built for (timm does not
    /// resize its position table, and neither does medvlsm).
    pub fn load_timm(
        w: &Weights,
        prefix: &str,
        cfg: &TimmVitConfig,
        num_layers: usize,
        device: &Device,
    ) -> Result<Self> {
        let (d, p, c, s) = (cfg.embed_dim, cfg.patch_size, 3, cfg.img_size);
        let k = c * p * p;
        let conv = w.read_f32(&format!("{prefix}.patch_embed.proj.weight"), &[d, c, p, p])?;
        let grid = s / p;
        let positions = w.read_f32(&format!("{prefix}.pos_embed"), &[1, grid * grid + 1, d])?;
        let shape = LayerShape {
            hidden: d,
            heads: cfg.num_heads,
            intermediate: cfg.mlp_hidden(),
            act: Activation::Gelu,
            eps: cfg.layer_norm_eps,
        };
        let layers = (0..num_layers)
            .map(|i| {
                load_packed_block(
                    w,
                    &format!("{prefix}.blocks.{i}"),
                    &TIMM_BLOCK,
                    shape,
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            class_embedding: Param::from_tensor(Tensor::from_data(
                TensorData::new(w.read_f32(&format!("{prefix}.cls_token"), &[1, 1, d])?, [d]),
                device,
            )),
            patch_embedding: linear_from_rows(
                &conv,
                Some(&w.read_f32(&format!("{prefix}.patch_embed.proj.bias"), &[d])?),
                k,
                d,
                device,
            ),
            position_embedding: Param::from_tensor(Tensor::from_data(
                TensorData::new(positions, [grid * grid + 1, d]),
                device,
            )),
            pre_layrnorm: None,
            layers,
            patch_size: p,
            num_channels: c,
            input_size: s,
        })
    }

    /// Tokens after `pre_layrnorm` (`hidden_states[0]`): `[B, C, S, S]` → `[B, 1 + g², D]`.
    /// The tower's tensors under `prefix`, except the (resampled) position table.
    pub fn export(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        let emb = format!("{prefix}.embeddings");
        let mut out = Vec::new();
        let d = self.class_embedding.dims()[0];
        out.push(named(
            format!("{emb}.class_embedding"),
            &self.class_embedding,
        )?);
        // Stored as a Linear `[c·p·p, d]`; PyTorch's conv weight is `[d, c, p, p]`.
        let (c, p) = (self.num_channels, self.patch_size);
        let k = c * p * p;
        let conv = crate::weights::transpose(&values(self.patch_embedding.weight.val())?, k, d);
        out.push((
            format!("{emb}.patch_embedding.weight"),
            vec![d, c, p, p],
            conv,
        ));
        if let Some(norm) = &self.pre_layrnorm {
            export_norm(&mut out, &format!("{prefix}.pre_layrnorm"), norm)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            layer.export(&format!("{prefix}.encoder.layers.{i}"), &mut out)?;
        }
        Ok(out)
    }

    pub fn embed(&self, pixels: Tensor<4>) -> Result<Tensor<3>> {
        let [b, c, h, w] = pixels.dims();
        let s = self.input_size;
        if (c, h, w) != (self.num_channels, s, s) {
            return Err(Error::Input(format!(
                "pixel values are {c}×{h}×{w}, the model was loaded for {}×{s}×{s}",
                self.num_channels
            )));
        }
        let (p, g) = (self.patch_size, s / self.patch_size);
        let patches = pixels
            .reshape([b, c, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, g * g, c * p * p]);
        let patches = self.patch_embedding.forward(patches);
        let d = patches.dims()[2];
        let class = self
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .repeat_dim(0, b);
        let tokens =
            Tensor::cat(vec![class, patches], 1) + self.position_embedding.val().unsqueeze_dim(0);
        Ok(match &self.pre_layrnorm {
            Some(norm) => norm.forward(tokens),
            None => tokens,
        })
    }

    /// The hidden states numbered `wanted` (see [`Self::hidden_states`]), last first: the
    /// decoder takes its taps deepest first.
    pub fn states_deepest_first(
        &self,
        pixels: Tensor<4>,
        wanted: &[usize],
    ) -> Result<Vec<Tensor<3>>> {
        let states = self.hidden_states(pixels)?;
        wanted
            .iter()
            .rev()
            .map(|&k| {
                states.get(k).cloned().ok_or_else(|| {
                    Error::Config(format!(
                        "hidden state {k} is tapped, but only {} blocks are loaded",
                        self.layers.len()
                    ))
                })
            })
            .collect()
    }

    /// All hidden states: `[0]` after `pre_layrnorm`, `[k]` after block k (1-based).
    pub fn hidden_states(&self, pixels: Tensor<4>) -> Result<Vec<Tensor<3>>> {
        let mut states = vec![self.embed(pixels)?];
        for layer in &self.layers {
            let x = states.last().expect("starts non-empty").clone();
            states.push(layer.forward_pre_norm(x, None, false));
        }
        Ok(states)
    }
}

/// Resizes the `grid`×`grid` patch rows of a position table to `new_grid`×`new_grid` as
/// `F.interpolate(mode="bicubic", align_corners=False)` does (A = −0.75, borders clamped);
/// the class row is kept.
pub fn resize_position_table(table: &[f32], grid: usize, new_grid: usize, d: usize) -> Vec<f32> {
    const A: f64 = -0.75;
    let cubic1 = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = grid as f64 / new_grid as f64;
    // For each output coordinate: the 4 source indices and their weights.
    let taps: Vec<([usize; 4], [f64; 4])> = (0..new_grid)
        .map(|o| {
            let src = scale * (o as f64 + 0.5) - 0.5;
            let base = src.floor();
            let t = src - base;
            let weights = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            let idx =
                [-1i64, 0, 1, 2].map(|k| (base as i64 + k).clamp(0, grid as i64 - 1) as usize);
            (idx, weights)
        })
        .collect();
    let mut out = Vec::with_capacity((new_grid * new_grid + 1) * d);
    out.extend_from_slice(&table[..d]);
    let patch = |y: usize, x: usize, ch: usize| table[(1 + y * grid + x) * d + ch] as f64;
    for (ys, wy) in &taps {
        for (xs, wx) in &taps {
            for ch in 0..d {
                let mut v = 0.0;
                for (y, wy) in ys.iter().zip(wy) {
                    let row: f64 = xs
                        .iter()
                        .zip(wx)
                        .map(|(x, wx)| wx * patch(*y, *x, ch))
                        .sum();
                    v += wy * row;
                }
                out.push(v as f32);
            }
        }
    }
    out
}
