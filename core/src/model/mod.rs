//! Model architectures, one per folder, behind one interface ([`Model`]): encode an image
//! once, embed prompts, decode logits at model resolution. Shared parts (ViT blocks, BERT,
//! CLIP's text tower, CLIPSeg's decoder) are written once and reused.

pub mod bert;
pub mod biomedclipseg;
pub mod clip;
pub mod clipseg;
pub mod cris;
pub mod layers;

use burn::tensor::{Device, Tensor};

pub use biomedclipseg::BiomedClipSeg;
pub use clipseg::{ClipSeg, Decoder, DecoderConfig, DecoderTrace, ImageFeatures};

use crate::error::{Error, Result};
use crate::tokenize::TokenizedPrompt;

/// The model families vlsm runs, as the study names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// transformers' CLIPSeg (CIDAS checkpoints and fine-tunes of them).
    ClipSeg,
    /// BiomedCLIP towers + a CLIPSeg decoder trained by the user.
    BiomedClipSeg,
    /// BiomedCLIP towers + CIDAS/clipseg-rd64-refined's decoder.
    BiomedClipSegD,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::ClipSeg, Arch::BiomedClipSeg, Arch::BiomedClipSegD];

    /// The name used on the command line, in share links and in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::ClipSeg => "clipseg",
            Arch::BiomedClipSeg => "biomedclipseg",
            Arch::BiomedClipSegD => "biomedclipseg-d",
        }
    }

    /// The study's name (tables, plots).
    pub fn display_name(self) -> &'static str {
        match self {
            Arch::ClipSeg => "CLIPSeg",
            Arch::BiomedClipSeg => "BiomedCLIPSeg",
            Arch::BiomedClipSegD => "BiomedCLIPSeg-D",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name) || a.display_name() == name)
    }

    /// The threshold on sigmoid(logit) the study uses for this model.
    pub fn default_threshold(self) -> f32 {
        0.5
    }

    pub fn is_biomedclip(self) -> bool {
        matches!(self, Arch::BiomedClipSeg | Arch::BiomedClipSegD)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A loaded model of any family. Every shell (CLI, bench, train, share, the page) calls
/// these methods; the family is matched here and nowhere else.
// A process holds one or a few models and rarely moves them: no boxing needed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Model {
    ClipSeg(ClipSeg),
    BiomedClipSeg(BiomedClipSeg),
}

impl Model {
    /// Square input side in pixels.
    pub fn input_size(&self) -> usize {
        match self {
            Model::ClipSeg(m) => m.input_size(),
            Model::BiomedClipSeg(m) => m.input_size(),
        }
    }

    /// Side of the decoder's token grid.
    pub fn grid(&self) -> usize {
        match self {
            Model::ClipSeg(m) => m.grid(),
            Model::BiomedClipSeg(m) => m.grid(),
        }
    }

    /// The vision states the decoder reads, deepest first (what a frozen encoder
    /// contributes: training caches these).
    pub fn vision_taps(&self, pixels: Tensor<4>) -> Result<Vec<Tensor<3>>> {
        match self {
            Model::ClipSeg(m) => m.vision_taps(pixels),
            Model::BiomedClipSeg(m) => m.vision_taps(pixels),
        }
    }

    /// Runs the image side once: `[B, 3, S, S]` pixels → the decoder's reduced taps.
    pub fn encode_image(&self, pixels: Tensor<4>) -> Result<ImageFeatures> {
        Ok(self.decoder().reduce(&self.vision_taps(pixels)?))
    }

    /// The FiLM conditioning vectors `[P, D]` of tokenized prompts.
    pub fn embed_prompts(&self, prompts: &[TokenizedPrompt], device: &Device) -> Result<Tensor<2>> {
        match self {
            Model::ClipSeg(m) => m.embed_prompts(prompts, device),
            Model::BiomedClipSeg(m) => m.embed_prompts(prompts, device),
        }
    }

    /// Logits `[P, S, S]`: one image with every prompt, or image `i` with prompt `i`.
    pub fn decode(&self, image: &ImageFeatures, conditioning: Tensor<2>) -> Result<Tensor<3>> {
        Ok(self.decode_traced(image, conditioning)?.logits)
    }

    pub fn decode_traced(
        &self,
        image: &ImageFeatures,
        conditioning: Tensor<2>,
    ) -> Result<DecoderTrace> {
        self.decoder()
            .decode_traced(image, conditioning, self.grid())
    }

    /// The CLIPSeg decoder every family ends in.
    pub fn decoder(&self) -> &Decoder {
        match self {
            Model::ClipSeg(m) => &m.decoder,
            Model::BiomedClipSeg(m) => &m.decoder,
        }
    }

    pub fn set_decoder(&mut self, decoder: Decoder) {
        match self {
            Model::ClipSeg(m) => m.decoder = decoder,
            Model::BiomedClipSeg(m) => m.decoder = decoder,
        }
    }

    /// The whole CLIPSeg model, for what only CLIPSeg supports (full fine-tuning).
    pub fn clipseg(&self) -> Result<&ClipSeg> {
        match self {
            Model::ClipSeg(m) => Ok(m),
            Model::BiomedClipSeg(_) => Err(Error::Input(
                "full fine-tuning is implemented for CLIPSeg only; BiomedCLIPSeg trains its \
                 decoder on frozen towers, as in the study"
                    .into(),
            )),
        }
    }
}
