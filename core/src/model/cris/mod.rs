//! CRIS (Wang et al., CVPR 2022) as medvlsm runs it: CLIP's ModifiedResNet RN50 with CRIS's
//! attention pool ([`resnet`]), the CLIP text transformer (loaded from OpenAI's layout by
//! [`TextTransformer::load_openai`]), an FPN neck with text gating ([`neck`]), a
//! vision-language decoder and a projector with a per-sample dynamic kernel ([`decoder`]),
//! then a bicubic (`align_corners=True`) upsampling to the input size inside the forward.
//! Keys as medvlsm's `cris.pt` (`backbone.*`, `neck.*`, `decoder.*`, `proj.*`); sizes from
//! [`CrisConfig`] (medvlsm's constructor arguments).
//!
//! The image side is prompt-free until the neck: [`Cris::encode_image`] runs the backbone
//! once per image, [`Cris::decode`] runs neck, decoder and projector per prompt.

pub mod config;
pub mod decoder;
pub mod neck;
pub mod resnet;

use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

pub use config::CrisConfig;
pub use decoder::{DecoderShape, Projector, ProjectorTrace, VisionLanguageDecoder};
pub use neck::{Neck, NeckConfig, NeckTrace};
pub use resnet::{ImageFeatures, ModifiedResNet, ResNetConfig};

use crate::error::{Error, Result};
use crate::model::clip::TextTransformer;
use crate::tokenize::TokenizedPrompt;
use crate::weights::Weights;

/// A prompt batch as CRIS's decoder reads it.
#[derive(Debug, Clone)]
pub struct PromptFeatures {
    /// The text tower's final-normed states, pads included: `[P, L, W]`.
    pub words: Tensor<3>,
    /// The sentence state (first-EOT row through `text_projection`): `[P, E]`.
    pub state: Tensor<2>,
    /// `input_ids == 0`: the text keys the cross-attention ignores, `[P, L]`.
    pub ignored: Tensor<2, Bool>,
}

