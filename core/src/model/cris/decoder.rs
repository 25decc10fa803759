//! CRIS's vision-language decoder and projector (medvlsm `cris_model/layers.py`
//! `TransformerDecoder`, `TransformerDecoderLayer`, `Projector`).
//!
//! The decoder's layers are pre-norm with extra LayerNorms after each attention and one inside
//! the FFN; 2-D sine positions go on the queries and keys of self-attention and on the
//! cross-attention's queries, 1-D sine positions on the text keys. Text keys whose token id is
//! 0 are masked (`key_padding_mask = input_ids == 0`: CLIP's "!", not the padding, which is
//! EOT and attended). Layouts here are batch-first (`[B, L, C]`); PyTorch's are
//! sequence-first, which changes nothing numerically.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData, activation};

use crate::error::Result;
use crate::model::cris::neck::{ConvLayer, upsample2};
use crate::model::layers::{
    NamedTensor, SelfAttention, dropout, export_linear, export_norm, layer_norm, linear, named,
};
use crate::weights::Weights;

/// PyTorch's `nn.LayerNorm` default.
const LN_EPS: f64 = 1e-5;

/// `TransformerDecoder.pos1d`: `[L, D]`, sin on even channels, cos on odd, computed in
/// float32 as PyTorch does.
pub fn pos1d(d: usize, length: usize) -> Vec<f32> {
    let step = -(10000f64.ln() / d as f64) as f32;
    let mut pe = vec![0f32; length * d];
    for l in 0..length {
        for i in 0..d / 2 {
            let div = ((2 * i) as f32 * step).exp();
            let angle = l as f32 * div;
            pe[l * d + 2 * i] = angle.sin();
            pe[l * d + 2 * i + 1] = angle.cos();
        }
    }
    pe
}

/// `TransformerDecoder.pos2d`: `[H·W, C]`; the first half of the channels encodes the
/// column (sin, cos interleaved), the second half the row.
pub fn pos2d(c: usize, h: usize, w: usize) -> Vec<f32> {
    let half = c / 2;
    let step = -(10000f64.ln() / half as f64) as f32;
    let divs: Vec<f32> = (0..half / 2)
        .map(|i| ((2 * i) as f32 * step).exp())
        .collect();
    let mut pe = vec![0f32; h * w * c];
    for y in 0..h {
        for x in 0..w {
            let row = &mut pe[(y * w + x) * c..(y * w + x + 1) * c];
            for (i, &div) in divs.iter().enumerate() {
                let (ax, ay) = (x as f32 * div, y as f32 * div);
                row[2 * i] = ax.sin();
                row[2 * i + 1] = ax.cos();
                row[half + 2 * i] = ay.sin();
                row[half + 2 * i + 1] = ay.cos();
            }
        }
    }
    pe
}

/// The decoder's sizes (medvlsm's `vis_dim`, `num_layers`, `num_head`, `dim_ffn`) and its
/// dropout (training only).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderShape {
    pub d_model: usize,
    pub num_layers: usize,
    pub num_head: usize,
    pub dim_ffn: usize,
    pub dropout: f64,
}

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub norm1: LayerNorm,
    pub self_attn: SelfAttention,
    pub self_attn_norm: LayerNorm,
    pub norm2: LayerNorm,
    pub cross_attn: SelfAttention,
    pub cross_attn_norm: LayerNorm,
    pub norm3: LayerNorm,
    pub ffn_in: Linear,
    pub ffn_norm: LayerNorm,
    pub ffn_out: Linear,
    /// Dropout on the attention weights, after the FFN's ReLU and on each residual branch
    /// (medvlsm's `dropout`, 0.2); applied only when training.
    pub dropout: f64,
}

impl DecoderLayer {
    fn load(w: &Weights, prefix: &str, s: &DecoderShape, device: &Device) -> Result<Self> {
        let d = s.d_model;
        let key = |name: &str| format!("{prefix}.{name}");
        let norm = |name: &str, n| layer_norm(w, &key(name), n, LN_EPS, device);
        Ok(Self {
            norm1: norm("norm1", d)?,
            self_attn: SelfAttention::load_packed(w, &key("self_attn"), d, s.num_head, device)?,
            self_attn_norm: norm("self_attn_norm", d)?,
            norm2: norm("norm2", d)?,
            cross_attn: SelfAttention::load_packed(
                w,
                &key("multihead_attn"),
                d,
                s.num_head,
                device,
            )?,
            cross_attn_norm: norm("cross_attn_norm", d)?,
            norm3: norm("norm3", d)?,
            ffn_in: linear(w, &key("ffn.0"), d, s.dim_ffn, true, device)?,
            ffn_norm: norm("ffn.3", s.dim_ffn)?,
            ffn_out: linear(w, &key("ffn.4"), s.dim_ffn, d, true, device)?,
            dropout: s.dropout,
        })
    }

    fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        let key = |name: &str| format!("{prefix}.{name}");
        for (name, attn) in [
            ("self_attn", &self.self_attn),
            ("multihead_attn", &self.cross_attn),
        ] {
            attn.export_packed(
                [
                    &key(&format!("{name}.in_proj_weight")),
                    &key(&format!("{name}.in_proj_bias")),
                    &key(&format!("{name}.out_proj")),
                ],
                out,
            )?;
        }
        for (name, norm) in [
            ("norm1", &self.norm1),
            ("self_attn_norm", &self.self_attn_norm),
            ("norm2", &self.norm2),
            ("cross_attn_norm", &self.cross_attn_norm),
            ("norm3", &self.norm3),
            ("ffn.3", &self.ffn_norm),
        ] {
            export_norm(out, &key(name), norm)?;
        }
        export_linear(out, &key("ffn.0"), &self.ffn_in)?;
        export_linear(out, &key("ffn.4"), &self.ffn_out)
    }

    /// `vis` `[B, HW, C]`, `txt` `[B, L, C]`, positions `[1, HW, C]` / `[1, L, C]`,
    /// `text_mask` `[B, H, HW, L]` (true = ignored).
    fn forward(
        &self,
        vis: Tensor<3>,
        txt: Tensor<3>,
        vis_pos: Tensor<3>,
        txt_pos: Tensor<3>,
        text_mask: Tensor<4, Bool>,
    ) -> Tensor<3> {
        let p = self.dropout;
        let v = self.norm1.forward(vis.clone());
        let qk = v.clone() + vis_pos.clone();
        let v = self
            .self_attn
            .forward_qkv_dropout(qk.clone(), qk, v, None, p);
        let vis = vis + dropout(self.self_attn_norm.forward(v), p);

        let v = self.norm2.forward(vis.clone());
        let v = self.cross_attn.forward_qkv_dropout(
            v + vis_pos,
            txt.clone() + txt_pos,
            txt,
            Some(text_mask),
            p,
        );
        let vis = vis + dropout(self.cross_attn_norm.forward(v), p);

        let v = self.norm3.forward(vis.clone());
        let v = dropout(activation::relu(self.ffn_in.forward(v)), p);
        let v = self.ffn_out.forward(self.ffn_norm.forward(v));
        vis + dropout(v, p)
    }
}

/// `TransformerDecoder` with `return_intermediate=False`: its layers, then the final norm.
#[derive(Module, Debug)]
pub struct VisionLanguageDecoder {
    pub layers: Vec<DecoderLayer>,
    pub norm: LayerNorm,
}

impl VisionLanguageDecoder {
    pub fn load(w: &Weights, prefix: &str, s: &DecoderShape, device: &Device) -> Result<Self> {
        Ok(Self {
            layers: (0..s.num_layers)
                .map(|i| DecoderLayer::load(w, &format!("{prefix}.layers.{i}"), s, device))
                .collect::<Result<_>>()?,
            norm: layer_norm(w, &format!("{prefix}.norm"), s.d_model, LN_EPS, device)?,
        })
    }

    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        for (i, layer) in self.layers.iter().enumerate() {
            layer.export(&format!("{prefix}.layers.{i}"), out)?;
        }
        export_norm(out, &format!("{prefix}.norm"), &self.norm)
    }

    /// `vis` `[B, C, H, W]` (the neck's output), `words` `[B, L, C]`, `ignored` `[B, L]`
    /// (true where the token id is 0). Returns each layer's output (`[B, HW, C]`, before the
    /// final norm) and the decoded map `[B, C, H, W]`.
    pub fn forward(
        &self,
        vis: Tensor<4>,
        words: Tensor<3>,
        ignored: Tensor<2, Bool>,
    ) -> (Vec<Tensor<3>>, Tensor<4>) {
        let [b, c, h, w] = vis.dims();
        let [_, l, d] = words.dims();
        let device = vis.device();
        let dtype = vis.dtype();
        let table = |values: Vec<f32>, n: usize, d: usize| {
            Tensor::<3>::from_data(TensorData::new(values, [1, n, d]), &device).cast(dtype)
        };
        let vis_pos = table(pos2d(c, h, w), h * w, c);
        let txt_pos = table(pos1d(d, l), l, d);
        let heads = self
            .layers
            .first()
            .map_or(1, |layer| layer.cross_attn.num_heads);
        // Materialised (not a broadcast view): attention kernels read it densely.
        let text_mask = ignored
            .reshape([b, 1, 1, l])
            .repeat_dim(1, heads)
            .repeat_dim(2, h * w);
        let mut x = vis.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut outputs = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            x = layer.forward(
                x,
                words.clone(),
                vis_pos.clone(),
                txt_pos.clone(),
                text_mask.clone(),
            );
            outputs.push(x.clone());
        }
        let out = self.norm.forward(x).swap_dims(1, 2).reshape([b, c, h, w]);
        (outputs, out)
    }
}

