//! CPU fast paths, for burn's flex backend, where its generic kernels are slow: attention with
//! a vectorised softmax (flex's scalar one took a fifth of CLIPSeg's image encoding), and
//! QuickGELU in one pass instead of three.
//!
//! Each takes burn tensors and falls back to burn's own ops on every other device (WebGPU,
//! CUDA, an autodiff device when training) and dtype, so burn's path stays the reference and
//! the backend-agnostic one. The arithmetic is the same everywhere (no fused multiply-adds,
//! sums in a fixed order), so the page's CPU backend (wasm) and native builds agree.

use burn::nn::Linear;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor, TensorData, activation};
use burn_flex::{Flex, FlexTensor, Layout};

use crate::model::layers::PatchConvTranspose;

/// `exp` for f32, branch-free so loops over it vectorise: 2ⁿ·p(r) with r = x − n·ln 2 in
/// [−ln 2 / 2, ln 2 / 2] and Cephes' degree-5 polynomial (error ≈ 1 ulp). Inputs are clamped
/// to f32's normal range: below −87.3 it returns 1.2e-38 rather than a denormal or 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without `round()`,
    // which plain x86-64 (SSE2) cannot vectorise.
    const ROUND: f32 = 12_582_912.0;
    // Comparisons rather than `clamp`/`max`, whose NaN rules keep loops scalar.
    let x = if x < -87.336_54 { -87.336_54 } else { x };
    let x = if x > 88.376_26 { 88.376_26 } else { x };
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, read from t's mantissa (t and ROUND share an exponent, one unit per
    // ulp), since a float-to-int cast keeps the loop scalar.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits((n_int.wrapping_add(127) as u32) << 23)
}

/// The tensor's flex primitive, when it is an f32 tensor on the flex device without
/// autodiff (the only case the fast paths handle).
fn flex_f32<const D: usize>(t: &Tensor<D>) -> Option<FlexTensor> {
    if t.dtype() != DType::F32 || t.device().is_autodiff() {
        return None;
    }
    t.clone().try_into_primitive::<Flex>().ok()
}

/// CLIP's QuickGELU, `x · sigmoid(1.702 x)`.
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let Some(t) = flex_f32(&x) else {
        return x.clone() * activation::sigmoid(x * 1.702);
    };
    drop(x);
    let mut t = if t.is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    };
    quick_gelu_in_place(t.storage_mut::<f32>());
    Tensor::from_primitive::<Flex>(t)
}

/// Runs `$body` (an expression over the listed arguments) compiled for AVX-512 or AVX2 when
/// the CPU has them, for SIMD128 in wasm, else for the build's baseline. Only the vector width changes: Rust
/// never fuses a multiply and an add by itself, so every path rounds alike.
macro_rules! widest_simd {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        widest_simd!($name($($arg: $ty),*) -> () $body);
    };
    ($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret { body($($arg),*) }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret { body($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    return unsafe { avx2($($arg),*) };
                }
            }
            // The page's module already needs SIMD128 (the GEMM under flex uses it), so
            // browsers that run it have it.
            #[cfg(target_arch = "wasm32")]
            {
                #[target_feature(enable = "simd128")]
                fn simd128($($arg: $ty),*) -> $ret { body($($arg),*) }
                return simd128($($arg),*);
            }
            #[allow(unreachable_code)]
            body($($arg),*)
        }
    };
}

// After `widest_simd!`, which it uses.
#[cfg(feature = "train")]
mod autodiff;

widest_simd!(quick_gelu_in_place(values: &mut [f32]) {
    // sigmoid(z) = 1 / (1 + e^−z), which is exact enough at both ends: e^−z clamps at
    // e^87, so large negative z give ≈ 0 and large positive ones 1.
    for v in values {
        *v = *v / (1.0 + exp_f32(-1.702 * *v));
    }
});

/// The GEMM's thread use: all threads for large products (natively), one otherwise.
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    #[cfg(not(target_arch = "wasm32"))]
    if m * n * k >= 192 * 192 * 192 {
        return gemm::Parallelism::Rayon(0);
    }
    let _ = (m, n, k);
    gemm::Parallelism::None
}

/// A `[..., d]` tensor as rows: the storage, the first element and the row stride (the
/// last dimension is contiguous), or `None` when its leading dimensions do not merge.
fn rows_of(t: &FlexTensor) -> Option<(&[f32], usize, usize)> {
    let layout = t.layout();
    let (shape, strides) = (layout.shape(), layout.strides());
    let n = shape.num_dims();
    if strides[n - 1] != 1 {
        return None;
    }
    let row = if n >= 2 {
        strides[n - 2]
    } else {
        shape[0] as isize
    };
    // Each leading dimension must step over whole rows of the ones inside it (a dimension
    // of size 1 has no step to check).
    let mut expected = row * if n >= 2 { shape[n - 2] as isize } else { 1 };
    for i in (0..n.saturating_sub(2)).rev() {
        if shape[i] > 1 && strides[i] != expected {
            return None;
        }
        expected *= shape[i] as isize;
    }
    (row >= shape[n - 1] as isize)
        .then(|| (t.storage::<f32>(), layout.start_offset(), row as usize))
}

/// What a flex fast path needs from a `Linear`: its `[d_in, d_out]` weight (f32, or bf16
/// where [`linears_to_bf16`] stored it so) and its bias.
struct FlexLinear {
    weight: FlexTensor,
    bias: Option<FlexTensor>,
    d_in: usize,
    d_out: usize,
}

impl FlexLinear {
    fn of(layer: &Linear) -> Option<Self> {
        let weight = layer.weight.val();
        let [d_in, d_out] = weight.dims();
        if weight.device().is_autodiff() {
            return None;
        }
        let bf16 = weight.dtype() == DType::BF16 && crate::gemm_bf16::available();
        if weight.dtype() != DType::F32 && !bf16 {
            return None;
        }
        let weight = weight.try_into_primitive::<Flex>().ok()?;
        if !weight.is_contiguous() || weight.layout().start_offset() != 0 {
            return None;
        }
        let bias = match &layer.bias {
            Some(b) => {
                let b = flex_f32(&b.val())?;
                if !b.is_contiguous() || b.layout().start_offset() != 0 {
                    return None;
                }
                Some(b)
            }
            None => None,
        };
        Some(FlexLinear {
            weight,
            bias,
            d_in,
            d_out,
        })
    }

