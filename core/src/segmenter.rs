//! The high-level API: load a Hugging Face CLIPSeg directory (from a path or from bytes),
//! encode an image once, decode any number of prompts, get masks at the image's size.

use burn::tensor::{Device, Tensor};
use image::RgbImage;

use crate::config::{ClipSegConfig, PreprocessConfig};
use crate::error::{Error, Result};
use crate::model::biomedclipseg::{BiomedClipSegConfig, BiomedWeights};
use crate::model::clipseg::{ClipSeg, DecoderConfig, pixels_tensor};
use crate::model::cris::CrisConfig;
use crate::model::{Arch, BiomedClipSeg, Conditioning, Cris, Encoded, Model};
use crate::preprocess;
use crate::tokenize::{PromptTokenizer, TokenizedPrompt, TokenizerSettings};
use crate::weights::Weights;

/// The files of a model folder, as bytes: a Hugging Face CLIPSeg checkpoint, or vlsm's
/// BiomedCLIPSeg folder (`config.json` with `"model_type": "biomedclipseg"`, `vocab.txt`).
#[derive(Default, Clone, Copy)]
pub struct ModelFiles<'a> {
    pub config_json: &'a [u8],
    /// `model.safetensors` (f32, f16 or bf16).
    pub safetensors: &'a [u8],
    pub preprocessor_config_json: Option<&'a [u8]>,
    pub tokenizer_json: Option<&'a [u8]>,
    pub vocab_json: Option<&'a [u8]>,
    /// BERT's `vocab.txt` (BiomedCLIPSeg).
    pub vocab_txt: Option<&'a [u8]>,
    pub merges_txt: Option<&'a [u8]>,
    pub tokenizer_config_json: Option<&'a [u8]>,
    pub special_tokens_map_json: Option<&'a [u8]>,
}

/// A model's configuration, by family.
#[allow(clippy::large_enum_variant)] // one per loaded model
#[derive(Debug, Clone)]
pub enum ModelConfig {
    ClipSeg(ClipSegConfig),
    BiomedClipSeg(BiomedClipSegConfig),
    Cris(CrisConfig),
}

impl ModelConfig {
    pub fn arch(&self) -> Arch {
        match self {
            ModelConfig::ClipSeg(_) => Arch::ClipSeg,
            ModelConfig::BiomedClipSeg(c) => c.arch,
            ModelConfig::Cris(_) => Arch::Cris,
        }
    }

    /// The CLIPSeg decoder's sizes (CLIPSeg and BiomedCLIPSeg; `None` for CRIS).
    pub fn decoder(&self) -> Option<DecoderConfig> {
        match self {
            ModelConfig::ClipSeg(c) => Some(DecoderConfig::of(c)),
            ModelConfig::BiomedClipSeg(c) => Some(c.decoder.clone()),
            ModelConfig::Cris(_) => None,
        }
    }

    /// The family `config.json` declares (`model_type`; CLIPSeg when absent).
    pub fn arch_of_json(json: &[u8]) -> Result<Arch> {
        let v: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| Error::Config(format!("config.json: not valid JSON ({e})")))?;
        match v.get("model_type").and_then(serde_json::Value::as_str) {
            None => Ok(Arch::ClipSeg),
            Some(name) => Arch::from_name(name).ok_or_else(|| {
                Error::Config(format!(
                    "config.json: model_type `{name}` is not a model vlsm runs ({})",
                    Arch::ALL.map(Arch::name).join(", ")
                ))
            }),
        }
    }
}

/// Everything besides the weights: config, preprocessing, tokenizer.
#[derive(Clone)]
pub struct Pipeline {
    pub config: ModelConfig,
    pub preprocess: PreprocessConfig,
    pub tokenizer: PromptTokenizer,
}

