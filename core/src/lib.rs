//! vlsm: text-prompted medical image segmentation with vision-language segmentation models.
//!
//! One core, native and in the browser: bytes → image tensor → image encoder (once) →
//! per-prompt decoder → logits → masks. Models are burn modules; the backend is the
//! [`burn::tensor::Device`] the caller picks.

#[cfg(feature = "clinical")]
pub mod clinical;
pub mod config;
pub mod dataset;
#[cfg(feature = "clinical")]
pub mod dicom;
// Writes files with the current date: native only.
#[cfg(all(feature = "clinical", not(target_arch = "wasm32")))]
pub mod dicom_seg;
pub mod error;
#[cfg(feature = "std")]
pub mod files;
pub mod gemm_bf16;
pub mod gemm_f32;
pub mod kernels;
pub mod limits;
pub mod mask_check;
pub mod metrics;
pub mod model;
#[cfg(feature = "clinical")]
pub mod nifti;
#[cfg(feature = "pytorch")]
pub mod pickle_guard;
pub mod preprocess;
pub mod prompts;
pub mod render;
pub mod segmenter;
pub mod share;
pub mod slice;
pub mod stats;
pub mod synthetic;
pub mod tokenize;
#[cfg(feature = "train")]
pub mod train;
pub mod weights;
pub mod window;

pub use burn;
pub use config::{ClipSegConfig, PreprocessConfig};
pub use error::{Error, Result};
pub use model::{Arch, BiomedClipSeg, ClipSeg, Conditioning, Cris, Encoded, Model};
pub use segmenter::{
    EmbeddedPrompts, EncodedImage, Logits, ModelConfig, ModelFiles, Pipeline, Precision, Segmenter,
};
pub use tokenize::{PromptTokenizer, TokenizedPrompt};
pub use weights::Weights;