    fn in_bf16(&self) -> bool {
        self.weight.dtype() == DType::BF16
    }

    /// `out[r] = bias + x[r] · W` for `rows` rows of `x` (row stride `x_rs`), into `out`
    /// (row stride `d_out`): the bias is the GEMM's starting value, not a second pass. An
    /// f32 weight runs vlsm's fixed-order kernel with `fixed_order`, else the gemm crate.
    ///
    /// # Safety
    /// `x` points at `rows` rows of `d_in` values `x_rs` apart; `out` holds `rows · d_out`.
    unsafe fn apply(
        &self,
        x: *const f32,
        x_rs: usize,
        rows: usize,
        out: &mut [f32],
        fixed_order: bool,
    ) {
        let bias = self.bias.as_ref().map(|b| b.storage::<f32>());
        if self.in_bf16() {
            if rows == 0 {
                return;
            }
            // SAFETY: as documented.
            let x = unsafe { std::slice::from_raw_parts(x, (rows - 1) * x_rs + self.d_in) };
            let parallel = !matches!(
                parallelism(rows, self.d_out, self.d_in),
                gemm::Parallelism::None
            );
            crate::gemm_bf16::gemm(
                x,
                x_rs,
                rows,
                self.d_in,
                self.weight.storage::<half::bf16>(),
                self.d_out,
                bias,
                out,
                parallel,
            );
            return;
        }
        let weight = self.weight.storage::<f32>();
        if fixed_order && rows > 0 {
            // SAFETY: as documented.
            let x = unsafe { std::slice::from_raw_parts(x, (rows - 1) * x_rs + self.d_in) };
            let parallel = !matches!(
                parallelism(rows, self.d_out, self.d_in),
                gemm::Parallelism::None
            );
            let (k, n) = (self.d_in, self.d_out);
            crate::gemm_f32::gemm(x, x_rs, rows, k, weight, n, bias, out, parallel);
            return;
        }
        if let Some(bias) = bias {
            for row in out.chunks_exact_mut(self.d_out) {
                row.copy_from_slice(bias);
            }
        }
        // SAFETY: as documented; the weight is contiguous [d_in, d_out].
        unsafe {
            gemm::gemm(
                rows,
                self.d_out,
                self.d_in,
                out.as_mut_ptr(),
                1,
                self.d_out as isize,
                bias.is_some(),
                x,
                1,
                x_rs as isize,
                weight.as_ptr(),
                1,
                self.d_out as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(rows, self.d_out, self.d_in),
            );
        }
    }
}

/// How a `[..., d]` input runs through a linear: as `samples` products of `rows` rows each,
/// and with which f32 kernel.
struct Products {
    samples: usize,
    rows: usize,
    /// vlsm's fixed-order f32 kernel ([`crate::gemm_f32`]) rather than the gemm crate's.
    fixed_order: bool,
}

/// Samples (the first dimension, for three or more) and rows per sample of a `[..., d]`
/// shape. The kernels run one GEMM per sample, so a sample's result does not depend on what
/// it is batched with (the gemm crate's blocking, and so its rounding, follows the row
/// count).
///
/// Short samples (at most [`SHORT_ROWS`] rows: a prompt's tokens in every text encoder) run
/// vlsm's fixed-order kernel where the CPU has it, in f32 as in bf16: its sums do not depend
/// on the row count, so such samples are run together, up to [`GROUP_ROWS`] rows a
/// product, and each weight is streamed from memory once for all of them rather than once
/// per prompt. A text encoder's linears are memory-bound on one prompt's few rows. The
/// choice depends only on a sample's own row count, so a prompt takes the same kernel
/// alone and in any batch. bf16 groups samples of any length.
fn products(dims: &[usize], bf16: bool) -> Products {
    let rows = |d: &[usize]| d.iter().product::<usize>();
    let (samples, rows) = match dims.len() {
        0 | 1 => (1, 1),
        2 => (1, dims[0]),
        n => (dims[0], rows(&dims[1..n - 1])),
    };
    let fixed_order = !bf16 && rows <= SHORT_ROWS && crate::gemm_f32::available();
    if !(bf16 || fixed_order) || rows == 0 {
        return Products {
            samples,
            rows,
            fixed_order,
        };
    }
    let most = (GROUP_ROWS / rows).max(1);
    let group = (1..=most.min(samples))
        .rev()
        .find(|g| samples.is_multiple_of(*g))
        .unwrap_or(1);
    Products {
        samples: samples / group,
        rows: rows * group,
        fixed_order,
    }
}

/// The most rows one product takes when it groups samples: the activations of that many rows
/// stay in cache while every column strip passes over them (a whole batch of images' tokens
/// at once ran 2.3× slower in bf16).
const GROUP_ROWS: usize = 512;

/// The longest sample that runs the fixed-order f32 kernel: every text encoder's prompts
/// (CLIP's 77 tokens, BiomedCLIP's BERT 256). Image tokens (CLIPSeg's 485) keep the gemm
/// crate, which is faster on their tall products.
const SHORT_ROWS: usize = 256;

/// `layer.forward(x)` with the bias added inside the GEMM on flex, and in bf16 where the
/// weight is stored so.
pub fn linear<const D: usize>(x: Tensor<D>, layer: &Linear) -> Tensor<D> {
    let (Some(fx), Some(fl)) = (flex_f32(&x), FlexLinear::of(layer)) else {
        return burn_linear(x, layer);
    };
    let dims = x.dims();
    if dims[D - 1] != fl.d_in {
        return burn_linear(x, layer);
    }
    drop(x);
    let fx = match rows_of(&fx) {
        Some(_) => fx,
        None => fx.to_contiguous(),
    };
    let (data, offset, x_rs) = rows_of(&fx).expect("a contiguous tensor has rows");
    let Products {
        samples,
        rows,
        fixed_order,
    } = products(&dims, fl.in_bf16());
    let mut out = vec![0f32; samples * rows * fl.d_out];
    for (i, out) in out.chunks_exact_mut((rows * fl.d_out).max(1)).enumerate() {
        let x = data[offset + i * rows * x_rs..].as_ptr();
        // SAFETY: `rows_of` describes samples × rows rows of d_in values inside `data`.
        unsafe { fl.apply(x, x_rs, rows, out, fixed_order) };
    }
    let mut shape = dims;
    shape[D - 1] = fl.d_out;
    Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(out, shape)))
}

