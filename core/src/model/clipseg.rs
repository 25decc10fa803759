//! CLIPSeg (Lüddecke & Ecker, CVPR 2022) as transformers' `CLIPSegForImageSegmentation`:
//! frozen CLIP towers, and a small decoder that reads three vision block outputs, is
//! conditioned on the projected text embedding by FiLM, and paints logits with transposed
//! convolutions. Keys: `clip.*` and `decoder.*`.
//!
//! The image side does not depend on the prompt, so it is split off: [`ClipSeg::encode_image`]
//! runs the vision tower once (and the decoder's per-tap `reduces`, which are prompt-free
//! too), then [`ClipSeg::decode`] handles any number of prompts.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData, activation};

use crate::config::ClipSegConfig;
use crate::error::{Error, Result};
use crate::model::clip::{TextTransformer, VisionTransformer};
use crate::model::layers::{
    LayerShape, NamedTensor, PatchConvTranspose, TransformerLayer, export_conv_transpose,
    export_linear, linear, named,
};
use crate::tokenize::TokenizedPrompt;
use crate::weights::Weights;

/// `CLIPSegDecoder.transposed_convolution`: either one ConvT(k = s = patch), or the
/// "refined" Conv3×3 → ReLU → ConvT(patch/4) → ReLU → ConvT(patch/4).
#[derive(Module, Debug)]
pub struct DecoderHead {
    pub conv: Option<Conv2d>,
    pub up1: PatchConvTranspose,
    pub up2: Option<PatchConvTranspose>,
}

impl DecoderHead {
    fn load(w: &Weights, cfg: &ClipSegConfig, device: &Device) -> Result<Self> {
        let (r, p) = (cfg.reduce_dim, cfg.vision_config.patch_size);
        let key = "decoder.transposed_convolution";
        if !cfg.use_complex_transposed_convolution {
            return Ok(Self {
                conv: None,
                up1: PatchConvTranspose::load(w, key, r, 1, p, device)?,
                up2: None,
            });
        }
        let mut conv = Conv2dConfig::new([r, r], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(device);
        conv.weight = w.param(&format!("{key}.0.weight"), [r, r, 3, 3], device)?;
        conv.bias = Some(w.param(&format!("{key}.0.bias"), [r], device)?);
        Ok(Self {
            conv: Some(conv),
            up1: PatchConvTranspose::load(w, &format!("{key}.2"), r, r / 2, p / 4, device)?,
            up2: Some(PatchConvTranspose::load(
                w,
                &format!("{key}.4"),
                r / 2,
                1,
                p / 4,
                device,
            )?),
        })
    }

    /// `[P, R, g, g]` → logits `[P, S, S]`.
    fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let x = match &self.conv {
            Some(conv) => activation::relu(conv.forward(x)),
            None => x,
        };
        let x = self.up1.forward(x);
        let x = match &self.up2 {
            Some(up2) => up2.forward(activation::relu(x)),
            None => x,
        };
        let [p, _, h, w] = x.dims();
        x.reshape([p, h, w])
    }
}

/// `CLIPSegDecoder`.
#[derive(Module, Debug)]
pub struct Decoder {
    pub film_mul: Linear,
    pub film_add: Linear,
    /// `reduces[0]` applies to the deepest tap.
    pub reduces: Vec<Linear>,
    pub layers: Vec<TransformerLayer>,
    pub head: DecoderHead,
    pub conditional_layer: usize,
}

impl Decoder {
    /// Builds the decoder from the `decoder.*` tensors of a checkpoint (or of a fine-tuning
    /// checkpoint holding only those).
    pub fn load(w: &Weights, cfg: &ClipSegConfig, device: &Device) -> Result<Self> {
        let (r, n) = (cfg.reduce_dim, cfg.extract_layers.len());
        let v = &cfg.vision_config;
        // transformers copies the vision config and overrides sizes; the MLP is always ReLU.
        let shape = LayerShape {
            hidden: r,
            heads: cfg.decoder_num_attention_heads,
            intermediate: cfg.decoder_intermediate_size,
            act: crate::config::Activation::Relu,
            eps: v.layer_norm_eps,
        };
        Ok(Self {
            film_mul: linear(w, "decoder.film_mul", cfg.projection_dim, r, true, device)?,
            film_add: linear(w, "decoder.film_add", cfg.projection_dim, r, true, device)?,
            reduces: (0..n)
                .map(|i| {
                    linear(
                        w,
                        &format!("decoder.reduces.{i}"),
                        v.hidden_size,
                        r,
                        true,
                        device,
                    )
                })
                .collect::<Result<_>>()?,
            layers: (0..n)
                .map(|i| TransformerLayer::load(w, &format!("decoder.layers.{i}"), shape, device))
                .collect::<Result<_>>()?,
            head: DecoderHead::load(w, cfg, device)?,
            conditional_layer: cfg.conditional_layer,
        })
    }

