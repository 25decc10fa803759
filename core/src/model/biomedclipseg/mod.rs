//! BiomedCLIPSeg and BiomedCLIPSeg-D (medvlsm's `BiomedCLIPSeg`): BiomedCLIP's towers — a
//! timm ViT-B/16 and PubMedBERT with an MLP projection — under CLIPSeg's decoder. The two
//! differ only in where the decoder comes from: trained by the user (BiomedCLIPSeg; the
//! study starts it random), or CIDAS/clipseg-rd64-refined's (`-D`).
//!
//! Quirks copied from the study's code: the decoder taps block outputs 4, 7 and 10 (medvlsm
//! indexes a list of block outputs with `[i + 1]` for `extract_layers` [3, 6, 9]); the text
//! vector is BERT's CLS row of the last hidden state (no pooler) through Linear → GELU →
//! Linear without biases; every token has token type 0.

pub mod config;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, activation};

pub use config::{BiomedClipSegConfig, OpenClipConfig, TimmVitConfig};

use crate::error::Result;
use crate::model::bert::Bert;
use crate::model::clip::VisionTransformer;
use crate::model::clipseg::Decoder;
use crate::model::layers::linear;
use crate::tokenize::TokenizedPrompt;
use crate::weights::Weights;

#[derive(Module, Debug)]
pub struct BiomedClipSeg {
    pub vision: VisionTransformer,
    pub text: Bert,
    /// `text.proj.0`: BERT width → (width + embed_dim) / 2, no bias.
    pub text_proj_in: Linear,
    /// `text.proj.2`: → embed_dim, no bias (after an exact GELU).
    pub text_proj_out: Linear,
    pub decoder: Decoder,
    /// The decoder config's `extract_layers`; block output `i + 1` is tapped for each.
    pub extract_layers: Vec<usize>,
}

/// Where each part's tensors are: the towers under `{towers_prefix}visual.trunk.` and
/// `{towers_prefix}text.`, the decoder under `{decoder_prefix}.`.
pub struct BiomedWeights<'w, 'a> {
    pub towers: &'w Weights<'a>,
    pub towers_prefix: &'w str,
    pub decoder: &'w Weights<'a>,
    pub decoder_prefix: &'w str,
}

impl BiomedClipSeg {
    pub fn load(cfg: &BiomedClipSegConfig, w: &BiomedWeights, device: &Device) -> Result<Self> {
        let tp = w.towers_prefix;
        let bert_width = cfg.bert.hidden_size;
        let embed = cfg.open_clip.model_cfg.embed_dim;
        let hidden = (bert_width + embed) / 2;
        Ok(Self {
            vision: VisionTransformer::load_timm(
                w.towers,
                &format!("{tp}visual.trunk"),
                &cfg.vit,
                Self::blocks_used(cfg),
                device,
            )?,
            text: Bert::load(
                w.towers,
                &format!("{tp}text.transformer"),
                &cfg.bert,
                device,
            )?,
            text_proj_in: linear(
                w.towers,
                &format!("{tp}text.proj.0"),
                bert_width,
                hidden,
                false,
                device,
            )?,
            text_proj_out: linear(
                w.towers,
                &format!("{tp}text.proj.2"),
                hidden,
                embed,
                false,
                device,
            )?,
            decoder: Decoder::load(w.decoder, w.decoder_prefix, &cfg.decoder, device)?,
            extract_layers: cfg.decoder.extract_layers.clone(),
        })
    }

    /// The ViT blocks the mask depends on: up to block output `max(extract_layers) + 1`.
    pub fn blocks_used(cfg: &BiomedClipSegConfig) -> usize {
        cfg.decoder
            .extract_layers
            .iter()
            .max()
            .map_or(0, |&l| l + 2)
    }

    /// Whether a tower key is one the mask never reads (open_clip's image head and final
    /// norm, the logit scale, blocks after the deepest tap, BERT's position-id buffer).
    pub fn unused_tower_key(cfg: &BiomedClipSegConfig, key: &str) -> bool {
        let used = Self::blocks_used(cfg);
        key == "logit_scale"
            || key.ends_with("position_ids")
            || key.starts_with("visual.head.")
            || key.starts_with("visual.trunk.norm.")
            || key.starts_with("visual.trunk.fc_norm.")
            || key
                .strip_prefix("visual.trunk.blocks.")
                .and_then(|rest| rest.split('.').next()?.parse::<usize>().ok())
                .is_some_and(|block| block >= used && block < cfg.vit.depth)
    }

    pub fn input_size(&self) -> usize {
        self.vision.input_size
    }

    pub fn grid(&self) -> usize {
        self.input_size() / self.vision.patch_size
    }

    /// The tapped block outputs, deepest first, each `[B, 1 + g², D]`.
    pub fn vision_taps(&self, pixels: Tensor<4>) -> Result<Vec<Tensor<3>>> {
        // Block output i + 1 is hidden state i + 2 (state 0 is the embedding).
        let wanted: Vec<usize> = self.extract_layers.iter().map(|&i| i + 2).collect();
        self.vision.states_deepest_first(pixels, &wanted)
    }

    /// BERT's CLS row of the last hidden state, `[P, width]` (the pooled text feature).
    pub fn pooled_text(&self, prompts: &[TokenizedPrompt], device: &Device) -> Result<Tensor<2>> {
        let hidden = self.text.forward(prompts, device)?;
        let [n, _, d] = hidden.dims();
        Ok(hidden.narrow(1, 0, 1).reshape([n, d]))
    }

    /// The FiLM conditioning vectors `[P, embed_dim]`.
    pub fn embed_prompts(&self, prompts: &[TokenizedPrompt], device: &Device) -> Result<Tensor<2>> {
        let pooled = self.pooled_text(prompts, device)?;
        Ok(self
            .text_proj_out
            .forward(activation::gelu(self.text_proj_in.forward(pooled))))
    }
}
