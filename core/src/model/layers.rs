//! Building blocks shared by the CLIP towers and the CLIPSeg decoder, each loaded from the
//! checkpoint under its Hugging Face key prefix.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::module::attention;

use crate::kernels;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, FloatDType, Int, Tensor, TensorData, activation};

use crate::config::Activation;
use crate::error::{Error, Result};
use crate::tokenize::TokenizedPrompt;
use crate::weights::Weights;

/// Checks a batch of prompts for a text tower: at least one, one common non-zero length, no
/// id outside `vocab_size`. Returns the common length.
pub fn check_prompt_batch(prompts: &[TokenizedPrompt], vocab_size: usize) -> Result<usize> {
    let full = prompts
        .first()
        .ok_or_else(|| Error::Input("no prompts given".into()))?
        .ids
        .len();
    if full == 0
        || prompts
            .iter()
            .any(|p| p.ids.len() != full || p.attention_mask.len() != full)
    {
        return Err(Error::Input(
            "prompts must be tokenized to one common, non-zero length".into(),
        ));
    }
    if let Some(bad) = prompts
        .iter()
        .flat_map(|p| &p.ids)
        .find(|&&i| i < 0 || i as usize >= vocab_size)
    {
        return Err(Error::Input(format!(
            "token id {bad} is outside the vocabulary of {vocab_size}"
        )));
    }
    Ok(full)
}

/// The first `len` ids of each prompt, `[P, len]`.
pub fn prompt_ids(prompts: &[TokenizedPrompt], len: usize, device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = prompts
        .iter()
        .flat_map(|p| p.ids[..len].iter().copied())
        .collect();
    Tensor::from_data(TensorData::new(ids, [prompts.len(), len]), device)
}

/// The attention masks over the first `len` tokens as attention's key mask
/// (`[P, heads, len, len]`, true = ignore that key), or `None` when nothing there is padding.
pub fn padding_mask(
    prompts: &[TokenizedPrompt],
    len: usize,
    heads: usize,
    device: &Device,
) -> Option<Tensor<4, Bool>> {
    let n = prompts.len();
    let padded = prompts.iter().any(|p| p.attention_mask[..len].contains(&0));
    padded.then(|| {
        let ignore: Vec<bool> = prompts
            .iter()
            .flat_map(|p| p.attention_mask[..len].iter().map(|&m| m == 0))
            .collect();
        Tensor::<2, Bool>::from_data(TensorData::new(ignore, [n, len]), device)
            .reshape([n, 1, 1, len])
            .expand([n, heads, len, len])
    })
}

/// `nn.Linear(d_in, d_out, bias)` at `{prefix}.weight` / `{prefix}.bias`.
pub fn linear(
    w: &Weights,
    prefix: &str,
    d_in: usize,
    d_out: usize,
    bias: bool,
    device: &Device,
) -> Result<Linear> {
    let weight = w.linear_weight(&format!("{prefix}.weight"), d_in, d_out, device)?;
    let bias = if bias {
        Some(w.param(&format!("{prefix}.bias"), [d_out], device)?)
    } else {
        None
    };
    Ok(Linear { weight, bias })
}

/// A `Linear` from a PyTorch `[d_out, d_in]` weight held in memory (e.g. one third of a
/// fused qkv projection) and its bias.
pub fn linear_from_rows(
    rows: &[f32],
    bias: Option<&[f32]>,
    d_in: usize,
    d_out: usize,
    device: &Device,
) -> Linear {
    let weight = crate::weights::transpose(rows, d_out, d_in);
    Linear {
        weight: Param::from_tensor(Tensor::from_data(
            TensorData::new(weight, [d_in, d_out]),
            device,
        )),
        bias: bias.map(|b| {
            Param::from_tensor(Tensor::from_data(
                TensorData::new(b.to_vec(), [d_out]),
                device,
            ))
        }),
    }
}

/// Where a pre-norm block with a packed `[3D, D]` q/k/v projection (rows `[q; k; v]`)
/// keeps its tensors, relative to the block's prefix: timm's ViT and OpenAI's CLIP name the
/// same layer differently.
pub struct PackedBlockKeys {
    pub qkv_weight: &'static str,
    pub qkv_bias: &'static str,
    pub out_proj: &'static str,
    pub norm1: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    pub norm2: &'static str,
}

/// timm's `Block` (`attn.qkv`, `attn.proj`, `norm1`, `mlp.fc1`, …).
pub const TIMM_BLOCK: PackedBlockKeys = PackedBlockKeys {
    qkv_weight: "attn.qkv.weight",
    qkv_bias: "attn.qkv.bias",
    out_proj: "attn.proj",
    norm1: "norm1",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    norm2: "norm2",
};

