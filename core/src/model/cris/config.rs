//! CRIS's configuration: medvlsm's constructor arguments (`configs/model/cris.yaml`), as a
//! `config.json` with `"model_type": "cris"`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `CRIS(...)`'s arguments, under medvlsm's names; defaults are `configs/model/cris.yaml`
/// (RN50 at 416 px).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrisConfig {
    /// Always `"cris"` in a file vlsm writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Text context (tokens per prompt).
    pub word_len: usize,
    /// The neck's input widths: C3, C4, C5.
    pub fpn_in: [usize; 3],
    /// The neck's output widths.
    pub fpn_out: [usize; 3],
    /// The decoder's width (= the text tower's width = `fpn_out[1]`).
    pub vis_dim: usize,
    /// The sentence state's width (CLIP's embedding width).
    pub word_dim: usize,
    pub num_layers: usize,
    pub num_head: usize,
    pub dim_ffn: usize,
    pub dropout: f64,
    /// medvlsm's CRIS only runs with `false` (its forward cannot reshape a list).
    pub intermediate: bool,
    /// Input side; the output is upsampled to it inside the forward.
    pub img_size: usize,
    /// Accepted because medvlsm's configs carry them; not used for inference.
    #[serde(skip_serializing)]
    pub clip_pretrain: Option<String>,
    #[serde(skip_serializing)]
    pub cris_pretrain: Option<String>,
    #[serde(skip_serializing)]
    pub freeze_encoder: Option<bool>,
}

impl Default for CrisConfig {
    fn default() -> Self {
        Self {
            model_type: None,
            word_len: 77,
            fpn_in: [512, 1024, 1024],
            fpn_out: [256, 512, 1024],
            vis_dim: 512,
            word_dim: 1024,
            num_layers: 3,
            num_head: 8,
            dim_ffn: 2048,
            dropout: 0.2,
            intermediate: false,
            img_size: 416,
            clip_pretrain: None,
            cris_pretrain: None,
            freeze_encoder: None,
        }
    }
}

/// The largest input side accepted from a config (bounds memory whatever a file declares).
pub const MAX_IMG_SIZE: usize = 2048;

impl CrisConfig {
    /// Reads a `config.json` (medvlsm's argument names, `model_type` `"cris"`, missing
    /// arguments take the study's values) and checks it.
    pub fn from_json(json: &[u8]) -> Result<Self> {
        let cfg: Self = serde_json::from_slice(json)
            .map_err(|e| Error::Config(format!("CRIS config.json: {e}")))?;
        if let Some(t) = &cfg.model_type
            && t != "cris"
        {
            return Err(Error::Config(format!(
                "CRIS config.json: model_type is `{t}`, not `cris`"
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The JSON vlsm writes beside a CRIS checkpoint.
    pub fn to_json(&self) -> String {
        let cfg = Self {
            model_type: Some("cris".into()),
            ..self.clone()
        };
        serde_json::to_string_pretty(&cfg).expect("a config serialises")
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Config(format!("CRIS config: {why}")));
        if self.img_size == 0 || !self.img_size.is_multiple_of(32) || self.img_size > MAX_IMG_SIZE {
            return bad(format!(
                "img_size {} must be a positive multiple of 32 (the ResNet's stride) up to \
                 {MAX_IMG_SIZE}",
                self.img_size
            ));
        }
        if self.intermediate {
            return bad(
                "intermediate: true is not supported (medvlsm's CRIS cannot run it)".into(),
            );
        }
        if self.vis_dim != self.fpn_out[1] {
            return bad(format!(
                "vis_dim {} must equal fpn_out[1] {} (the decoder reads the neck's map)",
                self.vis_dim, self.fpn_out[1]
            ));
        }
        if self.num_head == 0 || !self.vis_dim.is_multiple_of(self.num_head) {
            return bad(format!(
                "vis_dim {} is not divisible by num_head {}",
                self.vis_dim, self.num_head
            ));
        }
        if !self.vis_dim.is_multiple_of(4) || self.vis_dim < 4 {
            return bad(format!(
                "vis_dim {} must be a multiple of 4 (2-D sine positions)",
                self.vis_dim
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout {} is not in [0, 1)", self.dropout));
        }
        let widths = [
            self.word_len,
            self.vis_dim,
            self.word_dim,
            self.num_layers,
            self.dim_ffn,
        ]
        .into_iter()
        .chain(self.fpn_in)
        .chain(self.fpn_out);
        for v in widths {
            if v == 0 || v > 65_536 {
                return bad(format!("a size of {v} is out of range"));
            }
        }
        if self.num_layers > 64 || self.word_len > 1024 {
            return bad("more than 64 decoder layers or 1024 tokens".into());
        }
        Ok(())
    }
}
