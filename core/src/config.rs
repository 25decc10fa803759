//! Config structs mirroring Hugging Face's `CLIPSegConfig` (`config.json`) and
//! `ViTImageProcessor` (`preprocessor_config.json`). Defaults are transformers' defaults, so
//! a config that omits a field means what it means in transformers.

use serde::Deserialize;

use crate::error::{Error, Result};

/// The activation named by `hidden_act` in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, CLIP's own.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU.
    #[serde(rename = "gelu")]
    Gelu,
    /// tanh-approximated GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

/// `CLIPSegTextConfig`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub pad_token_id: i64,
    pub bos_token_id: i64,
    pub eos_token_id: i64,
}

impl Default for TextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

/// `CLIPSegVisionConfig`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

/// `CLIPSegConfig`: the two towers plus the decoder's sizes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipSegConfig {
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    pub projection_dim: usize,
    /// Vision blocks (0-based) whose outputs feed the decoder: `hidden_states[i + 1]`.
    pub extract_layers: Vec<usize>,
    pub reduce_dim: usize,
    pub decoder_num_attention_heads: usize,
    pub decoder_intermediate_size: usize,
    /// Decoder step at which FiLM conditioning is applied.
    pub conditional_layer: usize,
    /// `true`: Conv3×3 + ReLU + ConvT(k/4) + ReLU + ConvT(4) ("refined"); `false`: one ConvT.
    pub use_complex_transposed_convolution: bool,
}

impl Default for ClipSegConfig {
    fn default() -> Self {
        Self {
            text_config: TextConfig::default(),
            vision_config: VisionConfig::default(),
            projection_dim: 512,
            extract_layers: vec![3, 6, 9],
            reduce_dim: 64,
            decoder_num_attention_heads: 4,
            decoder_intermediate_size: 2048,
            conditional_layer: 0,
            use_complex_transposed_convolution: false,
        }
    }
}