/// OpenAI CLIP's `ResidualAttentionBlock` (`attn.in_proj_*`, `ln_1`, `mlp.c_fc`, …).
pub const OPENAI_BLOCK: PackedBlockKeys = PackedBlockKeys {
    qkv_weight: "attn.in_proj_weight",
    qkv_bias: "attn.in_proj_bias",
    out_proj: "attn.out_proj",
    norm1: "ln_1",
    fc1: "mlp.c_fc",
    fc2: "mlp.c_proj",
    norm2: "ln_2",
};

/// A packed-qkv pre-norm block loaded into [`TransformerLayer`] (the packed projection
/// split into q, k and v).
pub fn load_packed_block(
    w: &Weights,
    prefix: &str,
    keys: &PackedBlockKeys,
    s: LayerShape,
    device: &Device,
) -> Result<TransformerLayer> {
    let d = s.hidden;
    let key = |name: &str| format!("{prefix}.{name}");
    let layer = TransformerLayer {
        self_attn: SelfAttention::load_packed_at(
            w,
            [
                &key(keys.qkv_weight),
                &key(keys.qkv_bias),
                &key(keys.out_proj),
            ],
            d,
            s.heads,
            device,
        )?,
        layer_norm1: layer_norm(w, &key(keys.norm1), d, s.eps, device)?,
        mlp: Mlp {
            fc1: linear(w, &key(keys.fc1), d, s.intermediate, true, device)?,
            fc2: linear(w, &key(keys.fc2), s.intermediate, d, true, device)?,
            act: s.act,
        },
        layer_norm2: layer_norm(w, &key(keys.norm2), d, s.eps, device)?,
    };
    Ok(in_load_precision(w, layer))
}

/// A just-loaded transformer layer, its attention and MLP linears stored in bf16 when the
/// checkpoint is read for bf16 inference ([`Weights::bf16_block_linears`]): each f32 copy
/// lives only while its layer loads, so the model never holds the f32 weights whole.
pub fn in_load_precision(w: &Weights, layer: TransformerLayer) -> TransformerLayer {
    if w.bf16_block_linears() {
        kernels::linears_to_bf16(layer)
    } else {
        layer
    }
}

/// `nn.LayerNorm(d, eps)` at `{prefix}.weight` / `{prefix}.bias`.
pub fn layer_norm(
    w: &Weights,
    prefix: &str,
    d: usize,
    eps: f64,
    device: &Device,
) -> Result<LayerNorm> {
    let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init(device);
    norm.gamma = w.param(&format!("{prefix}.weight"), [d], device)?;
    norm.beta = Some(w.param(&format!("{prefix}.bias"), [d], device)?);
    Ok(norm)
}

pub fn activate<const D: usize>(x: Tensor<D>, act: Activation) -> Tensor<D> {
    match act {
        Activation::QuickGelu => kernels::quick_gelu(x),
        Activation::Gelu => activation::gelu(x),
        Activation::GeluTanh => activation::gelu_approximate(x),
        Activation::Relu => activation::relu(x),
    }
}

/// `CLIPSegAttention`: multi-head self-attention with separate q/k/v/out projections.
#[derive(Module, Debug)]
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
}

impl SelfAttention {
    pub fn load(
        w: &Weights,
        prefix: &str,
        d: usize,
        heads: usize,
        device: &Device,
    ) -> Result<Self> {
        let proj = |name: &str| linear(w, &format!("{prefix}.{name}"), d, d, true, device);
        Ok(Self {
            q_proj: proj("q_proj")?,
            k_proj: proj("k_proj")?,
            v_proj: proj("v_proj")?,
            out_proj: proj("out_proj")?,
            num_heads: heads,
        })
    }

    /// PyTorch's `nn.MultiheadAttention` at `prefix`: the packed `in_proj_weight` /
    /// `in_proj_bias` (rows `[q; k; v]`) split, and `out_proj`.
    pub fn load_packed(
        w: &Weights,
        prefix: &str,
        d: usize,
        heads: usize,
        device: &Device,
    ) -> Result<Self> {
        Self::load_packed_at(
            w,
            [
                &format!("{prefix}.in_proj_weight"),
                &format!("{prefix}.in_proj_bias"),
                &format!("{prefix}.out_proj"),
            ],
            d,
            heads,
            device,
        )
    }

