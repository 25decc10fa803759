//! CRIS (Wang et al., CVPR 2022) as medvlsm runs it: CLIP's ModifiedResNet RN50 with CRIS's
//! attention pool, the CLIP text transformer, an FPN neck with text gating, a
//! vision-language decoder and a projector with a per-sample dynamic kernel. Keys as
//! medvlsm's `cris.pt` (`backbone.*`, `neck.*`, `decoder.*`, `proj.*`).
//!
//! Built so far: the image backbone ([`resnet`]), checked against medvlsm's C3/C4/C5, and the
//! text tower (CLIP's, loaded from OpenAI's layout by
//! [`crate::model::clip::TextTransformer::load_openai`]), checked against its word features
//! and sentence state, and the FPN neck ([`neck`]), checked map by map. The decoder and
//! projector, and the wiring into [`crate::model::Model`], are still to come; until then
//! CRIS checkpoints are not loadable from the CLI.

pub mod neck;
pub mod resnet;

pub use neck::{Neck, NeckConfig};
pub use resnet::{ModifiedResNet, ResNetConfig};