impl PromptFeatures {
    pub fn len(&self) -> usize {
        self.state.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Prompts `start..start + n`.
    pub fn rows(&self, start: usize, n: usize) -> Self {
        Self {
            words: self.words.clone().narrow(0, start, n),
            state: self.state.clone().narrow(0, start, n),
            ignored: self.ignored.clone().narrow(0, start, n),
        }
    }

    pub fn cat(parts: Vec<Self>) -> Self {
        let (mut words, mut state, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
        for p in parts {
            words.push(p.words);
            state.push(p.state);
            ignored.push(p.ignored);
        }
        Self {
            words: Tensor::cat(words, 0),
            state: Tensor::cat(state, 0),
            ignored: Tensor::cat(ignored, 0),
        }
    }
}

/// Every stage's output for one decode, for parity checks.
#[derive(Debug, Clone)]
pub struct CrisTrace {
    pub neck: NeckTrace,
    /// Each decoder layer's output `[P, HW, C]`.
    pub layers: Vec<Tensor<3>>,
    /// The decoder's map after the final norm `[P, C, h, w]`.
    pub decoded: Tensor<4>,
    pub projector: ProjectorTrace,
    /// Logits `[P, S, S]` at the input size.
    pub logits: Tensor<3>,
}

#[derive(Module, Debug)]
pub struct Cris {
    pub backbone: ModifiedResNet,
    pub text: TextTransformer,
    /// CLIP's `text_projection` `[W, E]` (applied as `x @ text_projection`).
    pub text_projection: Param<Tensor<2>>,
    pub neck: Neck,
    pub decoder: VisionLanguageDecoder,
    pub proj: Projector,
    pub img_size: usize,
}

impl Cris {
    /// Where a checkpoint keeps CRIS: `net.` in medvlsm's Lightning `best.ckpt`, nowhere
    /// (`""`) in `cris.pt` and vlsm's export.
    pub fn prefix_of(w: &Weights) -> &'static str {
        if w.has_prefix("net.backbone.visual.") {
            "net."
        } else {
            ""
        }
    }

    /// Loads CRIS from tensors under medvlsm's keys (`cris.pt`, or a Lightning
    /// checkpoint's `state_dict`, whose `net.` prefix is found by [`Self::prefix_of`]).
    pub fn load(w: &Weights, cfg: &CrisConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let p = Self::prefix_of(w);
        let key = |name: &str| format!("{p}{name}");
        if !w.has_prefix(&key("backbone.visual.")) {
            let what = if w.has_prefix("clip.") || w.has_prefix("decoder.film_mul") {
                " (it is a CLIPSeg checkpoint)"
            } else if w.has_prefix("visual.trunk.") || w.has_prefix("biomedclip.") {
                " (it is a BiomedCLIP checkpoint)"
            } else {
                ""
            };
            return Err(Error::Weights(format!(
                "{}: not a CRIS checkpoint{what}: missing `backbone.visual.conv1.weight`",
                w.source()
            )));
        }
        let resnet = ResNetConfig::from_weights(w, &key("backbone.visual"))?;
        let c = resnet.width * 32;
        let taps = [c / 4, c / 2, resnet.output_dim];
        if taps != cfg.fpn_in {
            return Err(Error::Weights(format!(
                "{}: the ResNet gives C3/C4/C5 widths {taps:?}, the config's fpn_in is {:?}",
                w.source(),
                cfg.fpn_in
            )));
        }
        let backbone =
            ModifiedResNet::load(w, &key("backbone.visual"), &resnet, cfg.img_size, device)?;
        let text = TextTransformer::load_openai(w, &key("backbone"), device)?;
        let width = text.token_embedding.dims()[1];
        if width != cfg.vis_dim {
            return Err(Error::Weights(format!(
                "{}: the text tower is {width} wide, the config's vis_dim is {}",
                w.source(),
                cfg.vis_dim
            )));
        }
        if text.max_positions() < cfg.word_len {
            return Err(Error::Weights(format!(
                "{}: the text tower has {} positions, the config's word_len is {}",
                w.source(),
                text.max_positions(),
                cfg.word_len
            )));
        }
        let text_projection = w.param(
            &key("backbone.text_projection"),
            [width, cfg.word_dim],
            device,
        )?;
        let neck = Neck::load(
            w,
            &key("neck"),
            &NeckConfig {
                fpn_in: cfg.fpn_in,
                fpn_out: cfg.fpn_out,
                state_dim: cfg.word_dim,
            },
            device,
        )?;
        let shape = DecoderShape {
            d_model: cfg.vis_dim,
            num_layers: cfg.num_layers,
            num_head: cfg.num_head,
            dim_ffn: cfg.dim_ffn,
            dropout: cfg.dropout,
        };
        let decoder = VisionLanguageDecoder::load(w, &key("decoder"), &shape, device)?;
        let proj = Projector::load(w, &key("proj"), cfg.word_dim, cfg.vis_dim / 2, device)?;
        Ok(Self {
            backbone,
            text,
            text_projection,
            neck,
            decoder,
            proj,
            img_size: cfg.img_size,
        })
    }

    /// Keys a CRIS checkpoint holds that inference does not read (medvlsm keeps them
    /// because CLIP's `build_model` creates them), under the checkpoint's `prefix`.
    pub fn unused_key(prefix: &str, key: &str) -> bool {
        // A Lightning state_dict may hold buffers of modules besides `net` (the loss).
        let Some(key) = key.strip_prefix(prefix) else {
            return true;
        };
        key.ends_with("num_batches_tracked")
            || matches!(
                key,
                "backbone.logit_scale"
                    | "backbone.input_resolution"
                    | "backbone.context_length"
                    | "backbone.vocab_size"
            )
    }

    /// Every tensor under medvlsm's `cris.pt` keys (no prefix), BatchNorm running statistics
    /// included: what `vlsm train` exports and `Cris::load` reads back.
    pub fn export(&self) -> Result<Vec<crate::model::layers::NamedTensor>> {
        let mut out = Vec::new();
        self.backbone.export("backbone.visual", &mut out)?;
        self.text.export_openai("backbone", &mut out)?;
        out.push(crate::model::layers::named(
            "backbone.text_projection".into(),
            &self.text_projection,
        )?);
        self.neck.export("neck", &mut out)?;
        self.decoder.export("decoder", &mut out)?;
        self.proj.export("proj", &mut out)?;
        Ok(out)
    }

    /// Brings what inference precomputes at load (the resized position table) up to date
    /// with trained weights. Native backends only (reads the table back).
    pub fn refresh_after_training(mut self) -> Result<Self> {
        self.backbone.attnpool.refresh_resized()?;
        Ok(self)
    }

    pub fn input_size(&self) -> usize {
        self.img_size
    }

    /// The side of the decoder's token grid (C4's).
    pub fn grid(&self) -> usize {
        self.img_size / 16
    }

    /// C3, C4, C5 for `[B, 3, S, S]` pixels.
    pub fn encode_image(&self, pixels: Tensor<4>) -> Result<ImageFeatures> {
        let [_, _, h, w] = pixels.dims();
        if h != self.img_size || w != self.img_size {
            return Err(Error::Input(format!(
                "CRIS expects {s}×{s} pixels, got {h}×{w}",
                s = self.img_size
            )));
        }
        self.backbone.forward(pixels)
    }

    /// Word features, sentence states and the cross-attention's ignored keys.
    pub fn embed_prompts(
        &self,
        prompts: &[TokenizedPrompt],
        device: &Device,
    ) -> Result<PromptFeatures> {
        let (words, pooled) = self.text.forward(prompts, false, device)?;
        let state = pooled.matmul(self.text_projection.val());
        let [p, l, _] = words.dims();
        let ids = crate::model::layers::prompt_ids(prompts, l, device);
        let ignored = ids.equal_elem(0);
        debug_assert_eq!(ignored.dims(), [p, l]);
        Ok(PromptFeatures {
            words,
            state,
            ignored,
        })
    }

    /// Logits `[P, S, S]`: one image with every prompt, or image `i` with prompt `i`.
    pub fn decode(&self, image: &ImageFeatures, prompts: &PromptFeatures) -> Result<Tensor<3>> {
        Ok(self.decode_traced(image, prompts)?.logits)
    }

    pub fn decode_traced(
        &self,
        image: &ImageFeatures,
        prompts: &PromptFeatures,
    ) -> Result<CrisTrace> {
        let (images, p) = (image.c3.dims()[0], prompts.len());
        if images != 1 && images != p {
            return Err(Error::Input(format!(
                "{images} encoded images for {p} prompts: need one image, or one per prompt"
            )));
        }
        let neck = self.neck.forward(image, prompts.state.clone());
        let (layers, decoded) = self.decoder.forward(
            neck.output.clone(),
            prompts.words.clone(),
            prompts.ignored.clone(),
        );
        let projector = self.proj.forward(decoded.clone(), prompts.state.clone());
        let s = self.img_size;
        let logits = upsample_bicubic_align_corners(projector.output.clone(), s).reshape([p, s, s]);
        Ok(CrisTrace {
            neck,
            layers,
            decoded,
            projector,
            logits,
        })
    }
}

/// `F.interpolate(x, size, mode="bicubic", align_corners=True)` of `[N, C, h, w]` to
/// `[N, C, size, size]`: PyTorch's cubic convolution (A = −0.75, borders clamped), along the
/// width then the height, each output the four taps summed in PyTorch's order. Written with
/// gathers and products (not burn's interpolate, whose bicubic kernel loses the WebGPU device)
/// so every backend computes the same values.
pub fn upsample_bicubic_align_corners(x: Tensor<4>, size: usize) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    let device = x.device();
    let dtype = x.dtype();
    let axis = |x: Tensor<4>, dim: usize, from: usize| -> Tensor<4> {
        let (indices, weights) = cubic_taps(from, size);
        let mut shape = [1, 1, 1, 1];
        shape[dim] = size;
        let mut out: Option<Tensor<4>> = None;
        for k in 0..4 {
            let idx =
                Tensor::<1, Int>::from_data(TensorData::new(indices[k].clone(), [size]), &device);
            let wk = Tensor::<4>::from_data(TensorData::new(weights[k].clone(), shape), &device)
                .cast(dtype);
            let term = x.clone().select(dim, idx) * wk;
            out = Some(match out {
                Some(sum) => sum + term,
                None => term,
            });
        }
        out.expect("four taps")
    };
    let x = axis(x, 3, w);
    axis(x, 2, h)
}

/// For each of `to` outputs along an axis of `from` inputs (`align_corners=True`): the four
/// source indices (clamped) and PyTorch's cubic weights, tap by tap.
fn cubic_taps(from: usize, to: usize) -> ([Vec<i64>; 4], [Vec<f32>; 4]) {
    const A: f32 = -0.75;
    let cubic1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let cubic2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = if to > 1 {
        (from as f32 - 1.0) / (to as f32 - 1.0)
    } else {
        0.0
    };
    let mut indices: [Vec<i64>; 4] = Default::default();
    let mut weights: [Vec<f32>; 4] = Default::default();
    for o in 0..to {
        let src = scale * o as f32;
        let base = src.floor();
        let t = src - base;
        let ws = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
        for k in 0..4 {
            let i = (base as i64 + k as i64 - 1).clamp(0, from as i64 - 1);
            indices[k].push(i);
            weights[k].push(ws[k]);
        }
    }
    (indices, weights)
}