    fn load_packed_at(
        w: &Weights,
        [qkv_weight, qkv_bias, out_proj]: [&str; 3],
        d: usize,
        heads: usize,
        device: &Device,
    ) -> Result<Self> {
        let packed = w.read_f32(qkv_weight, &[3 * d, d])?;
        let bias = w.read_f32(qkv_bias, &[3 * d])?;
        let [q_proj, k_proj, v_proj] = [0, 1, 2].map(|i| {
            linear_from_rows(
                &packed[i * d * d..(i + 1) * d * d],
                Some(&bias[i * d..(i + 1) * d]),
                d,
                d,
                device,
            )
        });
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            out_proj: linear(w, out_proj, d, d, true, device)?,
            num_heads: heads,
        })
    }

    /// The packed layout [`Self::load_packed_at`] reads: `[3D, D]` rows `[q; k; v]`, their
    /// biases, and `out_proj`.
    pub fn export_packed(
        &self,
        [qkv_weight, qkv_bias, out_proj]: [&str; 3],
        out: &mut Vec<NamedTensor>,
    ) -> Result<()> {
        let mut parts = Vec::new();
        for l in [&self.q_proj, &self.k_proj, &self.v_proj] {
            export_linear(&mut parts, "p", l)?;
        }
        let d = self.q_proj.weight.dims()[0];
        let (mut weight, mut bias) = (Vec::with_capacity(3 * d * d), Vec::with_capacity(3 * d));
        for (name, _, v) in parts {
            if name.ends_with("weight") {
                weight.extend(v);
            } else {
                bias.extend(v);
            }
        }
        out.push((qkv_weight.to_string(), vec![3 * d, d], weight));
        out.push((qkv_bias.to_string(), vec![3 * d], bias));
        export_linear(out, out_proj, &self.out_proj)
    }

    /// As [`Self::forward_qkv`] (no causal mask), with `nn.MultiheadAttention`'s dropout `p`
    /// on the attention weights when training (an autodiff device).
    pub fn forward_qkv_dropout(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_mask: Option<Tensor<4, Bool>>,
        p: f64,
    ) -> Tensor<3> {
        if p == 0.0 || !query.device().is_autodiff() {
            return self.forward_qkv(query, key, value, key_mask, false);
        }
        let [b, l, d] = query.dims();
        let h = self.num_heads;
        let [q, k, v] = self.project_heads(query, key, value);
        let mut scores = q.matmul(k.swap_dims(2, 3)) / ((d / h) as f64).sqrt();
        if let Some(mask) = key_mask {
            scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        }
        let weights = dropout(activation::softmax(scores, 3), p);
        self.out_proj
            .forward(weights.matmul(v).swap_dims(1, 2).reshape([b, l, d]))
    }

    /// q, k and v projected and split into heads: `[B, H, L, D / H]` each.
    fn project_heads(&self, query: Tensor<3>, key: Tensor<3>, value: Tensor<3>) -> [Tensor<4>; 3] {
        let [b, l, d] = query.dims();
        let lk = key.dims()[1];
        let h = self.num_heads;
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, n, h, d / h]).swap_dims(1, 2);
        [
            heads(kernels::linear(query, &self.q_proj), l),
            heads(kernels::linear(key, &self.k_proj), lk),
            heads(kernels::linear(value, &self.v_proj), lk),
        ]
    }

    /// `x`: `[B, L, D]`; `key_mask`: `[B, H, L, L]`, true where a key must be ignored.
    pub fn forward(
        &self,
        x: Tensor<3>,
        key_mask: Option<Tensor<4, Bool>>,
        causal: bool,
    ) -> Tensor<3> {
        self.forward_qkv(x.clone(), x.clone(), x, key_mask, causal)
    }

    /// Attention with separate query, key and value inputs (`[B, Lq, D]`, `[B, Lk, D]`,
    /// `[B, Lk, D]`), as `nn.MultiheadAttention(query, key, value)`; `key_mask`
    /// `[B, H, Lq, Lk]`, true where a key must be ignored.
    pub fn forward_qkv(
        &self,
        query: Tensor<3>,
        key: Tensor<3>,
        value: Tensor<3>,
        key_mask: Option<Tensor<4, Bool>>,
        causal: bool,
    ) -> Tensor<3> {
        let [b, l, d] = query.dims();
        let [q, k, v] = self.project_heads(query, key, value);
        let options = AttentionModuleOptions {
            scale: None, // 1/sqrt(head_dim), as CLIP
            softcap: None,
            is_causal: causal,
        };
        let dtype = q.dtype();
        let out = if dtype == DType::F32 {
            kernels::attention(q, k, v, key_mask, causal)
        } else {
            // Half precision (mixed-precision training): scores and softmax in float32, as
            // autocast runs softmax; q·kᵀ of large activations overflows float16.
            let wide = |t: Tensor<4>| t.cast(FloatDType::F32);
            attention(wide(q), wide(k), wide(v), key_mask, None, options).cast(dtype)
        };
        kernels::linear(out.swap_dims(1, 2).reshape([b, l, d]), &self.out_proj)
    }
}