/// `Projector(word_dim, vis_dim / 2, 3)`: the visual path upsamples ×4 to `in_dim`
/// channels; the sentence state becomes a per-sample 3×3 kernel and bias applied to its own
/// sample's map (a grouped convolution over the batch), giving one logit map per sample.
#[derive(Module, Debug)]
pub struct Projector {
    pub vis1: ConvLayer,
    pub vis2: ConvLayer,
    pub vis_out_weight: Param<Tensor<4>>,
    pub vis_out_bias: Param<Tensor<1>>,
    pub txt: Linear,
    pub in_dim: usize,
}

/// The projector's kernel side (medvlsm's `kernel_size = 3`).
const KERNEL: usize = 3;

/// The projector's traced outputs.
#[derive(Debug, Clone)]
pub struct ProjectorTrace {
    /// The visual path's map `[B, in_dim, 4h, 4w]`.
    pub vis: Tensor<4>,
    /// Logits `[B, 1, 4h, 4w]` (before the final upsampling).
    pub output: Tensor<4>,
}

impl Projector {
    pub fn load(
        w: &Weights,
        prefix: &str,
        word_dim: usize,
        in_dim: usize,
        device: &Device,
    ) -> Result<Self> {
        let key = |name: &str| format!("{prefix}.{name}");
        Ok(Self {
            vis1: ConvLayer::load(w, &key("vis.1"), [2 * in_dim, 2 * in_dim, 3], device)?,
            vis2: ConvLayer::load(w, &key("vis.3"), [2 * in_dim, in_dim, 3], device)?,
            vis_out_weight: w.param(&key("vis.4.weight"), [in_dim, in_dim, 1, 1], device)?,
            vis_out_bias: w.param(&key("vis.4.bias"), [in_dim], device)?,
            txt: linear(
                w,
                &key("txt"),
                word_dim,
                in_dim * KERNEL * KERNEL + 1,
                true,
                device,
            )?,
            in_dim,
        })
    }

    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        self.vis1.export(&format!("{prefix}.vis.1"), out)?;
        self.vis2.export(&format!("{prefix}.vis.3"), out)?;
        out.push(named(
            format!("{prefix}.vis.4.weight"),
            &self.vis_out_weight,
        )?);
        out.push(named(format!("{prefix}.vis.4.bias"), &self.vis_out_bias)?);
        export_linear(out, &format!("{prefix}.txt"), &self.txt)
    }

    /// `x` `[B, 2·in_dim, h, w]` (the decoder's map), `state` `[B, word_dim]`.
    pub fn forward(&self, x: Tensor<4>, state: Tensor<2>) -> ProjectorTrace {
        let x = self
            .vis2
            .forward(upsample2(self.vis1.forward(upsample2(x))));
        let vis = conv2d(
            x,
            self.vis_out_weight.val(),
            Some(self.vis_out_bias.val()),
            ConvOptions::new([1, 1], [0, 0], [1, 1], 1),
        );
        let [b, c, h, w] = vis.dims();
        let kernels = self.txt.forward(state);
        let n = c * KERNEL * KERNEL;
        let weight = kernels
            .clone()
            .narrow(1, 0, n)
            .reshape([b, c, KERNEL, KERNEL]);
        let bias = kernels.narrow(1, n, 1).reshape([b]);
        let output = conv2d(
            vis.clone().reshape([1, b * c, h, w]),
            weight,
            Some(bias),
            ConvOptions::new([1, 1], [KERNEL / 2, KERNEL / 2], [1, 1], b),
        )
        .reshape([b, 1, h, w]);
        ProjectorTrace { vis, output }
    }
}
