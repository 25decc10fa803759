//! The CLIP towers CLIPSeg is built on.

pub mod text;
pub mod vision;

pub use text::TextTransformer;
pub use vision::VisionTransformer;