/// `nn.Dropout(p)`: when training (an autodiff device), zeroes each value with probability
/// `p` and scales the rest by `1 / (1 − p)`; the identity otherwise. The mask comes from the
/// device's generator (the trainer seeds it per step, so a resumed run draws the same).
pub fn dropout<const D: usize>(x: Tensor<D>, p: f64) -> Tensor<D> {
    if p == 0.0 || !x.device().is_autodiff() {
        return x;
    }
    let keep = Tensor::<D>::random(
        x.shape(),
        burn::tensor::Distribution::Bernoulli(1.0 - p),
        &x.device(),
    )
    .cast(x.dtype());
    x * keep / (1.0 - p)
}

/// `CLIPSegMLP`: fc1 → activation → fc2.
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    #[module(skip)]
    pub act: Activation,
}

impl Mlp {
    pub fn load(
        w: &Weights,
        prefix: &str,
        d: usize,
        hidden: usize,
        act: Activation,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            fc1: linear(w, &format!("{prefix}.fc1"), d, hidden, true, device)?,
            fc2: linear(w, &format!("{prefix}.fc2"), hidden, d, true, device)?,
            act,
        })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let fused = match self.act {
            Activation::Relu => kernels::mlp(&x, &self.fc1, &self.fc2, false),
            Activation::QuickGelu => kernels::mlp(&x, &self.fc1, &self.fc2, true),
            _ => None,
        };
        fused.unwrap_or_else(|| {
            // bf16-stored weights go through vlsm's kernel; f32 ones keep burn's op, whose
            // numbers the parity fixtures were checked against.
            let fc = |x: Tensor<3>, layer: &Linear| {
                if kernels::stored_in_bf16(layer) {
                    kernels::linear(x, layer)
                } else {
                    layer.forward(x)
                }
            };
            fc(activate(fc(x, &self.fc1), self.act), &self.fc2)
        })
    }
}

/// Sizes of one transformer layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerShape {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub act: Activation,
    pub eps: f64,
}

/// `CLIPSegEncoderLayer` (pre-norm) or `CLIPSegDecoderLayer` (post-norm): same weights.
#[derive(Module, Debug)]
pub struct TransformerLayer {
    pub self_attn: SelfAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: Mlp,
    pub layer_norm2: LayerNorm,
}

impl TransformerLayer {
    pub fn load(w: &Weights, prefix: &str, s: LayerShape, device: &Device) -> Result<Self> {
        let layer = Self {
            self_attn: SelfAttention::load(
                w,
                &format!("{prefix}.self_attn"),
                s.hidden,
                s.heads,
                device,
            )?,
            layer_norm1: layer_norm(w, &format!("{prefix}.layer_norm1"), s.hidden, s.eps, device)?,
            mlp: Mlp::load(
                w,
                &format!("{prefix}.mlp"),
                s.hidden,
                s.intermediate,
                s.act,
                device,
            )?,
            layer_norm2: layer_norm(w, &format!("{prefix}.layer_norm2"), s.hidden, s.eps, device)?,
        };
        Ok(in_load_precision(w, layer))
    }

    /// Pre-norm: `x + attn(ln1(x))`, then `x + mlp(ln2(x))` (the CLIP towers).
    /// The layer's tensors under `prefix` (Hugging Face names and layouts).
    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        let attn = &self.self_attn;
        for (name, l) in [
            ("q_proj", &attn.q_proj),
            ("k_proj", &attn.k_proj),
            ("v_proj", &attn.v_proj),
            ("out_proj", &attn.out_proj),
        ] {
            export_linear(out, &format!("{prefix}.self_attn.{name}"), l)?;
        }
        export_norm(out, &format!("{prefix}.layer_norm1"), &self.layer_norm1)?;
        export_linear(out, &format!("{prefix}.mlp.fc1"), &self.mlp.fc1)?;
        export_linear(out, &format!("{prefix}.mlp.fc2"), &self.mlp.fc2)?;
        export_norm(out, &format!("{prefix}.layer_norm2"), &self.layer_norm2)
    }

    pub fn forward_pre_norm(
        &self,
        x: Tensor<3>,
        key_mask: Option<Tensor<4, Bool>>,
        causal: bool,
    ) -> Tensor<3> {
        let x = x.clone()
            + self
                .self_attn
                .forward(self.layer_norm1.forward(x), key_mask, causal);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }

    /// Post-norm: `ln1(x + attn(x))`, then `ln2(x + mlp(x))` (the CLIPSeg decoder, BERT).
    pub fn forward_post_norm(&self, x: Tensor<3>, key_mask: Option<Tensor<4, Bool>>) -> Tensor<3> {
        let x = self
            .layer_norm1
            .forward(x.clone() + self.self_attn.forward(x, key_mask, false));
        self.layer_norm2.forward(x.clone() + self.mlp.forward(x))
    }
}

