//! CRIS's FPN neck (medvlsm `cris_model/layers.py` `FPN`): C5 gated by the projected
//! sentence state, fused with C4 and C3 at C4's resolution, aggregated, then a CoordConv.
//! Every `conv_layer` is Conv (no bias) + BatchNorm + ReLU; every ×2 upsampling is
//! `F.interpolate(bilinear, align_corners=False)`.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::module::{avg_pool2d, interpolate};
use burn::tensor::ops::{AvgPoolOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, activation};

use crate::error::Result;
use crate::model::cris::resnet::{BatchNorm, ConvBn, ImageFeatures};
use crate::model::layers::{NamedTensor, export_linear, linear};
use crate::weights::Weights;

/// `conv_layer`: ConvBn then ReLU, keys `{prefix}.0` (conv) and `{prefix}.1` (BN).
#[derive(Module, Debug)]
pub struct ConvLayer {
    pub conv: ConvBn,
}

impl ConvLayer {
    pub fn load(
        w: &Weights,
        prefix: &str,
        [c_in, c_out, k]: [usize; 3],
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            conv: ConvBn::load(
                w,
                &format!("{prefix}.0"),
                &format!("{prefix}.1"),
                [c_in, c_out, k],
                1,
                device,
            )?,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        activation::relu(self.conv.forward(x))
    }

    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        self.conv
            .export(&format!("{prefix}.0"), &format!("{prefix}.1"), out)
    }
}

/// `F.interpolate(x, scale_factor=2, mode="bilinear")` (align_corners False).
pub fn upsample2(x: Tensor<4>) -> Tensor<4> {
    let [_, _, h, w] = x.dims();
    interpolate(
        x,
        InterpolateOptions::new(InterpolateMode::Bilinear)
            .with_align_corners(false)
            .with_output_size([2 * h, 2 * w]),
    )
}

/// Appends CoordConv's two channels: x then y, each `linspace(-1, 1)` (x along the width).
pub fn add_coords(x: Tensor<4>) -> Tensor<4> {
    let [b, _, h, w] = x.dims();
    let device = x.device();
    let line = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| {
                if n == 1 {
                    -1.0
                } else {
                    -1.0 + 2.0 * i as f32 / (n - 1) as f32
                }
            })
            .collect()
    };
    let (xs, ys) = (line(w), line(h));
    let mut coords = Vec::with_capacity(2 * h * w);
    coords.extend((0..h).flat_map(|_| xs.iter().copied()));
    coords.extend(ys.iter().flat_map(|&y| std::iter::repeat_n(y, w)));
    let coords =
        Tensor::<4>::from_data(burn::tensor::TensorData::new(coords, [1, 2, h, w]), &device)
            .cast(x.dtype())
            .repeat_dim(0, b);
    Tensor::cat(vec![x, coords], 1)
}

/// The neck's sizes: `fpn_in` (C3, C4, C5 widths) and `fpn_out`, as medvlsm's arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct NeckConfig {
    pub fpn_in: [usize; 3],
    pub fpn_out: [usize; 3],
    /// Width of the sentence state (the text projection's output).
    pub state_dim: usize,
}

#[derive(Module, Debug)]
pub struct Neck {
    /// `txt_proj`: Linear (no bias) → BatchNorm1d → ReLU.
    pub txt_proj: Linear,
    pub txt_norm: BatchNorm,
    pub f1_v_proj: ConvLayer,
    pub norm_layer: BatchNorm,
    pub f2_v_proj: ConvLayer,
    pub f2_cat: ConvLayer,
    pub f3_v_proj: ConvLayer,
    pub f3_cat: ConvLayer,
    pub f4_proj5: ConvLayer,
    pub f4_proj4: ConvLayer,
    pub f4_proj3: ConvLayer,
    pub aggr: ConvLayer,
    pub coord: ConvLayer,
    pub coord_out: ConvLayer,
}

/// The neck's intermediate maps, for parity checks.
#[derive(Debug, Clone)]
pub struct NeckTrace {
    pub state_proj: Tensor<2>,
    pub f5: Tensor<4>,
    pub f4: Tensor<4>,
    pub f3: Tensor<4>,
    pub aggr: Tensor<4>,
    pub output: Tensor<4>,
}

