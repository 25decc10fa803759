//! CLIP's text transformer (transformers `CLIPSegTextModel`, keys under
//! `clip.text_model.`): token + position embeddings, causal pre-norm blocks, final
//! LayerNorm, and pooling at the end-of-text token.

use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::tensor::module::embedding;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::TextConfig;
use crate::error::{Error, Result};
use crate::model::layers::{
    LayerShape, NamedTensor, OPENAI_BLOCK, TransformerLayer, check_prompt_batch, export_norm,
    layer_norm, load_packed_block, named, padding_mask, prompt_ids,
};
use crate::tokenize::TokenizedPrompt;
use crate::weights::Weights;

#[derive(Module, Debug)]
pub struct TextTransformer {
    pub token_embedding: Param<Tensor<2>>,
    pub position_embedding: Param<Tensor<2>>,
    pub layers: Vec<TransformerLayer>,
    pub final_layer_norm: LayerNorm,
    pub num_heads: usize,
    /// `eos_token_id` from the config: pooling takes its first occurrence, except for the
    /// legacy value 2 (CIDAS checkpoints), where it takes `argmax(input_ids)` as transformers.
    pub eos_token_id: usize,
    pub legacy_pooling: bool,
    pub vocab_size: usize,
    /// transformers masks padded keys besides the causal mask; OpenAI's CLIP (as CRIS runs
    /// it) does not, which changes only the pad rows (CRIS's decoder reads those).
    pub mask_padding: bool,
}

impl TextTransformer {
    /// The tower's tensors under `prefix` (Hugging Face names and layouts).
    pub fn export(&self, prefix: &str) -> Result<Vec<NamedTensor>> {
        let emb = format!("{prefix}.embeddings");
        let mut out = vec![
            named(
                format!("{emb}.token_embedding.weight"),
                &self.token_embedding,
            )?,
            named(
                format!("{emb}.position_embedding.weight"),
                &self.position_embedding,
            )?,
        ];
        for (i, layer) in self.layers.iter().enumerate() {
            layer.export(&format!("{prefix}.encoder.layers.{i}"), &mut out)?;
        }
        export_norm(
            &mut out,
            &format!("{prefix}.final_layer_norm"),
            &self.final_layer_norm,
        )?;
        Ok(out)
    }