/// burn's `Linear::forward`, with a bf16-stored weight put back in row-major order and
/// widened to the input's dtype first: the path wherever vlsm's bf16 kernel does not run.
pub fn burn_linear<const D: usize>(x: Tensor<D>, layer: &Linear) -> Tensor<D> {
    if !stored_in_bf16(layer) {
        return layer.forward(x);
    }
    let dtype = x.dtype();
    burn::tensor::module::linear(
        x,
        bf16_weight_values(layer).cast(dtype),
        layer.bias.as_ref().map(|b| b.val().cast(dtype)),
    )
}

/// Whether the layer's weight is stored in bf16 (by [`linears_to_bf16`]).
pub fn stored_in_bf16(layer: &Linear) -> bool {
    layer.weight.val().dtype() == DType::BF16
}

/// A bf16-stored weight ([`linear_to_bf16`]) as an ordinary row-major f32 `[d_in, d_out]`
/// tensor (for burn's ops and for export).
pub fn bf16_weight_values(layer: &Linear) -> Tensor<2> {
    let weight = layer.weight.val();
    let [k, n] = weight.dims();
    let device = weight.device();
    let stored = weight
        .into_data()
        .convert::<half::bf16>()
        .try_into_vec::<half::bf16>()
        .expect("a bf16 weight");
    let values = crate::gemm_bf16::unstore(&stored, k, n);
    Tensor::from_data(TensorData::new(values, [k, n]), &device)
}

/// A linear with its weight stored in bf16 in the bf16 GEMM's order
/// ([`crate::gemm_bf16::in_stored_order`], rounded); the bias stays f32.
pub fn linear_to_bf16(mut layer: Linear) -> Linear {
    layer.weight = layer.weight.map(weight_to_bf16);
    layer
}

fn weight_to_bf16<const D: usize>(w: Tensor<D>) -> Tensor<D> {
    let dims = w.dims();
    let device = w.device();
    let values = w
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("an f32 weight");
    let ordered = crate::gemm_bf16::in_stored_order(&values, dims[0], dims[1]);
    Tensor::<D>::from_data(TensorData::new(ordered, dims), &device).cast(DType::BF16)
}

/// The weights of the linears inside attention and MLP blocks (q/k/v/out projections, fc1,
/// fc2: most of a transformer's arithmetic and parameters) stored in bf16, for inference
/// on a CPU with AVX-512 BF16: linears then run in bf16 with f32 sums ([`crate::gemm_bf16`]),
/// while embeddings, norms, biases, attention products and softmax stay f32.
pub fn linears_to_bf16<M: burn::module::Module>(module: M) -> M {
    module.map(&mut Bf16Linears { path: Vec::new() })
}

/// Walks a module keeping `(field, container type)` of each level, as burn reports them.
struct Bf16Linears {
    path: Vec<(String, String)>,
}

impl burn::module::ModuleMapper for Bf16Linears {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<D>>,
    ) -> burn::module::Param<Tensor<D>> {
        // ... → SelfAttention.{q,k,v,out}_proj or Mlp.fc{1,2} → Linear.weight
        let n = self.path.len();
        let in_block_linear = n >= 2
            && self.path[n - 1] == ("weight".to_string(), "Struct:Linear".to_string())
            && matches!(
                self.path[n - 2].1.as_str(),
                "Struct:SelfAttention" | "Struct:Mlp"
            );
        if D == 2 && in_block_linear && param.val().dtype() == DType::F32 {
            param.map(weight_to_bf16)
        } else {
            param
        }
    }
}

/// `fc2(act(fc1(x)))` on flex, `act` ReLU or QuickGELU, in blocks of rows when the hidden
/// activations would not stay in cache (so the `[rows, hidden]` tensor is never written
/// out whole); `None` where the fast path does not apply.
pub fn mlp<const D: usize>(
    x: &Tensor<D>,
    fc1: &Linear,
    fc2: &Linear,
    quick_gelu: bool,
) -> Option<Tensor<D>> {
    let fx = flex_f32(x)?;
    let (l1, l2) = (FlexLinear::of(fc1)?, FlexLinear::of(fc2)?);
    let dims = x.dims();
    if dims[D - 1] != l1.d_in || l2.d_in != l1.d_out {
        return None;
    }
    let fx = match rows_of(&fx) {
        Some(_) => fx,
        None => fx.to_contiguous(),
    };
    let (data, offset, x_rs) = rows_of(&fx)?;
    let Products {
        samples,
        rows,
        fixed_order,
    } = products(&dims, l1.in_bf16() && l2.in_bf16());
    let hidden = l1.d_out;
    // Blocks of rows whose hidden activations fit in ~1 MiB; large weights (re-packed by
    // the GEMM on each call) go in one block.
    let weight_bytes = 4 * l1.d_in * hidden;
    let block = if weight_bytes <= 1 << 20 {
        ((1 << 18) / hidden).clamp(16, rows.max(16))
    } else {
        rows.max(1)
    };
    let mut out = vec![0f32; samples * rows * l2.d_out];
    let mut h = vec![0f32; block.min(rows.max(1)) * hidden];
    let starts = (0..samples).flat_map(|i| (0..rows).step_by(block).map(move |r| (i * rows, r)));
    for (first, r) in starts {
        let (start, n) = (first + r, block.min(rows - r));
        let h = &mut h[..n * hidden];
        // SAFETY: rows start..start+n of `x` lie inside `data`; `h` holds n × hidden.
        unsafe {
            l1.apply(
                data[offset + start * x_rs..].as_ptr(),
                x_rs,
                n,
                h,
                fixed_order,
            )
        };
        if quick_gelu {
            quick_gelu_in_place(h);
        } else {
            relu_in_place(h);
        }
        let out = &mut out[start * l2.d_out..(start + n) * l2.d_out];
        // SAFETY: `h` holds n rows of hidden values.
        unsafe { l2.apply(h.as_ptr(), hidden, n, out, fixed_order) };
    }
    let mut shape = dims;
    shape[D - 1] = l2.d_out;
    Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(
        TensorData::new(out, shape),
    )))
}