impl Pipeline {
    pub fn from_files(files: &ModelFiles) -> Result<Self> {
        match ModelConfig::arch_of_json(files.config_json)? {
            Arch::ClipSeg => Self::clipseg(files),
            Arch::Cris => Self::cris(CrisConfig::from_json(files.config_json)?, files),
            _ => {
                let config = BiomedClipSegConfig::from_vlsm_json(files.config_json)?;
                let vocab = files.vocab_txt.ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "{} needs BERT's vocab.txt beside its config.json",
                        config.arch.display_name()
                    ))
                })?;
                Self::biomedclipseg(config, vocab, files.tokenizer_config_json)
            }
        }
    }

    /// BiomedCLIPSeg's pipeline: BERT WordPiece from `vocab.txt` (`do_lower_case` from
    /// `tokenizer_config.json`, default true), plain bilinear resize to the ViT's size, CLIP
    /// mean/std, as medvlsm's experiment configs.
    pub fn biomedclipseg(
        config: BiomedClipSegConfig,
        vocab_txt: &[u8],
        tokenizer_config_json: Option<&[u8]>,
    ) -> Result<Self> {
        let lowercase = match tokenizer_config_json {
            None => true,
            Some(json) => {
                let v: serde_json::Value = serde_json::from_slice(json)
                    .map_err(|e| Error::Tokenizer(format!("tokenizer_config.json: {e}")))?;
                v.get("do_lower_case")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(true)
            }
        };
        let tokenizer =
            PromptTokenizer::from_bert_vocab(vocab_txt, lowercase, config.context_length())?;
        let preprocess = PreprocessConfig {
            size: config.vit.img_size,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: crate::config::CLIP_MEAN,
            image_std: crate::config::CLIP_STD,
        };
        Ok(Self {
            config: ModelConfig::BiomedClipSeg(config),
            preprocess,
            tokenizer,
        })
    }

    /// CRIS's pipeline: CLIP's BPE padded with EOT to `word_len`, plain bilinear resize to
    /// `img_size`, CLIP mean/std (medvlsm's `configs/experiment/cris.yaml`).
    pub fn cris(config: CrisConfig, files: &ModelFiles) -> Result<Self> {
        let tokenizer = clip_tokenizer(files, config.word_len, "CRIS")?;
        let preprocess = PreprocessConfig {
            size: config.img_size,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: crate::config::CLIP_MEAN,
            image_std: crate::config::CLIP_STD,
        };
        Ok(Self {
            config: ModelConfig::Cris(config),
            preprocess,
            tokenizer,
        })
    }

    fn clipseg(files: &ModelFiles) -> Result<Self> {
        let config = ClipSegConfig::from_json(files.config_json)?;
        let preprocess = match files.preprocessor_config_json {
            Some(json) => PreprocessConfig::from_json(json, &config.vision_config)?,
            None => PreprocessConfig::default_for(&config.vision_config),
        };
        let tokenizer =
            clip_tokenizer(files, config.text_config.max_position_embeddings, "CLIPSeg")?;
        Ok(Self {
            config: ModelConfig::ClipSeg(config),
            preprocess,
            tokenizer,
        })
    }

    pub fn arch(&self) -> Arch {
        self.config.arch()
    }
}

/// CLIP's BPE tokenizer from a folder's files (`tokenizer.json`, or `vocab.json` +
/// `merges.txt`), padded to `max_len`.
fn clip_tokenizer(files: &ModelFiles, max_len: usize, family: &str) -> Result<PromptTokenizer> {
    let mut settings = TokenizerSettings::default();
    if let Some(json) = files.special_tokens_map_json {
        settings.merge_json(json, "special_tokens_map.json")?;
    }
    if let Some(json) = files.tokenizer_config_json {
        settings.merge_json(json, "tokenizer_config.json")?;
    }
    let tokenizer = match (files.tokenizer_json, files.vocab_json, files.merges_txt) {
        (Some(json), _, _) => PromptTokenizer::from_tokenizer_json(json, &settings, max_len)
            .map_err(|e| Error::Tokenizer(format!("{family} needs CLIP's BPE tokenizer: {e}")))?,
        (None, Some(vocab), Some(merges)) => {
            PromptTokenizer::from_vocab_merges(vocab, merges, &settings, max_len)?
        }
        _ if files.vocab_txt.is_some() => {
            return Err(Error::Tokenizer(format!(
                "vocab.txt is a BERT WordPiece vocabulary, but config.json is {family}'s, \
                     which needs CLIP's BPE (tokenizer.json, or vocab.json and merges.txt)"
            )));
        }
        _ => {
            return Err(Error::Tokenizer(
                "no tokenizer files: need tokenizer.json, or vocab.json and merges.txt".into(),
            ));
        }
    };
    Ok(tokenizer)
}