    pub fn load(w: &Weights, prefix: &str, cfg: &TextConfig, device: &Device) -> Result<Self> {
        let d = cfg.hidden_size;
        let shape = LayerShape {
            hidden: d,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            act: cfg.hidden_act,
            eps: cfg.layer_norm_eps,
        };
        let emb = format!("{prefix}.embeddings");
        Ok(Self {
            token_embedding: w.param(
                &format!("{emb}.token_embedding.weight"),
                [cfg.vocab_size, d],
                device,
            )?,
            position_embedding: w.param(
                &format!("{emb}.position_embedding.weight"),
                [cfg.max_position_embeddings, d],
                device,
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| {
                    TransformerLayer::load(
                        w,
                        &format!("{prefix}.encoder.layers.{i}"),
                        shape,
                        device,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            final_layer_norm: layer_norm(
                w,
                &format!("{prefix}.final_layer_norm"),
                d,
                cfg.layer_norm_eps,
                device,
            )?,
            num_heads: cfg.num_attention_heads,
            eos_token_id: cfg.eos_token_id.max(0) as usize,
            legacy_pooling: cfg.eos_token_id == 2,
            vocab_size: cfg.vocab_size,
            mask_padding: true,
        })
    }

    /// Loads OpenAI's CLIP text tower (`{prefix}.token_embedding.weight`,
    /// `.positional_embedding`, `.transformer.resblocks.N.{ln_1, attn.in_proj_*,
    /// attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `.ln_final`), sizes from the shapes as
    /// CLIP's `build_model` derives them (heads = width / 64): the layout CRIS checkpoints
    /// keep. Pooling is CLIP's `argmax(ids)`; pads are not masked.
    pub fn load_openai(w: &Weights, prefix: &str, device: &Device) -> Result<Self> {
        let shape = |key: &str| {
            w.shape(&format!("{prefix}.{key}"))
                .map(<[usize]>::to_vec)
                .ok_or_else(|| Error::Weights(format!("{}: missing `{prefix}.{key}`", w.source())))
        };
        let emb = shape("token_embedding.weight")?;
        let (vocab, d) = (emb[0], emb[1]);
        let context = shape("positional_embedding")?[0];
        let mut layers = 0;
        while w.contains(&format!(
            "{prefix}.transformer.resblocks.{layers}.ln_1.weight"
        )) {
            layers += 1;
        }
        if layers == 0
            || layers > 64
            || d == 0
            || d > 8192
            || context > crate::config::MAX_TEXT_POSITIONS
        {
            return Err(Error::Weights(format!(
                "{}: not a CLIP text tower ({layers} blocks, width {d}, {context} positions)",
                w.source()
            )));
        }
        let heads = (d / 64).max(1);
        let shape = LayerShape {
            hidden: d,
            heads,
            intermediate: 4 * d,
            act: crate::config::Activation::QuickGelu,
            eps: 1e-5,
        };
        Ok(Self {
            token_embedding: w.param(
                &format!("{prefix}.token_embedding.weight"),
                [vocab, d],
                device,
            )?,
            position_embedding: w.param(
                &format!("{prefix}.positional_embedding"),
                [context, d],
                device,
            )?,
            layers: (0..layers)
                .map(|i| {
                    load_packed_block(
                        w,
                        &format!("{prefix}.transformer.resblocks.{i}"),
                        &OPENAI_BLOCK,
                        shape,
                        device,
                    )
                })
                .collect::<Result<_>>()?,
            final_layer_norm: layer_norm(w, &format!("{prefix}.ln_final"), d, 1e-5, device)?,
            num_heads: heads,
            eos_token_id: 0,
            legacy_pooling: true,
            vocab_size: vocab,
            mask_padding: false,
        })
    }

    /// The tower under OpenAI's key names (the layout [`Self::load_openai`] reads).
    pub fn export_openai(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        use crate::model::layers::{export_linear, export_norm, named};
        out.push(named(
            format!("{prefix}.token_embedding.weight"),
            &self.token_embedding,
        )?);
        out.push(named(
            format!("{prefix}.positional_embedding"),
            &self.position_embedding,
        )?);
        for (i, layer) in self.layers.iter().enumerate() {
            let key = |name: &str| format!("{prefix}.transformer.resblocks.{i}.{name}");
            layer.self_attn.export_packed(
                [
                    &key("attn.in_proj_weight"),
                    &key("attn.in_proj_bias"),
                    &key("attn.out_proj"),
                ],
                out,
            )?;
            export_norm(out, &key("ln_1"), &layer.layer_norm1)?;
            export_linear(out, &key("mlp.c_fc"), &layer.mlp.fc1)?;
            export_linear(out, &key("mlp.c_proj"), &layer.mlp.fc2)?;
            export_norm(out, &key("ln_2"), &layer.layer_norm2)?;
        }
        export_norm(out, &format!("{prefix}.ln_final"), &self.final_layer_norm)
    }

    pub fn max_positions(&self) -> usize {
        self.position_embedding.val().dims()[0]
    }

    /// The row transformers pools for this prompt.
    pub fn pooled_index(&self, ids: &[i64]) -> usize {
        if self.legacy_pooling {
            // argmax returns the first maximum.
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max).unwrap_or(0)
        } else {
            ids.iter()
                .position(|&i| i == self.eos_token_id as i64)
                .unwrap_or(0)
        }
    }

    /// Runs the tower; returns the final-normed hidden states `[P, L, D]` and the pooled rows
    /// `[P, D]`. With `only_needed`, positions after the last pooled row are not computed:
    /// under the causal mask they cannot change the pooled rows, so the result is the same.
    pub fn forward(
        &self,
        prompts: &[TokenizedPrompt],
        only_needed: bool,
        device: &Device,
    ) -> Result<(Tensor<3>, Tensor<2>)> {
        let n = prompts.len();
        let full = check_prompt_batch(prompts, self.vocab_size)?;
        if full > self.max_positions() {
            return Err(Error::Input(format!(
                "prompts are {full} tokens long, the model has {} positions",
                self.max_positions()
            )));
        }
        let pooled: Vec<usize> = prompts.iter().map(|p| self.pooled_index(&p.ids)).collect();
        let len = if only_needed {
            pooled.iter().max().copied().unwrap_or(0) + 1
        } else {
            full
        };
        let ids = prompt_ids(prompts, len, device);
        let positions = self
            .position_embedding
            .val()
            .narrow(0, 0, len)
            .unsqueeze_dim(0);
        let mut x = embedding(self.token_embedding.val(), ids) + positions;

        let mask = self
            .mask_padding
            .then(|| padding_mask(prompts, len, self.num_heads, device))
            .flatten();
        for layer in &self.layers {
            x = layer.forward_pre_norm(x, mask.clone(), true);
        }
        let x = self.final_layer_norm.forward(x);
        let d = x.dims()[2];
        let rows: Vec<i64> = pooled
            .iter()
            .enumerate()
            .map(|(b, &i)| (b * len + i) as i64)
            .collect();
        let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), device);
        let pooled = x.clone().reshape([n * len, d]).select(0, rows);
        Ok((x, pooled))
    }
}
