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
    LayerShape, NamedTensor, TransformerLayer, check_prompt_batch, export_norm, layer_norm, named,
    padding_mask, prompt_ids,
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
        })
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

        let mask = padding_mask(prompts, len, self.num_heads, device);
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