/// `dst (m × n, rows n apart) = alpha · a · b`, with a `m × k` and b `k × n` given as
/// (values, column stride, row stride); one thread.
fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (a, a_cs, a_rs): (&[f32], usize, usize),
    (b, b_cs, b_rs): (&[f32], usize, usize),
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, cs: usize, rs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        dst.len() >= m * n
            && (k == 0 || (a.len() > last(m, k, a_cs, a_rs) && b.len() > last(k, n, b_cs, b_rs))),
        "product: operands out of bounds"
    );
    // SAFETY: every element the strides address is in bounds (checked above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A flex tensor's values in row-major order (copied only when its layout is not).
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The first `n` values of a contiguous flex tensor.
fn values_of(t: &FlexTensor, n: usize) -> Option<&[f32]> {
    t.storage::<f32>()
        .get(t.layout().start_offset()..)?
        .get(..n)
}

/// CLIPSeg's refined head after its 3×3 convolution: `second(relu(first(x)))` for two
/// [`PatchConvTranspose`]s, `[P, C, g, g]` → `[P, C₂, g·k₁·k₂, g·k₁·k₂]`. Each input pixel
/// paints a k₁·k₂ block of its own, so the whole chain runs pixel by pixel: `first` as one
/// GEMM per prompt, then bias, ReLU and `second` on each pixel's row, written straight to
/// the output. burn's composition instead permutes the P × C₁ × (g·k₁)² intermediate twice
/// and adds each bias in a pass of its own. A prompt's result does not depend on the others
/// in the batch.
pub fn patch_conv_transpose_pair(
    x: &Tensor<4>,
    first: &PatchConvTranspose,
    second: &PatchConvTranspose,
) -> Option<Tensor<4>> {
    let [prompts, c_in, h, w] = x.dims();
    let (c_mid, k1, c_out, k2) = (
        first.out_channels,
        first.kernel,
        second.out_channels,
        second.kernel,
    );
    let (n1, n2) = (c_mid * k1 * k1, c_out * k2 * k2);
    if first.weight.dims() != [c_in, n1]
        || second.weight.dims() != [c_mid, n2]
        || first.bias.dims() != [c_mid]
        || second.bias.dims() != [c_out]
    {
        return None;
    }
    let x = contiguous(flex_f32(x)?);
    let [w1, b1, w2, b2] = [
        flex_f32(&first.weight.val())?,
        flex_f32(&first.bias.val())?,
        flex_f32(&second.weight.val())?,
        flex_f32(&second.bias.val())?,
    ]
    .map(contiguous);
    let pixels = h * w;
    let x = values_of(&x, prompts * c_in * pixels)?;
    let (w1, b1) = (values_of(&w1, c_in * n1)?, values_of(&b1, c_mid)?);
    let (w2, b2) = (values_of(&w2, c_mid * n2)?, values_of(&b2, c_out)?);
    let padded = n2.next_multiple_of(16);
    let w2: Vec<f32> = w2
        .chunks_exact(n2)
        .flat_map(|row| {
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(0.0, padded - n2))
        })
        .collect();
    let w2 = &w2[..];
    let (side_h, side_w) = (h * k1 * k2, w * k1 * k2);
    let plane = side_h * side_w;
    let mut out = vec![0f32; prompts * c_out * plane];
    let prompt = |(p, out): (usize, &mut [f32])| {
        // The prompt's pixels as rows, [g², C], for `first`'s GEMM.
        let mut rows = vec![0f32; pixels * c_in];
        for c in 0..c_in {
            let channel = &x[(p * c_in + c) * pixels..][..pixels];
            for (q, &v) in channel.iter().enumerate() {
                rows[q * c_in + c] = v;
            }
        }
        let mut mid = vec![0f32; pixels * n1];
        product(
            (pixels, n1, c_in),
            &mut mid,
            (&rows, 1, c_in),
            (w1, 1, n1),
            1.0,
        );
        let shape = PatchPairShape {
            w,
            k1,
            k2,
            c_mid,
            side_w,
        };
        paint_patches(&mid, &shape, (b1, w2, b2), out);
    };
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(c_out * plane)
            .enumerate()
            .for_each(prompt);
    }
    #[cfg(target_arch = "wasm32")]
    out.chunks_mut(c_out * plane).enumerate().for_each(prompt);
    Some(Tensor::from_primitive::<Flex>(FlexTensor::from_data(
        TensorData::new(out, [prompts, c_out, side_h, side_w]),
    )))
}

/// Sizes [`paint_patches`] needs: the input grid's width, both kernels, `first`'s channels
/// and the output's width.
struct PatchPairShape {
    w: usize,
    k1: usize,
    k2: usize,
    c_mid: usize,
    side_w: usize,
}

widest_simd!(paint_patches(
    mid: &[f32],
    s: &PatchPairShape,
    weights: (&[f32], &[f32], &[f32]),
    out: &mut [f32]
) {
    let (b1, w2, b2) = weights;
    let (k1, k2) = (s.k1, s.k2);
    let n1 = s.c_mid * k1 * k1;
    // `w2`'s rows are padded with zeros to whole blocks of 16.
    let padded = w2.len() / s.c_mid;
    let plane = out.len() / b2.len();
    // `first`'s bias laid out as its output row: channel o at o·k₁² + a·k₁ + b.
    let bias1: Vec<f32> = b1
        .iter()
        .flat_map(|&b| std::iter::repeat_n(b, k1 * k1))
        .collect();
    let (mut u, mut acc) = (vec![0f32; n1], vec![0f32; b2.len() * k2 * k2]);
    for (q, row) in mid.chunks_exact(n1).enumerate() {
        let (i, j) = (q / s.w, q % s.w);
        for ((u, &x), &b) in u.iter_mut().zip(row).zip(&bias1) {
            *u = (x + b).max(0.0);
        }
        for (a, b) in (0..k1).flat_map(|a| (0..k1).map(move |b| (a, b))) {
            // `second`'s sums over `first`'s channels at sub-pixel (a, b), 16 outputs at a
            // time in a register-sized block.
            let sub = a * k1 + b;
            for (c, acc) in acc.chunks_mut(16).enumerate() {
                let mut block = [0f32; 16];
                for (o, w2) in w2.chunks_exact(padded).enumerate() {
                    let u = u[o * k1 * k1 + sub];
                    for (sum, &w2) in block.iter_mut().zip(&w2[c * 16..][..16]) {
                        *sum += u * w2;
                    }
                }
                acc.copy_from_slice(&block[..acc.len()]);
            }
            let (top, left) = ((i * k1 + a) * k2, (j * k1 + b) * k2);
            for (o2, block) in acc.chunks_exact(k2 * k2).enumerate() {
                for (a2, line) in block.chunks_exact(k2).enumerate() {
                    let start = o2 * plane + (top + a2) * s.side_w + left;
                    for (dst, &v) in out[start..start + k2].iter_mut().zip(line) {
                        *dst = v + b2[o2];
                    }
                }
            }
        }
    }
});

