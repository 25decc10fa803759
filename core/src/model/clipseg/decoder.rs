//! transformers' `CLIPSegDecoder`, shared by CLIPSeg and BiomedCLIPSeg(-D): it reads three
//! vision block outputs, is conditioned on a prompt vector by FiLM, and paints logits with
//! transposed convolutions. Its sizes come from a CLIPSeg `config.json` ([`DecoderConfig`]).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{Device, Tensor, activation};

use crate::config::{Activation, ClipSegConfig};
use crate::error::{Error, Result};
use crate::kernels;
use crate::model::layers::{
    LayerShape, NamedTensor, PatchConvTranspose, TransformerLayer, export_conv_transpose,
    export_linear, linear, named,
};
use crate::weights::Weights;

/// The decoder's sizes: the decoder fields of a CLIPSeg `config.json`, plus the width and
/// patch size of the vision tower it reads (its `vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    /// Which vision blocks feed the decoder (the model decides how they are indexed).
    pub extract_layers: Vec<usize>,
    pub reduce_dim: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub conditional_layer: usize,
    /// The "refined" head (Conv3×3 + two ConvT) instead of one ConvT.
    pub refined: bool,
    /// Width of the conditioning vector (FiLM input).
    pub projection_dim: usize,
    /// Width of the tapped vision states.
    pub vision_width: usize,
    pub patch_size: usize,
    /// The decoder's LayerNorms use the vision config's epsilon.
    pub layer_norm_eps: f64,
}

impl DecoderConfig {
    /// The decoder of a CLIPSeg config (not validated: see [`ClipSegConfig::from_json`]).
    pub fn of(cfg: &ClipSegConfig) -> Self {
        Self {
            extract_layers: cfg.extract_layers.clone(),
            reduce_dim: cfg.reduce_dim,
            num_heads: cfg.decoder_num_attention_heads,
            intermediate_size: cfg.decoder_intermediate_size,
            conditional_layer: cfg.conditional_layer,
            refined: cfg.use_complex_transposed_convolution,
            projection_dim: cfg.projection_dim,
            vision_width: cfg.vision_config.hidden_size,
            patch_size: cfg.vision_config.patch_size,
            layer_norm_eps: cfg.vision_config.layer_norm_eps,
        }
    }

    /// The decoder fields of a CLIPSeg `config.json` read on their own, as medvlsm reads
    /// `CIDAS/clipseg-rd64-refined`'s config for BiomedCLIPSeg: the CLIP towers it describes
    /// are not built, so only the decoder's sizes are checked.
    pub fn from_clipseg_json(json: &[u8], file: &str) -> Result<Self> {
        let cfg: ClipSegConfig = serde_json::from_slice(json)
            .map_err(|e| Error::Config(format!("{file}: not a CLIPSeg config ({e})")))?;
        let out = Self::of(&cfg);
        out.validate()
            .map_err(|e| Error::Config(format!("{file}: {e}")))?;
        Ok(out)
    }

    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        for (name, value, max) in [
            ("reduce_dim", self.reduce_dim, 2048),
            ("decoder_num_attention_heads", self.num_heads, 128),
            ("decoder_intermediate_size", self.intermediate_size, 32768),
            ("projection_dim", self.projection_dim, 8192),
            ("vision_config.hidden_size", self.vision_width, 8192),
            ("vision_config.patch_size", self.patch_size, 64),
            ("extract_layers (count)", self.extract_layers.len(), 16),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
            if value > max {
                return Err(format!("{name} is {value}, more than the supported {max}"));
            }
        }
        if !self.reduce_dim.is_multiple_of(self.num_heads) {
            return Err(format!(
                "reduce_dim {} is not divisible by decoder_num_attention_heads {}",
                self.reduce_dim, self.num_heads
            ));
        }
        if self.conditional_layer >= self.extract_layers.len() {
            return Err(format!(
                "conditional_layer {} is past the decoder's {} layers",
                self.conditional_layer,
                self.extract_layers.len()
            ));
        }
        if self.refined && !self.patch_size.is_multiple_of(4) {
            return Err(format!(
                "the refined head needs a patch_size divisible by 4, got {}",
                self.patch_size
            ));
        }
        Ok(())
    }
}

/// `CLIPSegDecoder.transposed_convolution`: either one ConvT(k = s = patch), or the
/// "refined" Conv3×3 → ReLU → ConvT(patch/4) → ReLU → ConvT(patch/4).
#[derive(Module, Debug)]
pub struct DecoderHead {
    pub conv: Option<Conv2d>,
    pub up1: PatchConvTranspose,
    pub up2: Option<PatchConvTranspose>,
}

impl DecoderHead {
    fn load(w: &Weights, prefix: &str, cfg: &DecoderConfig, device: &Device) -> Result<Self> {
        let (r, p) = (cfg.reduce_dim, cfg.patch_size);
        let key = &format!("{prefix}.transposed_convolution");
        if !cfg.refined {
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
    pub fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let x = match &self.conv {
            Some(conv) => activation::relu(conv.forward(x)),
            None => x,
        };
        if let Some(up2) = &self.up2
            && let Some(logits) = kernels::patch_conv_transpose_pair(&x, &self.up1, up2)
        {
            let [p, _, h, w] = logits.dims();
            return logits.reshape([p, h, w]);
        }
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
    /// Builds the decoder from the `{prefix}.*` tensors of a checkpoint (`decoder` in a
    /// CLIPSeg checkpoint, `net.decoder` in a medvlsm training checkpoint).
    pub fn load(w: &Weights, prefix: &str, cfg: &DecoderConfig, device: &Device) -> Result<Self> {
        let (r, n) = (cfg.reduce_dim, cfg.extract_layers.len());
        // transformers copies the vision config and overrides sizes; the MLP is always ReLU.
        let shape = LayerShape {
            hidden: r,
            heads: cfg.num_heads,
            intermediate: cfg.intermediate_size,
            act: Activation::Relu,
            eps: cfg.layer_norm_eps,
        };
        let film = |name: &str| {
            linear(
                w,
                &format!("{prefix}.{name}"),
                cfg.projection_dim,
                r,
                true,
                device,
            )
        };
        Ok(Self {
            film_mul: film("film_mul")?,
            film_add: film("film_add")?,
            reduces: (0..n)
                .map(|i| {
                    linear(
                        w,
                        &format!("{prefix}.reduces.{i}"),
                        cfg.vision_width,
                        r,
                        true,
                        device,
                    )
                })
                .collect::<Result<_>>()?,
            layers: (0..n)
                .map(|i| TransformerLayer::load(w, &format!("{prefix}.layers.{i}"), shape, device))
                .collect::<Result<_>>()?,
            head: DecoderHead::load(w, prefix, cfg, device)?,
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
            let out = layer.forward_post_norm(h, None);
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