/// An image encoded once, ready for any number of prompts.
#[derive(Debug, Clone)]
pub struct EncodedImage {
    pub features: Encoded,
    /// The original image's width and height.
    pub width: u32,
    pub height: u32,
}

/// Raw logits of one prompt at model resolution (`size`×`size`, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub size: usize,
    pub values: Vec<f32>,
}

impl Logits {
    /// `sigmoid(logit) > threshold` at model resolution, 1 = foreground.
    pub fn mask(&self, threshold: f32) -> Vec<u8> {
        self.values
            .iter()
            .map(|&l| u8::from(1.0 / (1.0 + (-l).exp()) > threshold))
            .collect()
    }

    /// The binary mask at `width`×`height` (nearest-neighbour, as medvlsm resizes masks).
    pub fn mask_at(&self, threshold: f32, width: u32, height: u32) -> Vec<u8> {
        preprocess::resize_nearest(
            &self.mask(threshold),
            self.size,
            self.size,
            width as usize,
            height as usize,
        )
    }
}

/// How the linears of a model's transformer blocks compute at inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 throughout (the default: masks stable bit for bit, as the parity tests check).
    #[default]
    F32,
    /// Weights stored in bf16 and activations rounded to bf16 at each such linear, products
    /// summed in f32 (CPU with AVX-512 BF16 only); everything else stays f32.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("precision `{s}`: expected f32 or bf16")),
        }
    }
}

/// Why a model of `arch` cannot run in `precision` on `device`, if it cannot: bf16 needs the
/// CPU (flex) device and a processor with AVX-512 BF16, and CRIS stays f32.
pub fn precision_problem(arch: Arch, device: &Device, precision: Precision) -> Option<String> {
    if precision == Precision::F32 {
        return None;
    }
    if arch == Arch::Cris {
        // Most of CRIS's time is its ResNet's convolutions, which have no bf16 kernel, and
        // bf16 in its transformer layers moved the fixture's logits by 6 % of their range
        // (CLIPSeg's: under 1 %).
        return Some("CRIS runs in f32 (its convolutions have no bf16 kernel)".into());
    }
    let on_flex = Tensor::<1>::zeros([1], device)
        .try_into_primitive::<burn_flex::Flex>()
        .is_ok();
    if !on_flex || device.is_autodiff() {
        Some(BF16_CPU_ONLY.into())
    } else {
        cpu_precision_problem(precision)
    }
}

/// Why bf16 cannot run on another backend than the CPU's.
pub const BF16_CPU_ONLY: &str = "bf16 linears run on the CPU backend only";

/// Why this processor cannot run `precision` on the CPU backend, if it cannot.
pub fn cpu_precision_problem(precision: Precision) -> Option<String> {
    (precision == Precision::Bf16 && !crate::gemm_bf16::available())
        .then(|| "this CPU has no AVX-512 BF16 instructions (vdpbf16ps) for bf16 linears".into())
}

/// A loaded model with its tokenizer and preprocessing, on one device.
pub struct Segmenter {
    pub model: Model,
    pub pipeline: Pipeline,
    pub device: Device,
}

impl Segmenter {
    /// Loads from in-memory files (what the browser has).
    pub fn from_files(files: &ModelFiles, device: &Device) -> Result<Self> {
        let pipeline = Pipeline::from_files(files)?;
        let weights = Weights::from_safetensors(files.safetensors, "model.safetensors")?;
        Self::from_weights(pipeline, &weights, device)
    }