/// `ConvTranspose2d` whose kernel equals its stride: every input pixel paints its own
/// k×k block, so it is a matmul followed by a pixel shuffle (exact, and fast on CPU).
#[derive(Module, Debug)]
pub struct PatchConvTranspose {
    /// `[C_in, C_out·k·k]`: PyTorch's `[C_in, C_out, k, k]` weight, flattened.
    pub weight: Param<Tensor<2>>,
    pub bias: Param<Tensor<1>>,
    pub out_channels: usize,
    pub kernel: usize,
}

impl PatchConvTranspose {
    pub fn load(
        w: &Weights,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        device: &Device,
    ) -> Result<Self> {
        let key = format!("{prefix}.weight");
        let values = w.read_f32(&key, &[c_in, c_out, kernel, kernel])?;
        let weight = Tensor::from_data(
            TensorData::new(values, [c_in, c_out * kernel * kernel]),
            device,
        );
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias: w.param(&format!("{prefix}.bias"), [c_out], device)?,
            out_channels: c_out,
            kernel,
        })
    }

    /// `[B, C_in, H, W]` → `[B, C_out, H·k, W·k]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c_in, h, w] = x.dims();
        let (c_out, k) = (self.out_channels, self.kernel);
        let pixels = x.permute([0, 2, 3, 1]).reshape([b * h * w, c_in]);
        let blocks = pixels
            .matmul(self.weight.val())
            .reshape([b, h, w, c_out, k, k]);
        let image = blocks
            .permute([0, 3, 1, 4, 2, 5])
            .reshape([b, c_out, h * k, w * k]);
        image + self.bias.val().reshape([1, c_out, 1, 1])
    }
}

/// A tensor by Hugging Face name: (key, shape, f32 values).
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

pub fn values<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Weights(format!("reading a tensor: {e:?}")))
}

/// A parameter as it is stored (its own shape), under `name`.
pub fn named<const D: usize>(name: String, param: &Param<Tensor<D>>) -> Result<NamedTensor> {
    let tensor = param.val();
    Ok((name, tensor.dims().to_vec(), values(tensor)?))
}

/// burn's `Linear` weight is `[in, out]`; PyTorch's `[out, in]`.
pub fn export_linear(out: &mut Vec<NamedTensor>, prefix: &str, l: &Linear) -> Result<()> {
    let [d_in, d_out] = l.weight.dims();
    // A bf16-stored weight (`--precision bf16`) is kept in the bf16 GEMM's order.
    let weight = if kernels::stored_in_bf16(l) {
        kernels::bf16_weight_values(l)
    } else {
        l.weight.val()
    };
    let w = crate::weights::transpose(&values(weight)?, d_in, d_out);
    out.push((format!("{prefix}.weight"), vec![d_out, d_in], w));
    if let Some(b) = &l.bias {
        out.push(named(format!("{prefix}.bias"), b)?);
    }
    Ok(())
}

pub fn export_norm(out: &mut Vec<NamedTensor>, prefix: &str, n: &LayerNorm) -> Result<()> {
    out.push(named(format!("{prefix}.weight"), &n.gamma)?);
    let beta = n
        .beta
        .as_ref()
        .ok_or_else(|| Error::Weights(format!("{prefix} has no bias")))?;
    out.push(named(format!("{prefix}.bias"), beta)?);
    Ok(())
}

/// Stored `[in, out·k·k]`, the memory of PyTorch's `[in, out, k, k]`.
pub fn export_conv_transpose(
    out: &mut Vec<NamedTensor>,
    prefix: &str,
    c: &PatchConvTranspose,
) -> Result<()> {
    let [c_in, _] = c.weight.dims();
    let k = c.kernel;
    out.push((
        format!("{prefix}.weight"),
        vec![c_in, c.out_channels, k, k],
        values(c.weight.val())?,
    ));
    out.push(named(format!("{prefix}.bias"), &c.bias)?);
    Ok(())
}