widest_simd!(relu_in_place(values: &mut [f32]) {
    for v in values {
        *v = if *v > 0.0 { *v } else { 0.0 };
    }
});

/// Scaled dot-product attention, `softmax(q·kᵀ / √d + mask) · v`, for `[B, H, L, d]`
/// tensors; `key_mask` `[B, H, Lq, Lk]` is true where a key is ignored, `causal` ignores keys
/// after the query. The same kernel runs with and without padding, so a prompt's result does
/// not depend on whether it was batched with longer ones.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_mask: Option<Tensor<4, Bool>>,
    causal: bool,
) -> Tensor<4> {
    let options = AttentionModuleOptions {
        scale: None, // 1/sqrt(head_dim), as CLIP
        softcap: None,
        is_causal: causal,
    };
    let [b, h, lq, d] = q.dims();
    let lk = v.dims()[2];
    let mask_fits = key_mask.as_ref().is_none_or(|m| m.dims() == [b, h, lq, lk]);
    if lk == 0 || k.dims() != [b, h, lk, d] || v.dims()[..2] != [b, h] || !mask_fits {
        return burn_attention(q, k, v, key_mask, None, options);
    }
    // Training on the CPU: the same kernel, with its own backward pass.
    #[cfg(feature = "train")]
    if let Some(out) = autodiff::attention(&q, &k, &v, key_mask.as_ref(), causal) {
        return out;
    }
    // Some(None): no mask; None: a mask this path cannot read.
    let fmask = match &key_mask {
        None => Some(None),
        Some(m) => m.clone().try_into_primitive::<Flex>().ok().map(Some),
    };
    let (Some(fq), Some(fk), Some(fv), Some(fmask)) =
        (flex_f32(&q), flex_f32(&k), flex_f32(&v), fmask)
    else {
        return burn_attention(q, k, v, key_mask, None, options);
    };
    drop((q, k, v, key_mask));
    Tensor::from_primitive::<Flex>(flex_attention(&fq, &fk, &fv, fmask.as_ref(), causal))
}

/// [`attention`] on flex tensors whose shapes were checked: q `[B, H, Lq, d]`, k `[B, H, Lk,
/// d]`, v `[B, H, Lk, dv]`, the mask `[B, H, Lq, Lk]` (any strides).
fn flex_attention(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    mask: Option<&FlexTensor>,
    causal: bool,
) -> FlexTensor {
    let [b, h, lq, d] = dims4(q);
    let [_, _, lk, dv] = dims4(v);
    let out = FlexAttention {
        q: View::new(q.storage::<f32>(), q),
        k: View::new(k.storage::<f32>(), k),
        v: View::new(v.storage::<f32>(), v),
        mask: mask.map(|m| View::new(m.storage::<u8>(), m)),
        heads: h,
        lq,
        lk,
        d,
        dv,
        causal,
    }
    .run(b);
    // Written as [B, Lq, H, dv] (what the caller reshapes to [B, Lq, H·dv]), viewed as
    // [B, H, Lq, dv].
    FlexTensor::from_data(TensorData::new(out, [b * lq * h * dv])).with_layout(Layout::new(
        [b, h, lq, dv].into(),
        vec![(lq * h * dv) as isize, dv as isize, (h * dv) as isize, 1],
        0,
    ))
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.layout().shape();
    [shape[0], shape[1], shape[2], shape[3]]
}

/// A strided 4-D view of a flex tensor's storage: `[B, H, L, d]` values (f32), or a
/// `[B, H, Lq, Lk]` mask (flex stores bools as bytes).
struct View<'a, E> {
    data: &'a [E],
    offset: usize,
    strides: [isize; 4],
}

impl<'a, E> View<'a, E> {
    /// `data`: `t`'s storage, typed.
    fn new(data: &'a [E], t: &FlexTensor) -> Self {
        let s = t.layout().strides();
        View {
            data,
            offset: t.layout().start_offset(),
            strides: [s[0], s[1], s[2], s[3]],
        }
    }

    /// The storage index of element `[b, h, i, j]`.
    fn index(&self, [b, h, i, j]: [usize; 4]) -> usize {
        let [s0, s1, s2, s3] = self.strides;
        (self.offset as isize
            + b as isize * s0
            + h as isize * s1
            + i as isize * s2
            + j as isize * s3) as usize
    }
}

impl View<'_, f32> {
    /// The first `rows` rows of head `[b, h]`, `width` values each, contiguous.
    fn rows(&self, b: usize, h: usize, rows: usize, width: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * width);
        for i in 0..rows {
            let row = self.index([b, h, i, 0]);
            if self.strides[3] == 1 {
                out.extend_from_slice(&self.data[row..row + width]);
            } else {
                out.extend((0..width).map(|j| self.data[self.index([b, h, i, j])]));
            }
        }
        out
    }
}

impl View<'_, u8> {
    /// When every query of head (b, h) ignores exactly the keys from some index on, that
    /// index (the number of keys it sees).
    fn unmasked_prefix(&self, b: usize, h: usize, lq: usize, lk: usize) -> Option<usize> {
        let keys = (0..lk)
            .position(|j| self.masked([b, h, 0, j]))
            .unwrap_or(lk);
        (0..lq)
            .all(|i| (0..lk).all(|j| self.masked([b, h, i, j]) == (j >= keys)))
            .then_some(keys)
    }

    fn masked(&self, at: [usize; 4]) -> bool {
        self.data[self.index(at)] != 0
    }
}