    /// The decoder's tensors under their Hugging Face names and layouts (`decoder.*`), the
    /// inverse of loading: what a fine-tuned model is exported as.
    pub fn export(&self) -> Result<Vec<NamedTensor>> {
        let mut out = Vec::new();
        export_linear(&mut out, "decoder.film_mul", &self.film_mul)?;
        export_linear(&mut out, "decoder.film_add", &self.film_add)?;
        for (i, reduce) in self.reduces.iter().enumerate() {
            export_linear(&mut out, &format!("decoder.reduces.{i}"), reduce)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            layer.export(&format!("decoder.layers.{i}"), &mut out)?;
        }
        let key = "decoder.transposed_convolution";
        let head = &self.head;
        match (&head.conv, &head.up2) {
            (Some(conv), Some(up2)) => {
                out.push(named(format!("{key}.0.weight"), &conv.weight)?);
                let bias = conv
                    .bias
                    .as_ref()
                    .ok_or_else(|| Error::Weights("the head's conv has no bias".into()))?;
                out.push(named(format!("{key}.0.bias"), bias)?);
                export_conv_transpose(&mut out, &format!("{key}.2"), &head.up1)?;
                export_conv_transpose(&mut out, &format!("{key}.4"), up2)?;
            }
            _ => export_conv_transpose(&mut out, key, &head.up1)?,
        }
        Ok(out)
    }

    /// Projects the vision taps (deepest first) to the decoder's width.
    pub fn reduce(&self, taps: &[Tensor<3>]) -> ImageFeatures {
        ImageFeatures {
            reduced: taps
                .iter()
                .zip(&self.reduces)
                .map(|(tap, reduce)| reduce.forward(tap.clone()))
                .collect(),
        }
    }

    /// Logits `[P, S, S]`, see [`Self::decode_traced`].
    pub fn decode(
        &self,
        image: &ImageFeatures,
        conditioning: Tensor<2>,
        grid: usize,
    ) -> Result<Tensor<3>> {
        Ok(self.decode_traced(image, conditioning, grid)?.logits)
    }

    /// Logits (with intermediates) for reduced taps and FiLM conditioning vectors: one image
    /// with every prompt, or image `i` with prompt `i`; `grid` is the token grid's side.
    pub fn decode_traced(
        &self,
        image: &ImageFeatures,
        conditioning: Tensor<2>,
        grid: usize,
    ) -> Result<DecoderTrace> {
        let b = image.batch_size();
        let [p, _] = conditioning.dims();
        if b != 1 && b != p {
            return Err(Error::Input(format!(
                "{b} images cannot pair with {p} prompts"
            )));
        }
        let dec = self;
        // FiLM vectors broadcast over tokens: [P, 1, R].
        let mul = dec
            .film_mul
            .forward(conditioning.clone())
            .unsqueeze_dim::<3>(1);
        let add = dec.film_add.forward(conditioning).unsqueeze_dim::<3>(1);
        let mut x: Option<Tensor<3>> = None;
        let mut film_output = None;
        let mut layer_outputs = Vec::with_capacity(dec.layers.len());
        for (i, (reduced, layer)) in image.reduced.iter().zip(&dec.layers).enumerate() {
            let mut h = match x {
                Some(prev) => reduced.clone() + prev,
                None => reduced.clone(),
            };
            if i == dec.conditional_layer {
                h = mul.clone() * h + add.clone();
                film_output = Some(h.clone());
            }
            let out = layer.forward_post_norm(h);
            layer_outputs.push(out.clone());
            x = Some(out);
        }
        let x = x.expect("the decoder has at least one layer");
        let [n, tokens, r] = x.dims();
        let g = grid;
        debug_assert_eq!(tokens, 1 + g * g);
        let feature_map = x
            .narrow(1, 1, tokens - 1)
            .swap_dims(1, 2)
            .reshape([n, r, g, g]);
        // A conditional layer after step 0 leaves early steps unbatched: broadcast now.
        let feature_map = if n == 1 && p > 1 {
            feature_map.repeat_dim(0, p)
        } else {
            feature_map
        };
        let logits = self.head.forward(feature_map.clone());
        Ok(DecoderTrace {
            film_output: film_output.expect("conditional_layer is validated"),
            layer_outputs,
            feature_map,
            logits,
        })
    }
}

/// What the decoder needs from one batch of images: the reduced taps, deepest first,
/// each `[B, 1 + g², R]`.
#[derive(Debug, Clone)]
pub struct ImageFeatures {
    pub reduced: Vec<Tensor<3>>,
}

impl ImageFeatures {
    pub fn batch_size(&self) -> usize {
        self.reduced[0].dims()[0]
    }

    /// The features of image `index` alone.
    pub fn image(&self, index: usize) -> ImageFeatures {
        ImageFeatures {
            reduced: self
                .reduced
                .iter()
                .map(|t| t.clone().narrow(0, index, 1))
                .collect(),
        }
    }
}

/// Intermediate tensors of one decode, for parity checks against transformers.
#[derive(Debug, Clone)]
pub struct DecoderTrace {
    pub film_output: Tensor<3>,
    pub layer_outputs: Vec<Tensor<3>>,
    pub feature_map: Tensor<4>,
    pub logits: Tensor<3>,
}

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
            decoder: Decoder::load(w, cfg, device)?,
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
        let states = self.vision.hidden_states(pixels)?;
        Ok(self
            .extract_layers
            .iter()
            .rev()
            .map(|&i| states[i + 1].clone())
            .collect())
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