impl ClipSegConfig {
    /// Parses `config.json` and checks that its sizes fit together.
    pub fn from_json(json: &[u8]) -> Result<Self> {
        let config: Self =
            serde_json::from_slice(json).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The number of vision blocks that must run: up to the deepest tapped one.
    pub fn vision_layers_used(&self) -> usize {
        self.extract_layers.iter().max().map_or(0, |&l| l + 1)
    }

    fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        let (t, v) = (&self.text_config, &self.vision_config);
        for (name, value) in [
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
            ("text_config.vocab_size", t.vocab_size),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
            ("vision_config.num_channels", v.num_channels),
            ("reduce_dim", self.reduce_dim),
            (
                "decoder_num_attention_heads",
                self.decoder_num_attention_heads,
            ),
            ("projection_dim", self.projection_dim),
        ] {
            if value == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        // Upper bounds: far above any released CLIP/CLIPSeg, low enough that a config
        // cannot ask for more memory or time than a machine has.
        for (name, value, max) in [
            ("text_config.hidden_size", t.hidden_size, 8192),
            ("text_config.intermediate_size", t.intermediate_size, 32768),
            ("text_config.num_hidden_layers", t.num_hidden_layers, 64),
            (
                "text_config.num_attention_heads",
                t.num_attention_heads,
                128,
            ),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
                MAX_TEXT_POSITIONS,
            ),
            ("text_config.vocab_size", t.vocab_size, 1 << 20),
            ("vision_config.hidden_size", v.hidden_size, 8192),
            (
                "vision_config.intermediate_size",
                v.intermediate_size,
                32768,
            ),
            ("vision_config.num_hidden_layers", v.num_hidden_layers, 64),
            (
                "vision_config.num_attention_heads",
                v.num_attention_heads,
                128,
            ),
            ("vision_config.patch_size", v.patch_size, 64),
            ("vision_config.image_size", v.image_size, MAX_INPUT_SIZE),
            ("projection_dim", self.projection_dim, 8192),
            ("reduce_dim", self.reduce_dim, 2048),
            (
                "decoder_num_attention_heads",
                self.decoder_num_attention_heads,
                128,
            ),
            (
                "decoder_intermediate_size",
                self.decoder_intermediate_size,
                32768,
            ),
            ("extract_layers (count)", self.extract_layers.len(), 16),
        ] {
            if value > max {
                return bad(format!("{name} is {value}, more than the supported {max}"));
            }
        }
        if v.num_channels != 3 {
            return bad(format!(
                "vision_config.num_channels is {}, but images are fed as RGB (3)",
                v.num_channels
            ));
        }
        check_patch_grid("vision_config.image_size", v.image_size, v.patch_size)?;
        if t.hidden_size % t.num_attention_heads != 0 {
            return bad(format!(
                "text hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return bad(format!(
                "vision hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if !self
            .reduce_dim
            .is_multiple_of(self.decoder_num_attention_heads)
        {
            return bad(format!(
                "reduce_dim {} is not divisible by decoder_num_attention_heads {}",
                self.reduce_dim, self.decoder_num_attention_heads
            ));
        }
        if v.image_size % v.patch_size != 0 {
            return bad(format!(
                "vision image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if self.extract_layers.is_empty() {
            return bad("extract_layers is empty".into());
        }
        if let Some(&l) = self
            .extract_layers
            .iter()
            .find(|&&l| l >= v.num_hidden_layers)
        {
            return bad(format!(
                "extract_layers names vision layer {l}, but the vision tower has {} layers",
                v.num_hidden_layers
            ));
        }
        if self.conditional_layer >= self.extract_layers.len() {
            return bad(format!(
                "conditional_layer {} is past the decoder's {} layers",
                self.conditional_layer,
                self.extract_layers.len()
            ));
        }
        if self.use_complex_transposed_convolution && v.patch_size % 4 != 0 {
            return bad(format!(
                "the refined head needs a patch_size divisible by 4, got {}",
                v.patch_size
            ));
        }
        Ok(())
    }
}

/// The largest square input side a config may ask for, in pixels.
pub const MAX_INPUT_SIZE: usize = 1024;

/// The most patches a side of the vision tower's input may have: 48×48 = 2304 tokens keeps
/// one attention map of all heads of a ViT-B under 300 MB.
pub const MAX_PATCH_GRID: usize = 48;

/// The longest text sequence a config may ask for (CLIP's is 77).
pub const MAX_TEXT_POSITIONS: usize = 1024;

/// Refuses an input size whose patch grid is beyond [`MAX_PATCH_GRID`] or [`MAX_INPUT_SIZE`].
pub(crate) fn check_patch_grid(field: &str, size: usize, patch: usize) -> Result<()> {
    if size > MAX_INPUT_SIZE || size / patch.max(1) > MAX_PATCH_GRID {
        return Err(Error::Config(format!(
            "{field} {size} is too large: at most {} pixels (a {MAX_PATCH_GRID}×{MAX_PATCH_GRID} grid of {patch}-pixel patches) and {MAX_INPUT_SIZE}",
            MAX_PATCH_GRID * patch
        )));
    }
    Ok(())
}

/// The image preprocessing a checkpoint asks for (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Square side the image is resized to.
    pub size: usize,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// CLIP's mean and std, which medvlsm's experiment configs give BiomedCLIPSeg and CRIS,
/// written as published (they round to the same f32).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl PreprocessConfig {
    /// transformers' `ViTImageProcessor` defaults at the vision tower's own size.
    pub fn default_for(vision: &VisionConfig) -> Self {
        Self {
            size: vision.image_size,
            do_resize: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: IMAGENET_MEAN,
            image_std: IMAGENET_STD,
        }
    }

    /// Parses `preprocessor_config.json`, falling back to [`Self::default_for`] per field.
    pub fn from_json(json: &[u8], vision: &VisionConfig) -> Result<Self> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Size {
            Square(usize),
            HeightWidth { height: usize, width: usize },
            Shortest { shortest_edge: usize },
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Triple {
            One(f32),
            Three([f32; 3]),
        }
        #[derive(Deserialize)]
        struct Raw {
            size: Option<Size>,
            do_resize: Option<bool>,
            do_rescale: Option<bool>,
            rescale_factor: Option<f32>,
            do_normalize: Option<bool>,
            image_mean: Option<Triple>,
            image_std: Option<Triple>,
            resample: Option<u32>,
        }
        let err = |m: String| Error::Config(format!("preprocessor_config.json: {m}"));
        let raw: Raw = serde_json::from_slice(json).map_err(|e| err(e.to_string()))?;
        let mut out = Self::default_for(vision);
        match raw.size {
            Some(Size::Square(s)) | Some(Size::Shortest { shortest_edge: s }) => out.size = s,
            Some(Size::HeightWidth { height, width }) if height == width => out.size = height,
            Some(Size::HeightWidth { height, width }) => {
                return Err(err(format!(
                    "non-square size {height}×{width} is not supported"
                )));
            }
            None => {}
        }
        if let Some(r) = raw.resample
            && r != 2
        {
            return Err(err(format!(
                "resample {r} is not supported (only 2, bilinear, as CLIPSeg uses)"
            )));
        }
        let triple = |t: Triple| match t {
            Triple::One(x) => [x; 3],
            Triple::Three(x) => x,
        };
        out.do_resize = raw.do_resize.unwrap_or(true);
        out.do_rescale = raw.do_rescale.unwrap_or(true);
        out.rescale_factor = raw.rescale_factor.unwrap_or(out.rescale_factor);
        out.do_normalize = raw.do_normalize.unwrap_or(true);
        if let Some(m) = raw.image_mean {
            out.image_mean = triple(m);
        }
        if let Some(s) = raw.image_std {
            out.image_std = triple(s);
        }
        if out.size == 0 || !out.size.is_multiple_of(vision.patch_size) {
            return Err(err(format!(
                "size {} is not a positive multiple of the patch size {}",
                out.size, vision.patch_size
            )));
        }
        check_patch_grid(
            "preprocessor_config.json: size",
            out.size,
            vision.patch_size,
        )?;
        if !out.rescale_factor.is_finite() || out.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(err(
                "rescale_factor or image_mean is not a finite number".into()
            ));
        }
        if out.image_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(err("image_std has a zero or non-finite entry".into()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_transformers_defaults() {
        let c = ClipSegConfig::from_json(b"{}").unwrap();
        assert_eq!(c.extract_layers, [3, 6, 9]);
        assert_eq!(c.vision_config.patch_size, 32);
        assert_eq!(c.text_config.max_position_embeddings, 77);
        assert_eq!(c.vision_layers_used(), 10);
        assert!(!c.use_complex_transposed_convolution);
    }

    #[test]
    fn inconsistent_sizes_are_refused_with_the_field_named() {
        for (json, needle) in [
            (r#"{"reduce_dim": 65}"#, "reduce_dim"),
            (r#"{"extract_layers": [3, 12]}"#, "extract_layers"),
            (r#"{"extract_layers": []}"#, "extract_layers"),
            (r#"{"conditional_layer": 3}"#, "conditional_layer"),
            (
                r#"{"vision_config": {"hidden_size": 100}}"#,
                "num_attention_heads",
            ),
            (
                r#"{"vision_config": {"hidden_act": "swish"}}"#,
                "config.json",
            ),
            (r#"{"text_config": {"hidden_size": 0}}"#, "hidden_size"),
            ("not json", "config.json"),
        ] {
            let e = ClipSegConfig::from_json(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{json}: {e}");
        }
    }

    #[test]
    fn preprocessor_sizes_and_statistics_are_read() {
        let v = VisionConfig {
            patch_size: 16,
            ..VisionConfig::default()
        };
        let p = PreprocessConfig::from_json(
            br#"{"size": 352, "image_mean": 0.5, "image_std": [0.5, 0.5, 0.5]}"#,
            &v,
        )
        .unwrap();
        assert_eq!(
            (p.size, p.image_mean, p.image_std),
            (352, [0.5; 3], [0.5; 3])
        );
        let p =
            PreprocessConfig::from_json(br#"{"size": {"height": 224, "width": 224}}"#, &v).unwrap();
        assert_eq!(p.size, 224);
        assert!(PreprocessConfig::from_json(br#"{"size": 100}"#, &v).is_err());
        assert!(
            PreprocessConfig::from_json(br#"{"size": {"height": 224, "width": 352}}"#, &v).is_err()
        );
        assert!(PreprocessConfig::from_json(br#"{"resample": 3}"#, &v).is_err());
        assert!(PreprocessConfig::from_json(br#"{"image_std": [0, 1, 1]}"#, &v).is_err());
    }
}