    /// Builds the model from one checkpoint holding all of it: a CLIPSeg checkpoint, or
    /// vlsm's BiomedCLIPSeg folder (towers under the hub's keys, decoder under `decoder.`).
    pub fn from_weights(pipeline: Pipeline, weights: &Weights, device: &Device) -> Result<Self> {
        let model = match &pipeline.config {
            ModelConfig::ClipSeg(cfg) => Model::ClipSeg(ClipSeg::load(
                cfg,
                weights,
                pipeline.preprocess.size,
                device,
            )?),
            ModelConfig::BiomedClipSeg(cfg) => {
                let model = BiomedClipSeg::load(
                    cfg,
                    &BiomedWeights {
                        towers: weights,
                        towers_prefix: "",
                        decoder: weights,
                        decoder_prefix: "decoder",
                    },
                    device,
                )?;
                weights.check_unused(|key| BiomedClipSeg::unused_tower_key(cfg, key))?;
                Model::BiomedClipSeg(model)
            }
            ModelConfig::Cris(cfg) => {
                let model = Cris::load(weights, cfg, device)?;
                let prefix = Cris::prefix_of(weights);
                weights.check_unused(|key| Cris::unused_key(prefix, key))?;
                Model::Cris(model)
            }
        };
        Ok(Self::new(model, pipeline, device))
    }

    pub fn new(model: Model, pipeline: Pipeline, device: &Device) -> Self {
        Self {
            model,
            pipeline,
            device: device.clone(),
        }
    }

    /// Loads a model directory: a Hugging Face CLIPSeg checkpoint (`config.json`,
    /// `model.safetensors` or `pytorch_model.bin`, tokenizer files, optional
    /// `preprocessor_config.json`) or vlsm's BiomedCLIPSeg folder.
    #[cfg(feature = "std")]
    pub fn from_dir(dir: &std::path::Path, device: &Device) -> Result<Self> {
        Self::from_dir_in(dir, device, Precision::F32)
    }

    /// As [`Self::from_dir`], with the transformer layers' linears stored in `precision` as
    /// they load (so bf16 never holds the f32 weights whole); where `precision` cannot run
    /// ([`precision_problem`]) the model loads in f32.
    #[cfg(feature = "std")]
    pub fn from_dir_in(
        dir: &std::path::Path,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let dir_files = crate::files::DirFiles::read(dir)?;
        let pipeline = Pipeline::from_files(&dir_files.model_files())?;
        let mut weights = dir_files.weights()?;
        weights.set_bf16_block_linears(
            precision == Precision::Bf16
                && precision_problem(pipeline.arch(), device, precision).is_none(),
        );
        Self::from_weights(pipeline, &weights, device)
    }

    pub fn arch(&self) -> Arch {
        self.pipeline.arch()
    }

    /// Why `precision` cannot run here, if it cannot (see [`precision_problem`]).
    pub fn precision_unavailable(&self, precision: Precision) -> Option<String> {
        precision_problem(self.arch(), &self.device, precision)
    }