impl Neck {
    pub fn load(w: &Weights, prefix: &str, cfg: &NeckConfig, device: &Device) -> Result<Self> {
        let [i3, i4, i5] = cfg.fpn_in;
        let [o3, o4, o5] = cfg.fpn_out;
        let cl = |name: &str, shape| ConvLayer::load(w, &format!("{prefix}.{name}"), shape, device);
        Ok(Self {
            txt_proj: linear(
                w,
                &format!("{prefix}.txt_proj.0"),
                cfg.state_dim,
                o5,
                false,
                device,
            )?,
            txt_norm: BatchNorm::load(w, &format!("{prefix}.txt_proj.1"), o5, device)?,
            f1_v_proj: cl("f1_v_proj", [i5, o5, 1])?,
            norm_layer: BatchNorm::load(w, &format!("{prefix}.norm_layer.0"), o5, device)?,
            f2_v_proj: cl("f2_v_proj", [i4, o4, 3])?,
            f2_cat: cl("f2_cat", [o5 + o4, o4, 1])?,
            f3_v_proj: cl("f3_v_proj", [i3, o3, 3])?,
            f3_cat: cl("f3_cat", [o3 + o4, o4, 1])?,
            f4_proj5: cl("f4_proj5", [o5, o4, 3])?,
            f4_proj4: cl("f4_proj4", [o4, o4, 3])?,
            f4_proj3: cl("f4_proj3", [o4, o4, 3])?,
            aggr: cl("aggr", [3 * o4, o4, 1])?,
            coord: cl("coordconv.0.conv1", [o4 + 2, o4, 3])?,
            coord_out: cl("coordconv.1", [o4, o4, 3])?,
        })
    }

    /// medvlsm's keys under `prefix` (`neck`).
    pub fn export(&self, prefix: &str, out: &mut Vec<NamedTensor>) -> Result<()> {
        let key = |name: &str| format!("{prefix}.{name}");
        export_linear(out, &key("txt_proj.0"), &self.txt_proj)?;
        self.txt_norm.export(&key("txt_proj.1"), out)?;
        self.norm_layer.export(&key("norm_layer.0"), out)?;
        for (name, layer) in [
            ("f1_v_proj", &self.f1_v_proj),
            ("f2_v_proj", &self.f2_v_proj),
            ("f2_cat", &self.f2_cat),
            ("f3_v_proj", &self.f3_v_proj),
            ("f3_cat", &self.f3_cat),
            ("f4_proj5", &self.f4_proj5),
            ("f4_proj4", &self.f4_proj4),
            ("f4_proj3", &self.f4_proj3),
            ("aggr", &self.aggr),
            ("coordconv.0.conv1", &self.coord),
            ("coordconv.1", &self.coord_out),
        ] {
            layer.export(&key(name), out)?;
        }
        Ok(())
    }

    /// The fused map `[P, fpn_out[1], h4, w4]` for image features (batch 1, or one per
    /// prompt) and sentence states `[P, state_dim]`.
    pub fn forward(&self, image: &ImageFeatures, state: Tensor<2>) -> NeckTrace {
        let [p, _] = state.dims();
        let batch = |t: &Tensor<4>| {
            if t.dims()[0] == 1 && p > 1 {
                t.clone().repeat_dim(0, p)
            } else {
                t.clone()
            }
        };
        // The projections of C3, C4 and C5 do not depend on the prompt: computed once per
        // image, then shared by its prompts.
        let v5 = batch(&self.f1_v_proj.forward(image.c5.clone()));
        let v4 = batch(&self.f2_v_proj.forward(image.c4.clone()));
        let v3 = batch(&avg_pool2d(
            self.f3_v_proj.forward(image.c3.clone()),
            AvgPoolOptions::new([2, 2]),
        ));
        let s = self.txt_proj.forward(state);
        let d = s.dims()[1];
        let s = activation::relu(self.txt_norm.forward(s.reshape([p, d, 1, 1])));
        let state_proj = s.clone().reshape([p, d]);
        let f5 = activation::relu(self.norm_layer.forward(v5 * s));
        let f4 = self
            .f2_cat
            .forward(Tensor::cat(vec![v4, upsample2(f5.clone())], 1));
        let f3 = self.f3_cat.forward(Tensor::cat(vec![v3, f4.clone()], 1));
        let fq5 = upsample2(self.f4_proj5.forward(f5.clone()));
        let fq4 = self.f4_proj4.forward(f4.clone());
        let fq3 = self.f4_proj3.forward(f3.clone());
        let aggr = self.aggr.forward(Tensor::cat(vec![fq3, fq4, fq5], 1));
        let output = self
            .coord_out
            .forward(self.coord.forward(add_coords(aggr.clone())));
        NeckTrace {
            state_proj,
            f5,
            f4,
            f3,
            aggr,
            output,
        }
    }
}
