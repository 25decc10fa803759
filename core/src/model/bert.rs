//! BERT's encoder as open_clip builds BiomedCLIP's text tower (`AutoModel.from_config`,
//! keys under `text.transformer.`): word + absolute position + token-type embeddings, a
//! LayerNorm, and post-norm layers with a padding mask. Its layers are the CLIPSeg
//! decoder's post-norm layers under BERT's key names.

use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::tensor::module::embedding;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::Activation;
use crate::error::{Error, Result};
use crate::model::layers::{
    LayerShape, Mlp, SelfAttention, TransformerLayer, check_prompt_batch, layer_norm, linear,
    padding_mask, prompt_ids,
};
use crate::tokenize::TokenizedPrompt;
use crate::weights::Weights;

/// `BertConfig` (`config.json` of a BERT repository); defaults are transformers' (the real
/// BiomedBERT file omits `pad_token_id` and `layer_norm_eps`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: i64,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: Activation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
        }
    }
}

impl BertConfig {
    pub fn from_json(json: &[u8], file: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_slice(json)
            .map_err(|e| Error::Config(format!("{file}: not a BERT config ({e})")))?;
        cfg.validate()
            .map_err(|e| Error::Config(format!("{file}: {e}")))?;
        Ok(cfg)
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        for (name, value, max) in [
            ("vocab_size", self.vocab_size, 1 << 20),
            ("hidden_size", self.hidden_size, 8192),
            ("num_hidden_layers", self.num_hidden_layers, 64),
            ("num_attention_heads", self.num_attention_heads, 128),
            ("intermediate_size", self.intermediate_size, 32768),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                crate::config::MAX_TEXT_POSITIONS,
            ),
            ("type_vocab_size", self.type_vocab_size, 1024),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
            if value > max {
                return Err(format!("{name} is {value}, more than the supported {max}"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

#[derive(Module, Debug)]
pub struct Bert {
    pub word_embeddings: Param<Tensor<2>>,
    pub position_embeddings: Param<Tensor<2>>,
    /// Row 0 of `token_type_embeddings`: open_clip passes no `token_type_ids`, so every
    /// token gets type 0.
    pub token_type_0: Param<Tensor<1>>,
    pub embeddings_norm: LayerNorm,
    pub layers: Vec<TransformerLayer>,
    pub num_heads: usize,
    pub vocab_size: usize,
}

impl Bert {
    pub fn load(w: &Weights, prefix: &str, cfg: &BertConfig, device: &Device) -> Result<Self> {
        let d = cfg.hidden_size;
        let emb = format!("{prefix}.embeddings");
        let types = w.read_f32(
            &format!("{emb}.token_type_embeddings.weight"),
            &[cfg.type_vocab_size, d],
        )?;
        let shape = LayerShape {
            hidden: d,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            act: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        Ok(Self {
            word_embeddings: w.param(
                &format!("{emb}.word_embeddings.weight"),
                [cfg.vocab_size, d],
                device,
            )?,
            position_embeddings: w.param(
                &format!("{emb}.position_embeddings.weight"),
                [cfg.max_position_embeddings, d],
                device,
            )?,
            token_type_0: Param::from_tensor(Tensor::from_data(
                TensorData::new(types[..d].to_vec(), [d]),
                device,
            )),
            embeddings_norm: layer_norm(
                w,
                &format!("{emb}.LayerNorm"),
                d,
                cfg.layer_norm_eps,
                device,
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| load_layer(w, &format!("{prefix}.encoder.layer.{i}"), shape, device))
                .collect::<Result<_>>()?,
            num_heads: cfg.num_attention_heads,
            vocab_size: cfg.vocab_size,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.position_embeddings.val().dims()[0]
    }

    /// The last hidden states `[P, L, D]` of the prompts' real tokens, where L is the
    /// longest prompt's length: padding beyond it is never computed. Padded keys are masked,
    /// so every real row (the CLS row included) is what the full-length forward gives.
    pub fn forward(&self, prompts: &[TokenizedPrompt], device: &Device) -> Result<Tensor<3>> {
        check_prompt_batch(prompts, self.vocab_size)?;
        let len = prompts
            .iter()
            .map(|p| {
                p.attention_mask
                    .iter()
                    .rposition(|&m| m != 0)
                    .map_or(1, |i| i + 1)
            })
            .max()
            .unwrap_or(1);
        if len > self.max_positions() {
            return Err(Error::Input(format!(
                "prompts are {len} tokens long, the model has {} positions",
                self.max_positions()
            )));
        }
        let ids = prompt_ids(prompts, len, device);
        let d = self.token_type_0.dims()[0];
        let positions = self
            .position_embeddings
            .val()
            .narrow(0, 0, len)
            .unsqueeze_dim(0);
        let x = embedding(self.word_embeddings.val(), ids)
            + positions
            + self.token_type_0.val().reshape([1, 1, d]);
        let mut x = self.embeddings_norm.forward(x);
        let mask = padding_mask(prompts, len, self.num_heads, device);
        for layer in &self.layers {
            x = layer.forward_post_norm(x, mask.clone());
        }
        Ok(x)
    }
}

/// `BertLayer`: self-attention (`attention.self.{query,key,value}`, `attention.output.dense`)
/// → `attention.output.LayerNorm`, then `intermediate.dense` → `output.dense` →
/// `output.LayerNorm`, both post-norm around a residual.
fn load_layer(
    w: &Weights,
    prefix: &str,
    s: LayerShape,
    device: &Device,
) -> Result<TransformerLayer> {
    let d = s.hidden;
    let proj = |name: &str| linear(w, &format!("{prefix}.{name}"), d, d, true, device);
    let layer = TransformerLayer {
        self_attn: SelfAttention {
            q_proj: proj("attention.self.query")?,
            k_proj: proj("attention.self.key")?,
            v_proj: proj("attention.self.value")?,
            out_proj: proj("attention.output.dense")?,
            num_heads: s.heads,
        },
        layer_norm1: layer_norm(
            w,
            &format!("{prefix}.attention.output.LayerNorm"),
            d,
            s.eps,
            device,
        )?,
        mlp: Mlp {
            fc1: linear(
                w,
                &format!("{prefix}.intermediate.dense"),
                d,
                s.intermediate,
                true,
                device,
            )?,
            fc2: linear(
                w,
                &format!("{prefix}.output.dense"),
                s.intermediate,
                d,
                true,
                device,
            )?,
            act: s.act,
        },
        layer_norm2: layer_norm(w, &format!("{prefix}.output.LayerNorm"), d, s.eps, device)?,
    };
    Ok(super::layers::in_load_precision(w, layer))
}
