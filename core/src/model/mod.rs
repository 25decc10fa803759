//! Model architectures, one per folder, behind one interface ([`Model`]): encode an image
//! once ([`Encoded`]), embed prompts ([`Conditioning`]), decode logits at model resolution.
//! Shared parts (ViT blocks, BERT, CLIP's text tower, attention, CLIPSeg's decoder) are
//! written once and reused.

pub mod bert;
pub mod biomedclipseg;
pub mod clip;
pub mod clipseg;
pub mod cris;
pub mod layers;

use burn::tensor::{Device, Tensor};

pub use biomedclipseg::BiomedClipSeg;
pub use clipseg::{ClipSeg, Decoder, DecoderConfig, DecoderTrace, ImageFeatures};
pub use cris::Cris;

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
    /// CRIS: CLIP RN50 + text transformer, FPN neck, vision-language decoder, projector.
    Cris,
}

impl Arch {
    pub const ALL: [Arch; 4] = [
        Arch::ClipSeg,
        Arch::BiomedClipSeg,
        Arch::BiomedClipSegD,
        Arch::Cris,
    ];

    /// The name used on the command line, in share links and in `config.json`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::ClipSeg => "clipseg",
            Arch::BiomedClipSeg => "biomedclipseg",
            Arch::BiomedClipSegD => "biomedclipseg-d",
            Arch::Cris => "cris",
        }
    }

    /// The study's name (tables, plots).
    pub fn display_name(self) -> &'static str {
        match self {
            Arch::ClipSeg => "CLIPSeg",
            Arch::BiomedClipSeg => "BiomedCLIPSeg",
            Arch::BiomedClipSegD => "BiomedCLIPSeg-D",
            Arch::Cris => "CRIS",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name) || a.display_name() == name)
    }

    /// The threshold on sigmoid(logit) the study uses for this model (its
    /// `configs/model/*.yaml`: 0.35 for CRIS, 0.5 otherwise).
    pub fn default_threshold(self) -> f32 {
        match self {
            Arch::Cris => 0.35,
            _ => 0.5,
        }
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

/// An image (or a batch of images) encoded once, ready for any number of prompts.
// A few per process, moved rarely: no boxing needed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Encoded {
    /// CLIPSeg's decoder input: the reduced vision taps.
    ClipSeg(ImageFeatures),
    /// CRIS's backbone output: C3, C4, C5.
    Cris(cris::ImageFeatures),
}

impl Encoded {
    /// Image `index` of a batch alone.
    pub fn image(&self, index: usize) -> Self {
        match self {
            Encoded::ClipSeg(f) => Encoded::ClipSeg(f.image(index)),
            Encoded::Cris(f) => Encoded::Cris(f.image(index)),
        }
    }

    /// The CLIPSeg decoder's input (CLIPSeg and BiomedCLIPSeg).
    pub fn clipseg(&self) -> Result<&ImageFeatures> {
        match self {
            Encoded::ClipSeg(f) => Ok(f),
            Encoded::Cris(_) => Err(Error::Input(
                "a CRIS encoding cannot be decoded by a CLIPSeg decoder".into(),
            )),
        }
    }
}

/// Prompts embedded once, for decoding on any number of images: one row per prompt.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Conditioning {
    /// The FiLM vectors `[P, D]` of a CLIPSeg decoder.
    Film(Tensor<2>),
    /// CRIS's word features, sentence states and ignored keys.
    Cris(cris::PromptFeatures),
}