    /// The segmenter with the linears of its attention and MLP blocks in `precision` (one
    /// way: from f32 to bf16); an error where it cannot run (see
    /// [`Self::precision_unavailable`]). Each f32 weight is freed as soon as its bf16 copy
    /// is made, so memory never holds both whole models.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self> {
        if let Some(why) = self.precision_unavailable(precision) {
            return Err(Error::Input(format!(
                "precision {}: {why}",
                precision.name()
            )));
        }
        if precision == Precision::Bf16 {
            self.model = self.model.with_bf16_linears();
        }
        Ok(self)
    }

    /// The study's threshold for this model.
    pub fn default_threshold(&self) -> f32 {
        self.arch().default_threshold()
    }

    pub fn input_size(&self) -> usize {
        self.model.input_size()
    }

    pub fn tokenize(&self, prompts: &[&str]) -> Result<Vec<TokenizedPrompt>> {
        prompts
            .iter()
            .map(|p| self.pipeline.tokenizer.encode(p))
            .collect()
    }

    /// Preprocesses and encodes a batch of images (one vision pass for all of them).
    pub fn encode_images(&self, images: &[&RgbImage]) -> Result<Vec<EncodedImage>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let pixels = images
            .iter()
            .map(|img| preprocess::pixel_values(img, &self.pipeline.preprocess))
            .collect::<Result<Vec<_>>>()?;
        let features =
            self.model
                .encode_image(pixels_tensor(&pixels, self.input_size(), &self.device))?;
        Ok(images
            .iter()
            .enumerate()
            .map(|(i, img)| EncodedImage {
                features: if images.len() == 1 {
                    features.clone()
                } else {
                    features.image(i)
                },
                width: img.width(),
                height: img.height(),
            })
            .collect())
    }

    pub fn encode_image(&self, image: &RgbImage) -> Result<EncodedImage> {
        Ok(self.encode_images(&[image])?.remove(0))
    }

    /// Tokenizes and embeds prompts once, for decoding on any number of images.
    pub fn embed_prompts(&self, prompts: &[&str]) -> Result<EmbeddedPrompts> {
        let tokens = self.tokenize(prompts)?;
        let conditioning = self.model.embed_prompts(&tokens, &self.device)?;
        Ok(EmbeddedPrompts {
            tokens,
            conditioning,
        })
    }

    /// Logits `[P, S, S]` for embedded prompts on one encoded image, as a tensor on the device.
    pub fn decode_tensor(
        &self,
        image: &EncodedImage,
        prompts: &EmbeddedPrompts,
    ) -> Result<Tensor<3>> {
        self.model.decode(&image.features, &prompts.conditioning)
    }

    /// Logits for embedded prompts on one encoded image, read back to the host.
    /// Synchronous readback: native backends only (in the browser use
    /// [`Self::decode_embedded_async`]).
    pub fn decode_embedded(
        &self,
        image: &EncodedImage,
        prompts: &EmbeddedPrompts,
    ) -> Result<Vec<Logits>> {
        self.decode_conditioning(image, &prompts.conditioning)
    }

    /// Logits for embedded prompt rows (of [`EmbeddedPrompts::conditioning`], possibly
    /// gathered from a cache) on one encoded image.
    pub fn decode_conditioning(
        &self,
        image: &EncodedImage,
        conditioning: &Conditioning,
    ) -> Result<Vec<Logits>> {
        let logits = self.model.decode(&image.features, conditioning)?;
        let dims = logits.dims();
        let data = logits
            .try_into_data()
            .map_err(|e| Error::Input(format!("reading logits from the device: {e:?}")))?;
        split_logits(data, dims)
    }

    /// As [`Self::decode_embedded`], reading the logits back asynchronously (WebGPU in the
    /// browser cannot read synchronously).
    pub async fn decode_embedded_async(
        &self,
        image: &EncodedImage,
        prompts: &EmbeddedPrompts,
    ) -> Result<Vec<Logits>> {
        let logits = self.decode_tensor(image, prompts)?;
        let dims = logits.dims();
        let data = logits
            .into_data_async()
            .await
            .map_err(|e| Error::Input(format!("reading logits from the device: {e:?}")))?;
        split_logits(data, dims)
    }

    /// Logits for every prompt on one encoded image (embeds the prompts, then decodes).
    pub fn decode(&self, image: &EncodedImage, prompts: &[&str]) -> Result<Vec<Logits>> {
        self.decode_embedded(image, &self.embed_prompts(prompts)?)
    }
}

fn split_logits(data: burn::tensor::TensorData, [p, s, _]: [usize; 3]) -> Result<Vec<Logits>> {
    let values = data
        .try_into_vec::<f32>()
        .map_err(|e| Error::Input(format!("reading logits: {e:?}")))?;
    Ok(values
        .chunks_exact(s * s)
        .take(p)
        .map(|c| Logits {
            size: s,
            values: c.to_vec(),
        })
        .collect())
}

/// Prompts ready for decoding: their tokens and embeddings (one row per prompt).
#[derive(Debug, Clone)]
pub struct EmbeddedPrompts {
    pub tokens: Vec<TokenizedPrompt>,
    pub conditioning: Conditioning,
}
