//! CLIPSeg (Lüddecke & Ecker, CVPR 2022) as transformers' `CLIPSegForImageSegmentation`:
//! frozen CLIP towers, and a small decoder that reads three vision block outputs, is
//! conditioned on the projected text embedding by FiLM, and paints logits with transposed
//! convolutions. Keys: `clip.*` and `decoder.*`.
//!
//! The image side does not depend on the prompt, so it is split off: [`ClipSeg::encode_image`]
//! runs the vision tower once (and the decoder's per-tap `reduces`, which are prompt-free
//! too), then [`ClipSeg::decode`] handles any number of prompts.

pub mod decoder;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};

pub use decoder::{Decoder, DecoderConfig, DecoderHead, DecoderTrace, ImageFeatures};

use crate::config::ClipSegConfig;
use crate::error::{Error, Result};
use crate::model::clip::{TextTransformer, VisionTransformer};
use crate::model::layers::{NamedTensor, export_linear, linear};
use crate::tokenize::TokenizedPrompt;
use crate::weights::Weights;

/// `CLIPSegForImageSegmentation`, minus what segmentation never uses (the vision pooler and
/// projection, vision blocks past the deepest tap).
#[derive(Module, Debug)]
pub struct ClipSeg {
    pub vision: VisionTransformer,
    pub text: TextTransformer,
    pub text_projection: Linear,
    pub decoder: Decoder,
    /// Which of the vision hidden states (`hidden_states[i + 1]`) feed the decoder.
    pub extract_layers: Vec<usize>,
}

impl ClipSeg {
    /// Builds the model from checkpoint tensors for `input_size`×`input_size` images, and
    /// checks that the checkpoint holds nothing the config does not explain.
    pub fn load(
        cfg: &ClipSegConfig,
        w: &Weights,
        input_size: usize,
        device: &Device,
    ) -> Result<Self> {
        let used = cfg.vision_layers_used();
        let model = Self {
            vision: VisionTransformer::load(
                w,
                "clip.vision_model",
                &cfg.vision_config,
                used,
                input_size,
                device,
            )?,
            text: TextTransformer::load(w, "clip.text_model", &cfg.text_config, device)?,
            text_projection: linear(
                w,
                "clip.text_projection",
                cfg.text_config.hidden_size,
                cfg.projection_dim,
                false,
                device,
            )?,
            decoder: Decoder::load(w, "decoder", &DecoderConfig::of(cfg), device)?,
            extract_layers: cfg.extract_layers.clone(),
        };
        let vision_layers = cfg.vision_config.num_hidden_layers;
        w.check_unused(|key| {
            // Parts of a CLIP checkpoint that segmentation does not use.
            key.ends_with("position_ids")
                || key == "clip.logit_scale"
                || key.starts_with("clip.visual_projection.")
                || key.starts_with("clip.vision_model.post_layernorm.")
                || key
                    .strip_prefix("clip.vision_model.encoder.layers.")
                    .and_then(|rest| rest.split('.').next()?.parse::<usize>().ok())
                    .is_some_and(|layer| layer >= used && layer < vision_layers)
        })?;
        Ok(model)
    }

    /// Every tensor the model holds, under Hugging Face names and layouts, except the
    /// vision position table (resampled for the input size at load, so not the checkpoint's;
    /// full fine-tuning keeps it frozen).
    pub fn export(&self) -> Result<Vec<NamedTensor>> {
        let mut out = self.vision.export("clip.vision_model")?;
        out.extend(self.text.export("clip.text_model")?);
        export_linear(&mut out, "clip.text_projection", &self.text_projection)?;
        out.extend(self.decoder.export()?);
        Ok(out)
    }

    pub fn input_size(&self) -> usize {
        self.vision.input_size
    }

    /// Runs the vision tower on `[B, 3, S, S]` pixels and reduces the tapped states.
    pub fn encode_image(&self, pixels: Tensor<4>) -> Result<ImageFeatures> {
        Ok(self.decoder.reduce(&self.vision_taps(pixels)?))
    }

    /// The vision hidden states the decoder reads, deepest first, each `[B, 1 + g², H]`:
    /// what the frozen encoder contributes (training caches these).
    pub fn vision_taps(&self, pixels: Tensor<4>) -> Result<Vec<Tensor<3>>> {
        let wanted: Vec<usize> = self.extract_layers.iter().map(|&i| i + 1).collect();
        self.vision.states_deepest_first(pixels, &wanted)
    }

    /// Side of the decoder's token grid.
    pub fn grid(&self) -> usize {
        self.input_size() / self.vision.patch_size
    }

    /// The FiLM conditioning vectors `[P, projection_dim]` for tokenized prompts.
    pub fn embed_prompts(&self, prompts: &[TokenizedPrompt], device: &Device) -> Result<Tensor<2>> {
        let (_, pooled) = self.text.forward(prompts, true, device)?;
        Ok(self.text_projection.forward(pooled))
    }

    /// Logits `[P, S, S]` for one image (batch 1: every prompt on it) or a batch of P images
    /// paired with P conditioning vectors.
    pub fn decode(&self, image: &ImageFeatures, conditioning: Tensor<2>) -> Result<Tensor<3>> {
        Ok(self.decode_traced(image, conditioning)?.logits)
    }

    pub fn decode_traced(
        &self,
        image: &ImageFeatures,
        conditioning: Tensor<2>,
    ) -> Result<DecoderTrace> {
        self.decoder.decode_traced(image, conditioning, self.grid())
    }

    /// transformers' forward: image `i` with prompt `i`, `[B, 3, S, S]` → `[B, S, S]`.
    pub fn forward(
        &self,
        pixels: Tensor<4>,
        prompts: &[TokenizedPrompt],
        device: &Device,
    ) -> Result<Tensor<3>> {
        let b = pixels.dims()[0];
        if b != prompts.len() {
            return Err(Error::Input(format!(
                "{b} images but {} prompts",
                prompts.len()
            )));
        }
        let image = self.encode_image(pixels)?;
        self.decode(&image, self.embed_prompts(prompts, device)?)
    }
}

/// Pixel values `[B, 3, S, S]` on `device` from per-image `[3, S, S]` buffers.
pub fn pixels_tensor(images: &[Vec<f32>], size: usize, device: &Device) -> Tensor<4> {
    let data: Vec<f32> = images.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(data, [images.len(), 3, size, size]), device)
}