impl Conditioning {
    pub fn len(&self) -> usize {
        match self {
            Conditioning::Film(t) => t.dims()[0],
            Conditioning::Cris(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prompts `start..start + n`.
    pub fn rows(&self, start: usize, n: usize) -> Self {
        match self {
            Conditioning::Film(t) => Conditioning::Film(t.clone().narrow(0, start, n)),
            Conditioning::Cris(p) => Conditioning::Cris(p.rows(start, n)),
        }
    }

    /// Concatenates prompt rows of one model (as cached per prompt).
    pub fn cat(parts: Vec<Self>) -> Result<Self> {
        let mixed = || Error::Input("prompt embeddings of different model families".into());
        match parts.first() {
            None | Some(Conditioning::Film(_)) => Ok(Conditioning::Film(Tensor::cat(
                parts
                    .into_iter()
                    .map(|p| match p {
                        Conditioning::Film(t) => Ok(t),
                        Conditioning::Cris(_) => Err(mixed()),
                    })
                    .collect::<Result<_>>()?,
                0,
            ))),
            Some(Conditioning::Cris(_)) => Ok(Conditioning::Cris(cris::PromptFeatures::cat(
                parts
                    .into_iter()
                    .map(|p| match p {
                        Conditioning::Cris(p) => Ok(p),
                        Conditioning::Film(_) => Err(mixed()),
                    })
                    .collect::<Result<_>>()?,
            ))),
        }
    }

    /// The FiLM vectors (CLIPSeg and BiomedCLIPSeg).
    pub fn film(&self) -> Result<&Tensor<2>> {
        match self {
            Conditioning::Film(t) => Ok(t),
            Conditioning::Cris(_) => Err(Error::Input(
                "CRIS prompts have no FiLM vector for a CLIPSeg decoder".into(),
            )),
        }
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
    Cris(Cris),
}

/// What families without a CLIPSeg decoder answer when asked for one.
fn no_clipseg_decoder() -> Error {
    Error::Input(
        "CRIS has no CLIPSeg decoder: decoder-only training and decoder swaps apply to \
         CLIPSeg and BiomedCLIPSeg"
            .into(),
    )
}

impl Model {
    /// Square input side in pixels.
    pub fn input_size(&self) -> usize {
        match self {
            Model::ClipSeg(m) => m.input_size(),
            Model::BiomedClipSeg(m) => m.input_size(),
            Model::Cris(m) => m.input_size(),
        }
    }

    /// Side of the decoder's token grid.
    pub fn grid(&self) -> usize {
        match self {
            Model::ClipSeg(m) => m.grid(),
            Model::BiomedClipSeg(m) => m.grid(),
            Model::Cris(m) => m.grid(),
        }
    }

    /// The vision states a CLIPSeg decoder reads, deepest first (what a frozen encoder
    /// contributes: decoder-only training caches these).
    pub fn vision_taps(&self, pixels: Tensor<4>) -> Result<Vec<Tensor<3>>> {
        match self {
            Model::ClipSeg(m) => m.vision_taps(pixels),
            Model::BiomedClipSeg(m) => m.vision_taps(pixels),
            Model::Cris(_) => Err(no_clipseg_decoder()),
        }
    }

    /// Runs the image side once: `[B, 3, S, S]` pixels → what the decoder reads.
    pub fn encode_image(&self, pixels: Tensor<4>) -> Result<Encoded> {
        match self {
            Model::Cris(m) => Ok(Encoded::Cris(m.encode_image(pixels)?)),
            _ => Ok(Encoded::ClipSeg(
                self.decoder()?.reduce(&self.vision_taps(pixels)?),
            )),
        }
    }

    /// Embeds tokenized prompts, one row each.
    pub fn embed_prompts(
        &self,
        prompts: &[TokenizedPrompt],
        device: &Device,
    ) -> Result<Conditioning> {
        Ok(match self {
            Model::ClipSeg(m) => Conditioning::Film(m.embed_prompts(prompts, device)?),
            Model::BiomedClipSeg(m) => Conditioning::Film(m.embed_prompts(prompts, device)?),
            Model::Cris(m) => Conditioning::Cris(m.embed_prompts(prompts, device)?),
        })
    }

    /// Logits `[P, S, S]`: one image with every prompt, or image `i` with prompt `i`.
    pub fn decode(&self, image: &Encoded, conditioning: &Conditioning) -> Result<Tensor<3>> {
        match (self, image, conditioning) {
            (Model::Cris(m), Encoded::Cris(f), Conditioning::Cris(p)) => m.decode(f, p),
            (Model::Cris(_), _, _) => Err(Error::Input(
                "CRIS decodes only its own image and prompt encodings".into(),
            )),
            _ => Ok(self
                .decode_traced(image.clipseg()?, conditioning.film()?.clone())?
                .logits),
        }
    }

    /// A CLIPSeg decoder's decode with its intermediates (CLIPSeg and BiomedCLIPSeg).
    pub fn decode_traced(
        &self,
        image: &ImageFeatures,
        conditioning: Tensor<2>,
    ) -> Result<DecoderTrace> {
        self.decoder()?
            .decode_traced(image, conditioning, self.grid())
    }

    /// The CLIPSeg decoder CLIPSeg and BiomedCLIPSeg end in.
    pub fn decoder(&self) -> Result<&Decoder> {
        match self {
            Model::ClipSeg(m) => Ok(&m.decoder),
            Model::BiomedClipSeg(m) => Ok(&m.decoder),
            Model::Cris(_) => Err(no_clipseg_decoder()),
        }
    }

    pub fn set_decoder(&mut self, decoder: Decoder) -> Result<()> {
        match self {
            Model::ClipSeg(m) => m.decoder = decoder,
            Model::BiomedClipSeg(m) => m.decoder = decoder,
            Model::Cris(_) => return Err(no_clipseg_decoder()),
        }
        Ok(())
    }

    /// The model with the linears of its attention and MLP blocks stored in bf16 (see
    /// [`crate::kernels::linears_to_bf16`]).
    pub fn with_bf16_linears(self) -> Self {
        use crate::kernels::linears_to_bf16;
        match self {
            Model::ClipSeg(m) => Model::ClipSeg(linears_to_bf16(m)),
            Model::BiomedClipSeg(m) => Model::BiomedClipSeg(linears_to_bf16(m)),
            Model::Cris(m) => Model::Cris(linears_to_bf16(m)),
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
            Model::Cris(_) => Err(Error::Input(
                "full fine-tuning of CRIS is not implemented yet (issue 14): vlsm runs CRIS \
                 checkpoints trained by medvlsm"
                    .into(),
            )),
        }
    }
}
