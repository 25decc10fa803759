//! BiomedCLIPSeg's configuration, from the three JSON files medvlsm reads: BiomedCLIP's
//! `open_clip_config.json` (the towers), the BERT repository's `config.json` (the text
//! tower's sizes) and `CIDAS/clipseg-rd64-refined`'s `config.json` (the decoder's sizes).
//! vlsm's own BiomedCLIPSeg folder keeps all three, as they are, in one `config.json`.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::Arch;
use crate::model::bert::BertConfig;
use crate::model::clipseg::DecoderConfig;

/// `open_clip_config.json`: the parts of open_clip's `CLIP` config BiomedCLIP uses.
#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipConfig {
    pub model_cfg: OpenClipModelCfg,
    #[serde(default)]
    pub preprocess_cfg: Option<OpenClipPreprocess>,
    /// Not open_clip's: the ViT's own arguments, for a timm model vlsm does not know by name
    /// (the tiny test fixtures carry theirs here).
    #[serde(default)]
    pub timm_model_cfg: Option<TimmModelCfg>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipModelCfg {
    pub embed_dim: usize,
    pub vision_cfg: OpenClipVisionCfg,
    pub text_cfg: OpenClipTextCfg,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipVisionCfg {
    pub timm_model_name: Option<String>,
    pub image_size: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipTextCfg {
    pub hf_model_name: Option<String>,
    pub hf_tokenizer_name: Option<String>,
    #[serde(default = "default_proj")]
    pub hf_proj_type: String,
    #[serde(default = "default_pooler")]
    pub hf_pooler_type: String,
    #[serde(default = "default_context")]
    pub context_length: usize,
}

fn default_proj() -> String {
    "mlp".into()
}
fn default_pooler() -> String {
    "mean_pooler".into()
}
fn default_context() -> usize {
    77
}

#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipPreprocess {
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TimmModelCfg {
    pub kwargs: TimmVitConfig,
}

/// The arguments of timm's `VisionTransformer` that shape the weights.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TimmVitConfig {
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    pub img_size: usize,
    #[serde(default = "default_vit_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default = "default_true")]
    pub class_token: bool,
}

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_vit_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

impl TimmVitConfig {
    /// The timm models vlsm knows by name (what BiomedCLIP's config names).
    pub fn named(name: &str) -> Option<Self> {
        // timm names may carry a pretrained tag: `vit_base_patch16_224.augreg_in21k`.
        match name.split('.').next()? {
            "vit_base_patch16_224" => Some(Self {
                patch_size: 16,
                embed_dim: 768,
                depth: 12,
                num_heads: 12,
                mlp_ratio: 4.0,
                img_size: 224,
                layer_norm_eps: 1e-6,
                qkv_bias: true,
                class_token: true,
            }),
            _ => None,
        }
    }

    /// timm's `int(embed_dim * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }
}

/// Everything that shapes a BiomedCLIPSeg model.
#[derive(Debug, Clone)]
pub struct BiomedClipSegConfig {
    pub arch: Arch,
    pub open_clip: OpenClipConfig,
    pub vit: TimmVitConfig,
    pub bert: BertConfig,
    pub decoder: DecoderConfig,
    /// The three files as they were read, for vlsm's own folder.
    pub open_clip_json: Value,
    pub bert_json: Value,
    pub decoder_json: Value,
}

/// BiomedCLIP's text tower: the BERT repository open_clip reads the config and tokenizer from.
pub const DEFAULT_BERT_REPO: &str = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract";

impl BiomedClipSegConfig {
    /// From the three files medvlsm reads (`open_clip_config.json`, the BERT `config.json`,
    /// the CLIPSeg `config.json` of the decoder), named in errors by `names`.
    pub fn from_parts(
        arch: Arch,
        open_clip_json: &[u8],
        bert_json: &[u8],
        decoder_json: &[u8],
        names: [&str; 3],
    ) -> Result<Self> {
        let value = |bytes: &[u8], name: &str| -> Result<Value> {
            serde_json::from_slice(bytes)
                .map_err(|e| Error::Config(format!("{name}: not valid JSON ({e})")))
        };
        Self::from_values(
            arch,
            value(open_clip_json, names[0])?,
            value(bert_json, names[1])?,
            value(decoder_json, names[2])?,
            names,
        )
    }

    fn from_values(
        arch: Arch,
        open_clip_json: Value,
        bert_json: Value,
        decoder_json: Value,
        names: [&str; 3],
    ) -> Result<Self> {
        let [oc_name, bert_name, dec_name] = names;
        let open_clip: OpenClipConfig = serde_json::from_value(open_clip_json.clone())
            .map_err(|e| Error::Config(format!("{oc_name}: not an open_clip config ({e})")))?;
        let bert = BertConfig::from_json(bert_json.to_string().as_bytes(), bert_name)?;
        let decoder =
            DecoderConfig::from_clipseg_json(decoder_json.to_string().as_bytes(), dec_name)?;
        let bad = |file: &str, msg: String| Err(Error::Config(format!("{file}: {msg}")));
        let m = &open_clip.model_cfg;
        let vit = match &open_clip.timm_model_cfg {
            Some(t) => t.kwargs.clone(),
            None => {
                let name = m.vision_cfg.timm_model_name.as_deref().unwrap_or("");
                match TimmVitConfig::named(name) {
                    Some(v) => v,
                    None => {
                        return bad(
                            oc_name,
                            format!(
                                "vision tower `{name}` is not a timm ViT vlsm knows \
                                 (vit_base_patch16_224); give its sizes as timm_model_cfg.kwargs"
                            ),
                        );
                    }
                }
            }
        };
        for (field, value, max) in [
            ("ViT embed_dim", vit.embed_dim, 8192),
            ("ViT depth", vit.depth, 64),
            ("ViT num_heads", vit.num_heads, 128),
            ("ViT patch_size", vit.patch_size, 64),
            ("ViT img_size", vit.img_size, crate::config::MAX_INPUT_SIZE),
            ("ViT MLP width", vit.mlp_hidden(), 32768),
            ("embed_dim", m.embed_dim, 8192),
        ] {
            if value == 0 || value > max {
                return bad(oc_name, format!("{field} is {value}, outside 1..={max}"));
            }
        }
        crate::config::check_patch_grid(
            &format!("{oc_name}: ViT img_size"),
            vit.img_size,
            vit.patch_size,
        )?;
        if !vit.img_size.is_multiple_of(vit.patch_size)
            || !vit.embed_dim.is_multiple_of(vit.num_heads)
            || !vit.qkv_bias
            || !vit.class_token
        {
            return bad(
                oc_name,
                format!(
                    "the ViT ({} px, patch {}, width {}, {} heads, qkv_bias {}, class_token {}) is not one BiomedCLIP's code can run",
                    vit.img_size,
                    vit.patch_size,
                    vit.embed_dim,
                    vit.num_heads,
                    vit.qkv_bias,
                    vit.class_token
                ),
            );
        }
        if let Some(size) = m.vision_cfg.image_size
            && size != vit.img_size
        {
            return bad(
                oc_name,
                format!(
                    "vision_cfg.image_size {size} differs from the ViT's img_size {}",
                    vit.img_size
                ),
            );
        }
        let t = &m.text_cfg;
        if t.hf_proj_type != "mlp" || t.hf_pooler_type != "cls_last_hidden_state_pooler" {
            return bad(
                oc_name,
                format!(
                    "text tower with hf_proj_type `{}` and hf_pooler_type `{}`: vlsm runs \
                     BiomedCLIP's (mlp, cls_last_hidden_state_pooler)",
                    t.hf_proj_type, t.hf_pooler_type
                ),
            );
        }
        if t.context_length == 0 || t.context_length > bert.max_position_embeddings {
            return bad(
                oc_name,
                format!(
                    "context_length {} does not fit the BERT's {} positions",
                    t.context_length, bert.max_position_embeddings
                ),
            );
        }
        let deepest = decoder.extract_layers.iter().max().copied().unwrap_or(0);
        if deepest + 2 > vit.depth {
            return bad(
                dec_name,
                format!(
                    "extract_layers taps block output {} (medvlsm's `[i + 1]`), but the ViT has {} blocks",
                    deepest + 1,
                    vit.depth
                ),
            );
        }
        if decoder.vision_width != vit.embed_dim || decoder.patch_size != vit.patch_size {
            return bad(
                dec_name,
                format!(
                    "a decoder for a {}-wide ViT with {}-pixel patches, but {oc_name}'s ViT is {} wide with {}-pixel patches",
                    decoder.vision_width, decoder.patch_size, vit.embed_dim, vit.patch_size
                ),
            );
        }
        if decoder.projection_dim != m.embed_dim {
            return bad(
                dec_name,
                format!(
                    "projection_dim {} differs from {oc_name}'s embed_dim {} (the FiLM input)",
                    decoder.projection_dim, m.embed_dim
                ),
            );
        }
        Ok(Self {
            arch,
            open_clip,
            vit,
            bert,
            decoder,
            open_clip_json,
            bert_json,
            decoder_json,
        })
    }

    /// vlsm's BiomedCLIPSeg folder `config.json`: the three files under their roles.
    pub fn from_vlsm_json(json: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct Folder {
            model_type: String,
            open_clip_config: Value,
            text_config: Value,
            decoder_config: Value,
        }
        let f: Folder = serde_json::from_slice(json).map_err(|e| {
            Error::Config(format!(
                "config.json: not a vlsm BiomedCLIPSeg config ({e})"
            ))
        })?;
        let arch = Arch::from_name(&f.model_type).ok_or_else(|| {
            Error::Config(format!(
                "config.json: unknown model_type `{}`",
                f.model_type
            ))
        })?;
        Self::from_values(
            arch,
            f.open_clip_config,
            f.text_config,
            f.decoder_config,
            [
                "config.json: open_clip_config",
                "config.json: text_config",
                "config.json: decoder_config",
            ],
        )
    }

    pub fn to_vlsm_json(&self) -> Vec<u8> {
        let v = json!({
            "model_type": self.arch.name(),
            "open_clip_config": self.open_clip_json,
            "text_config": self.bert_json,
            "decoder_config": self.decoder_json,
        });
        serde_json::to_vec_pretty(&v).expect("a JSON value serialises")
    }

    /// The BERT repository the text tower's config and tokenizer come from.
    pub fn bert_repo(open_clip: &OpenClipConfig) -> (&str, &str) {
        let t = &open_clip.model_cfg.text_cfg;
        let model = t.hf_model_name.as_deref().unwrap_or(DEFAULT_BERT_REPO);
        (model, t.hf_tokenizer_name.as_deref().unwrap_or(model))
    }

    pub fn context_length(&self) -> usize {
        self.open_clip.model_cfg.text_cfg.context_length
    }
}
