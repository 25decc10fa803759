//! Model architectures, one per file or folder.

pub mod clip;
pub mod clipseg;
pub mod layers;

pub use clipseg::{ClipSeg, ImageFeatures};