thread_local! {
    /// One attention head's scores, kept per thread between heads and calls.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

struct FlexAttention<'a> {
    q: View<'a, f32>,
    k: View<'a, f32>,
    v: View<'a, f32>,
    mask: Option<View<'a, u8>>,
    heads: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    causal: bool,
}

// SAFETY: the views are read only; each task writes its own output rows.
unsafe impl Sync for FlexAttention<'_> {}

impl FlexAttention<'_> {
    /// The output, `[B, Lq, H, dv]` contiguous.
    fn run(&self, batch: usize) -> Vec<f32> {
        let (h, lq, dv) = (self.heads, self.lq, self.dv);
        let mut out = vec![0f32; batch * lq * h * dv];
        let tasks: Vec<(usize, usize)> = (0..batch)
            .flat_map(|b| (0..h).map(move |hh| (b, hh)))
            .collect();
        let out_ptr = OutPtr(out.as_mut_ptr());
        let run = |&(b, hh): &(usize, usize)| {
            SCORES.with_borrow_mut(|scores| {
                // Every score the head reads is written first (see `exp_scores`), so the
                // buffer is reused as it is: a fresh lq × lk allocation per head (≈1 MB for
                // 485 tokens) costs more in page faults than its softmax.
                if scores.len() < lq * self.lk {
                    scores.resize(lq * self.lk, 0.0);
                }
                // SAFETY: head (b, hh) writes only its own [b, :, hh, :] elements.
                unsafe { self.head(b, hh, scores, out_ptr.at(b * lq * h * dv + hh * dv)) };
            })
        };
        #[cfg(not(target_arch = "wasm32"))]
        {
            use rayon::prelude::*;
            tasks.par_iter().for_each(run);
        }
        #[cfg(target_arch = "wasm32")]
        tasks.iter().for_each(run);
        out
    }

    /// The keys head (b, h) sees and the mask still to apply. A padding mask (the same last
    /// keys ignored by every query) is run as the shorter sequence it stands for, so a padded
    /// prompt computes exactly what it computes alone (the GEMM's rounding depends on the
    /// number of keys). Any other mask is applied key by key.
    fn keys(&self, b: usize, hh: usize) -> (usize, Option<&View<'_, u8>>) {
        match &self.mask {
            None => (self.lk, None),
            Some(m) => match m.unmasked_prefix(b, hh, self.lq, self.lk) {
                Some(keys) => (keys, None),
                None => (self.lk, Some(m)),
            },
        }
    }

    /// Head (b, h)'s q, k and v (its first `lk` keys), copied to contiguous rows: the GEMM's
    /// rounding depends on its operands' strides, and the same head must give the same
    /// result however the tensors before it were laid out.
    fn operands(&self, b: usize, hh: usize, lk: usize) -> [Vec<f32>; 3] {
        [
            self.q.rows(b, hh, self.lq, self.d),
            self.k.rows(b, hh, lk, self.d),
            self.v.rows(b, hh, lk, self.dv),
        ]
    }

    /// `scores` (lq × lk) ← exp(q·kᵀ·scale − row max), zero where a key is ignored (by
    /// `mask` or causality); returns each row's 1 / sum (0 for a row that sees no key), so
    /// the softmax is each row times its value.
    fn exp_scores(
        &self,
        b: usize,
        hh: usize,
        (q, k): (&[f32], &[f32]),
        mask: Option<&View<'_, u8>>,
        scores: &mut [f32],
    ) -> Vec<f32> {
        let (lq, d) = (self.lq, self.d);
        let lk = scores.len() / lq;
        // kᵀ: its rows are k's columns.
        product(
            (lq, lk, d),
            scores,
            (q, 1, d),
            (k, d, 1),
            attention_scale(d),
        );
        let mut inverse_sums = Vec::with_capacity(lq);
        for (i, row) in scores.chunks_exact_mut(lk).enumerate() {
            // Causal: key j > query i is masked (PyTorch's is_causal with Lq = Lk).
            let visible = if self.causal { (i + 1).min(lk) } else { lk };
            row[visible..].fill(0.0);
            let row = &mut row[..visible];
            let Some(mask) = mask else {
                inverse_sums.push(1.0 / exp_minus_max(row));
                continue;
            };
            let mut any = false;
            for (j, x) in row.iter_mut().enumerate() {
                if mask.masked([b, hh, i, j]) {
                    *x = f32::NEG_INFINITY;
                } else {
                    any = true;
                }
            }
            if !any {
                row.fill(0.0);
                inverse_sums.push(0.0);
                continue;
            }
            // Ignored keys come out of exp at f32's smallest normal, which leaves a sum of
            // at least 1 unchanged; they are zeroed before the product.
            inverse_sums.push(1.0 / exp_minus_max(row));
            for (j, x) in row.iter_mut().enumerate() {
                if mask.masked([b, hh, i, j]) {
                    *x = 0.0;
                }
            }
        }
        inverse_sums
    }

    /// One head: scores = q·kᵀ·scale, softmax by rows, out = scores·v (rows `H·dv` apart).
    unsafe fn head(&self, b: usize, hh: usize, scores: &mut [f32], out: *mut f32) {
        let (lq, dv) = (self.lq, self.dv);
        let (lk, mask) = self.keys(b, hh);
        let heads_dv = (self.heads * dv) as isize;
        if lk == 0 {
            // Every key ignored: zeros, as burn's kernel gives.
            for i in 0..lq {
                // SAFETY: row i of this head's output: dv values at out + i·heads·dv.
                unsafe { std::slice::from_raw_parts_mut(out.add(i * heads_dv as usize), dv) }
                    .fill(0.0);
            }
            return;
        }
        let scores = &mut scores[..lq * lk];
        let [q, k, v] = self.operands(b, hh, lk);
        // Unnormalised: each output row is divided by its sum after the product, dv values
        // per row instead of lk.
        let inverse_sums = self.exp_scores(b, hh, (&q, &k), mask, scores);
        // SAFETY: `scores` is lq × lk, `v` lk × dv; `out` rows are heads·dv apart, dv wide.
        unsafe {
            gemm::gemm(
                lq,
                dv,
                lk,
                out,
                1,
                heads_dv,
                false,
                scores.as_ptr(),
                1,
                lk as isize,
                v.as_ptr(),
                1,
                dv as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (i, inv) in inverse_sums.into_iter().enumerate() {
            // SAFETY: row i of this head's output: dv values at out + i·heads·dv.
            let row = unsafe { std::slice::from_raw_parts_mut(out.add(i * heads_dv as usize), dv) };
            scale_in_place(row, inv);
        }
    }
}

/// CLIP's (and PyTorch's default) attention scale, 1/√d.
fn attention_scale(d: usize) -> f32 {
    1.0 / (d as f32).sqrt()
}

widest_simd!(scale_in_place(values: &mut [f32], factor: f32) {
    for v in values {
        *v *= factor;
    }
});

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `FlexAttention::run`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` inside the allocation.
        unsafe { self.0.add(offset) }
    }
}

/// Lanes of the explicit partial sums and maxima below: a fixed order (so every platform
/// rounds alike) that compilers vectorise.
const LANES: usize = 16;

// `row ← exp(row − max(row))` in place; returns the sum (softmax is that over the sum).
widest_simd!(exp_minus_max(row: &mut [f32]) -> f32 {
    let mut maxima = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (m, &x) in maxima.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&maxima)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk) {
            *x = exp_f32(*x - max);
            *s += *x;
        }
    }
    let mut sum = sums.iter().sum::<f32>();
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - max);
        sum += *x;
    }
    sum
});

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution, Tolerance};

    /// A bf16-stored linear runs vlsm's bf16 GEMM (not burn's widened fallback), in the
    /// linear and in the fused MLP.
    #[test]
    fn bf16_linears_run_the_bf16_gemm() {
        if !crate::gemm_bf16::available() {
            return;
        }
        let device = Device::flex();
        let (d, hidden, rows) = (48, 80, 37);
        let x = Tensor::<3>::random([2, rows, d], Distribution::Normal(0.0, 1.0), &device);
        let layer = |i, o| linear_to_bf16(burn::nn::LinearConfig::new(i, o).init(&device));
        let (fc1, fc2) = (layer(d, hidden), layer(hidden, d));
        // Shapes in strips (64, 96) and row-major (48, 80).
        let (proj1, proj2) = (layer(d, 64), layer(64, 96));
        let direct = |x: &[f32], rows: usize, l: &Linear| {
            let w = l.weight.val().into_data().convert::<half::bf16>();
            let w = w.as_slice::<half::bf16>().unwrap().to_vec();
            let b = l
                .bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let [d_in, d_out] = l.weight.val().dims();
            let mut out = vec![0f32; rows * d_out];
            crate::gemm_bf16::gemm(x, d_in, rows, d_in, &w, d_out, Some(&b), &mut out, false);
            out
        };
        let xs = x.clone().into_data().try_to_vec::<f32>().unwrap();
        let want: Vec<f32> = direct(&xs, 2 * rows, &fc1);
        let got = linear(x.clone(), &fc1)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(got, want, "linear");
        let h: Vec<f32> = want
            .iter()
            .map(|&v| v / (1.0 + exp_f32(-1.702 * v)))
            .collect();
        let want = direct(&h, 2 * rows, &fc2);
        let got = mlp(&x, &fc1, &fc2, true)
            .expect("the fused path")
            .into_data();
        assert_eq!(got.try_to_vec::<f32>().unwrap(), want, "mlp");
        let h = linear(x.clone(), &proj1);
        let want = direct(
            &h.clone().into_data().try_to_vec::<f32>().unwrap(),
            2 * rows,
            &proj2,
        );
        let got = linear(h.clone(), &proj2)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(got, want, "linear in strips");
        // burn's fallback reads the same stored weight back in row-major order.
        let fallback = burn_linear(h, &proj2).into_data();
        fallback.assert_approx_eq::<f32>(
            &TensorData::new(want, [2, rows, 96]),
            Tolerance::absolute(0.05),
        );
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_the_range_models_use() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((ours - libm) / libm).abs());
            x += 0.001_7;
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1000.0) < 1.2e-38 && exp_f32(-1000.0) > 0.0);
        assert!(exp_f32(1000.0).is_finite());
    }

    #[test]
    fn quick_gelu_matches_burns_composition() {
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 5, 300], Distribution::Normal(0.0, 4.0), &device);
        let reference = x.clone() * activation::sigmoid(x.clone() * 1.702);
        quick_gelu(x.clone())
            .into_data()
            .assert_approx_eq::<f32>(&reference.into_data(), Tolerance::absolute(1e-6));
        // A strided view (transposed) reads right too, and the input is left as it was.
        let t = x.clone().swap_dims(1, 2);
        let reference_t = t.clone() * activation::sigmoid(t.clone() * 1.702);
        quick_gelu(t)
            .into_data()
            .assert_approx_eq::<f32>(&reference_t.into_data(), Tolerance::absolute(1e-6));
        assert_eq!(x.dims(), [2, 5, 300]);
    }

    /// The fused pair of patch transposed convolutions gives burn's composition, on the
    /// refined head's shape and on one whose second kernel leaves a partial block of 16, and a
    /// prompt gives the same bits alone as in a batch (including a strided input).
    #[test]
    fn patch_conv_transpose_pair_matches_burns_composition() {
        let device = Device::flex();
        let patch = |c_in: usize, c_out: usize, k: usize| PatchConvTranspose {
            weight: burn::module::Param::from_tensor(Tensor::random(
                [c_in, c_out * k * k],
                Distribution::Normal(0.0, 0.3),
                &device,
            )),
            bias: burn::module::Param::from_tensor(Tensor::random(
                [c_out],
                Distribution::Normal(0.0, 0.3),
                &device,
            )),
            out_channels: c_out,
            kernel: k,
        };
        for (c_in, c_mid, k1, c_out, k2, g) in [(16, 8, 4, 1, 4, 5), (6, 5, 2, 2, 3, 3)] {
            let (first, second) = (patch(c_in, c_mid, k1), patch(c_mid, c_out, k2));
            let x = Tensor::<4>::random([3, g, g, c_in], Distribution::Normal(0.0, 1.0), &device)
                .permute([0, 3, 1, 2]);
            let fused = patch_conv_transpose_pair(&x, &first, &second).expect("flex f32");
            let composed = second.forward(activation::relu(first.forward(x.clone())));
            assert_eq!(fused.dims(), [3, c_out, g * k1 * k2, g * k1 * k2]);
            fused
                .clone()
                .into_data()
                .assert_approx_eq::<f32>(&composed.into_data(), Tolerance::absolute(1e-5));
            let alone = patch_conv_transpose_pair(&x.clone().narrow(0, 1, 1), &first, &second)
                .expect("flex f32");
            assert_eq!(
                alone.into_data().try_to_vec::<f32>().unwrap(),
                fused
                    .narrow(0, 1, 1)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap()
            );
        }
    }

    #[test]
    fn linear_and_mlp_match_burns_modules() {
        use burn::nn::LinearConfig;
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 300, 24], Distribution::Normal(0.0, 1.0), &device);
        for bias in [true, false] {
            let fc1 = LinearConfig::new(24, 2048).with_bias(bias).init(&device);
            let fc2 = LinearConfig::new(2048, 24).with_bias(bias).init(&device);
            linear(x.clone(), &fc1).into_data().assert_approx_eq::<f32>(
                &fc1.forward(x.clone()).into_data(),
                Tolerance::absolute(1e-5),
            );
            // Strided input: a transposed view, and a slice of the last dimension.
            let t = Tensor::<3>::random([2, 24, 300], Distribution::Normal(0.0, 1.0), &device)
                .swap_dims(1, 2);
            linear(t.clone(), &fc1).into_data().assert_approx_eq::<f32>(
                &fc1.forward(t.clone()).into_data(),
                Tolerance::absolute(1e-5),
            );
            let wide = Tensor::<3>::random([2, 300, 30], Distribution::Normal(0.0, 1.0), &device);
            let part = wide.narrow(2, 3, 24);
            linear(part.clone(), &fc1)
                .into_data()
                .assert_approx_eq::<f32>(&fc1.forward(part).into_data(), Tolerance::absolute(1e-5));
            // The MLP in blocks of 128 rows (600 rows: a partial last block).
            for quick in [false, true] {
                let h = fc1.forward(x.clone());
                let h = if quick {
                    h.clone() * activation::sigmoid(h * 1.702)
                } else {
                    activation::relu(h)
                };
                mlp(&x, &fc1, &fc2, quick)
                    .expect("flex f32")
                    .into_data()
                    .assert_approx_eq::<f32>(
                        &fc2.forward(h).into_data(),
                        Tolerance::absolute(1e-4),
                    );
            }
        }
    }

    #[test]
    fn attention_with_a_padding_mask_matches_burns() {
        let device = Device::flex();
        let heads = |l: usize, seed: f64| {
            Tensor::<4>::random([2, l, 3, 16], Distribution::Normal(seed, 1.5), &device)
                .swap_dims(1, 2)
        };
        let l = 9;
        let (q, k, v) = (heads(l, 0.0), heads(l, 0.1), heads(l, -0.2));
        // Sample 0 ignores its last 4 keys, sample 1 none; expanded as the models build it.
        let ignore: Vec<bool> = (0..2 * l).map(|i| i < l && i >= l - 4).collect();
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(ignore, [2, l]), &device)
            .reshape([2, 1, 1, l])
            .expand([2, 3, l, l]);
        for causal in [false, true] {
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: causal,
            };
            let reference = burn_attention(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(mask.clone()),
                None,
                options,
            );
            attention(q.clone(), k.clone(), v.clone(), Some(mask.clone()), causal)
                .into_data()
                .assert_approx_eq::<f32>(&reference.into_data(), Tolerance::absolute(1e-5));
        }
        // A padded prompt gives exactly what it gives alone, and so does an unpadded one.
        let alone = attention(
            q.clone().narrow(0, 0, 1).narrow(2, 0, l - 4),
            k.clone().narrow(0, 0, 1).narrow(2, 0, l - 4),
            v.clone().narrow(0, 0, 1).narrow(2, 0, l - 4),
            None,
            false,
        );
        let padded = attention(q.clone(), k.clone(), v.clone(), Some(mask.clone()), false)
            .narrow(0, 0, 1)
            .narrow(2, 0, l - 4);
        assert_eq!(alone.into_data(), padded.into_data());
        let alone = attention(
            q.clone().narrow(0, 1, 1),
            k.clone().narrow(0, 1, 1),
            v.clone().narrow(0, 1, 1),
            None,
            false,
        );
        let batched = attention(q, k, v, Some(mask), false).narrow(0, 1, 1);
        assert_eq!(alone.into_data(), batched.into_data());
    }

    #[test]
    fn attention_matches_burns_on_strided_heads_causal_or_not() {
        let device = Device::flex();
        // [B, L, H, d] projections viewed as [B, H, L, d], as the models build them.
        let heads = |l: usize, seed: f64| {
            Tensor::<4>::random([2, l, 3, 16], Distribution::Normal(seed, 1.5), &device)
                .swap_dims(1, 2)
        };
        for (lq, causal) in [(37, false), (37, true), (5, false)] {
            let (q, k, v) = (heads(lq, 0.0), heads(lq, 0.1), heads(lq, -0.2));
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: causal,
            };
            let reference = burn_attention(q.clone(), k.clone(), v.clone(), None, None, options);
            let ours = attention(q, k, v, None, causal);
            assert_eq!(ours.dims(), reference.dims());
            ours.clone()
                .into_data()
                .assert_approx_eq::<f32>(&reference.clone().into_data(), Tolerance::absolute(1e-5));
            // The layout callers rely on: [B, Lq, H·d] after swapping back is the same.
            ours.swap_dims(1, 2)
                .reshape([2, lq, 48])
                .into_data()
                .assert_approx_eq::<f32>(
                    &reference.swap_dims(1, 2).reshape([2, lq, 48]).into_data(),
                    Tolerance::absolute(1e-5),
                );
        }
    }
}
