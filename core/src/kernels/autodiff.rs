//! Attention with its own backward pass, for training on the flex (CPU) backend.
//!
//! burn's autodiff runs attention as its generic composition: a `[B, H, Lq, Lk]` score
//! tensor per step, a scalar `exp` in the softmax, and that `exp` again in the backward
//! pass; in decoder training that was half of each step. Here the forward pass is
//! [`super::attention`]'s fused kernel and the backward pass recomputes each head's
//! probabilities from q and k (as FlashAttention does) instead of keeping them:
//!
//! `P = softmax(q·kᵀ·s)`, `dv = Pᵀ·do`, `dP = do·vᵀ`, `dS = P ∘ (dP − rowsum(P ∘ dP))`,
//! `dq = s·dS·k`, `dk = s·dSᵀ·q`.
//!
//! Other devices and dtypes keep burn's composition (the reference the tests compare with).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{BoolTensor, FloatTensor};
use burn::backend::{Autodiff, Backend, Dispatch, backend_extension};
use burn::tensor::{Bool, DType, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};

use super::{
    FlexAttention, LANES, View, attention_scale, dims4, flex_attention, product, scale_in_place,
};

#[backend_extension(Flex, Autodiff)]
trait AttentionOps: Backend {
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self>;

    fn fused_attention_masked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self>;
}

impl AttentionOps for Flex {
    fn fused_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, causal: bool) -> FlexTensor {
        flex_attention(&q, &k, &v, None, causal)
    }

    fn fused_attention_masked(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        mask: FlexTensor,
        causal: bool,
    ) -> FlexTensor {
        flex_attention(&q, &k, &v, Some(&mask), causal)
    }
}

impl<C: CheckpointStrategy> AttentionOps for Autodiff<Flex, C> {
    fn fused_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        tracked::<C>(q, k, v, None, causal)
    }

    fn fused_attention_masked(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        mask: BoolTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        tracked::<C>(q, k, v, Some(mask), causal)
    }
}

/// What the backward pass needs: the inputs (the probabilities are recomputed from them).
#[derive(Debug, Clone)]
struct Inputs {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: Option<FlexTensor>,
    causal: bool,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    type State = Inputs;

    fn backward(self, ops: Ops<Inputs, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Flex>(&ops.node);
        let [dq, dk, dv] = gradients(&ops.state, &grad);
        for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

fn tracked<C: CheckpointStrategy>(
    q: FloatTensor<Autodiff<Flex, C>>,
    k: FloatTensor<Autodiff<Flex, C>>,
    v: FloatTensor<Autodiff<Flex, C>>,
    mask: Option<FlexTensor>,
    causal: bool,
) -> FloatTensor<Autodiff<Flex, C>> {
    let prep = AttentionBackward
        .prepare::<C>([q.node(), k.node(), v.node()])
        .compute_bound()
        .stateful();
    let inputs = Inputs {
        q: q.into_primitive(),
        k: k.into_primitive(),
        v: v.into_primitive(),
        mask,
        causal,
    };
    let out = flex_attention(
        &inputs.q,
        &inputs.k,
        &inputs.v,
        inputs.mask.as_ref(),
        causal,
    );
    match prep {
        OpsKind::Tracked(prep) => prep.finish(inputs, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// Attention through the fused kernel when the tensors are f32 autodiff tensors on the flex
/// device, else `None`. Shapes are already checked by the caller.
pub(super) fn attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: Option<&Tensor<4, Bool>>,
    causal: bool,
) -> Option<Tensor<4>> {
    let on_flex = |t: &Tensor<4>| {
        t.dtype() == DType::F32
            && t.device().is_autodiff()
            && t.clone().inner().try_into_primitive::<Flex>().is_ok()
    };
    let mask_on_flex = mask.is_none_or(|m| m.clone().inner().try_into_primitive::<Flex>().is_ok());
    if !(on_flex(q) && on_flex(k) && on_flex(v) && mask_on_flex) {
        return None;
    }
    let [q, k, v] = [q, k, v].map(|t| t.clone().into_dispatch());
    let out = match mask {
        None => <Dispatch as AttentionOps>::fused_attention(q, k, v, causal),
        Some(mask) => <Dispatch as AttentionOps>::fused_attention_masked(
            q,
            k,
            v,
            mask.clone().into_dispatch(),
            causal,
        ),
    };
    Some(Tensor::from_dispatch(out))
}

/// One head's gradient blocks: dq, dk and dv.
type HeadBlocks<'a> = ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]);

/// The gradients of q, k and v (`[B, H, L, ·]`, contiguous) for the output's gradient `grad`.
fn gradients(inputs: &Inputs, grad: &FlexTensor) -> [FlexTensor; 3] {
    let [b, h, lq, d] = dims4(&inputs.q);
    let [_, _, lk, dv] = dims4(&inputs.v);
    let attention = FlexAttention {
        q: View::new(inputs.q.storage::<f32>(), &inputs.q),
        k: View::new(inputs.k.storage::<f32>(), &inputs.k),
        v: View::new(inputs.v.storage::<f32>(), &inputs.v),
        mask: inputs
            .mask
            .as_ref()
            .map(|m| View::new(m.storage::<u8>(), m)),
        heads: h,
        lq,
        lk,
        d,
        dv,
        causal: inputs.causal,
    };
    let grad = View::new(grad.storage::<f32>(), grad);
    let mut dq = vec![0f32; b * h * lq * d];
    let mut dk = vec![0f32; b * h * lk * d];
    let mut dvs = vec![0f32; b * h * lk * dv];
    let head = |(i, ((dq, dk), dv)): (usize, HeadBlocks<'_>)| {
        head_gradients(&attention, &grad, (i / h, i % h), [dq, dk, dv]);
    };
    let chunks = dq
        .chunks_mut(lq * d)
        .zip(dk.chunks_mut(lk * d))
        .zip(dvs.chunks_mut(lk * dv));
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        let chunks = chunks.collect::<Vec<_>>();
        chunks.into_par_iter().enumerate().for_each(head);
    }
    #[cfg(target_arch = "wasm32")]
    chunks.enumerate().for_each(head);
    let tensor = |values: Vec<f32>, l: usize, width: usize| {
        FlexTensor::from_data(TensorData::new(values, [b, h, l, width]))
    };
    [tensor(dq, lq, d), tensor(dk, lk, d), tensor(dvs, lk, dv)]
}

/// One head's gradients, written into its `[Lq, d]`, `[Lk, d]` and `[Lk, dv]` blocks (zero
/// for keys the head never sees).
fn head_gradients(
    attention: &FlexAttention<'_>,
    grad: &View<'_, f32>,
    (b, hh): (usize, usize),
    [dq, dk, dv]: [&mut [f32]; 3],
) {
    let (lq, d, dvw) = (attention.lq, attention.d, attention.dv);
    let (lk, mask) = attention.keys(b, hh);
    if lk == 0 {
        return; // every key ignored: the output was constant zero
    }
    let [q, k, v] = attention.operands(b, hh, lk);
    let go = grad.rows(b, hh, lq, dvw);
    let mut p = vec![0f32; lq * lk];
    let inverse_sums = attention.exp_scores(b, hh, (&q, &k), mask, &mut p);
    for (row, inv) in p.chunks_exact_mut(lk).zip(inverse_sums) {
        scale_in_place(row, inv);
    }
    let scale = attention_scale(d);
    // dv = Pᵀ·do (lk × dv): Pᵀ's element (j, i) is p[i·lk + j].
    product(
        (lk, dvw, lq),
        &mut dv[..lk * dvw],
        (&p, lk, 1),
        (&go, 1, dvw),
        1.0,
    );
    // dP = do·vᵀ (lq × lk): vᵀ's element (c, j) is v[j·dv + c].
    let mut ds = vec![0f32; lq * lk];
    product((lq, lk, dvw), &mut ds, (&go, 1, dvw), (&v, dvw, 1), 1.0);
    for (p, ds) in p.chunks_exact(lk).zip(ds.chunks_exact_mut(lk)) {
        softmax_gradient_row(p, ds);
    }
    // dq = s·dS·k (lq × d), dk = s·dSᵀ·q (lk × d).
    product((lq, d, lk), dq, (&ds, 1, lk), (&k, 1, d), scale);
    product(
        (lk, d, lq),
        &mut dk[..lk * d],
        (&ds, lk, 1),
        (&q, 1, d),
        scale,
    );
}

widest_simd!(softmax_gradient_row(p: &[f32], ds: &mut [f32]) {
    // ds ← p ∘ (dp − Σ p·dp), with the sum in LANES partial sums (a fixed order).
    let mut sums = [0f32; LANES];
    let (pc, dc) = (p.chunks_exact(LANES), ds.chunks_exact(LANES));
    let (p_rest, d_rest) = (pc.remainder(), dc.remainder());
    for (pc, dc) in pc.zip(dc) {
        for ((s, &p), &d) in sums.iter_mut().zip(pc).zip(dc) {
            *s += p * d;
        }
    }
    let mut dot = p_rest.iter().zip(d_rest).fold(0f32, |s, (&p, &d)| s + p * d);
    for s in sums {
        dot += s;
    }
    for (d, &p) in ds.iter_mut().zip(p) {
        *d = p * (*d - dot);
    }
});

#[cfg(test)]
mod tests {
    use burn::tensor::module::attention as burn_attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution, Tolerance};

    use super::*;

    /// Output and q/k/v gradients of `sum(attention(q, k, v) ∘ weights)`, by the fused
    /// kernel (`fused`) or burn's autodiff composition.
    fn run(
        [q, k, v]: [&Tensor<4>; 3],
        mask: Option<&Tensor<4, Bool>>,
        causal: bool,
        fused: bool,
    ) -> [TensorData; 4] {
        let device = Device::flex().autodiff();
        // Leaves laid out [B, L, H, d], viewed as [B, H, L, d] as the models do.
        let leaf = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &device).require_grad();
        let (ql, kl, vl) = (leaf(q), leaf(k), leaf(v));
        let heads = |t: &Tensor<4>| t.clone().swap_dims(1, 2);
        let mask = mask.map(|m| Tensor::<4, Bool>::from_data(m.to_data(), &device));
        let out = if fused {
            super::super::attention(heads(&ql), heads(&kl), heads(&vl), mask, causal)
        } else {
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: causal,
            };
            burn_attention(heads(&ql), heads(&kl), heads(&vl), mask, None, options)
        };
        // Fixed, uneven weights, so each output element's gradient differs.
        let values = (0..out.dims().iter().product::<usize>())
            .map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.4)
            .collect::<Vec<_>>();
        let weights = Tensor::<4>::from_data(TensorData::new(values, out.dims()), &device);
        let grads = (out.clone() * weights).sum().backward();
        let grad = |t: &Tensor<4>| t.grad(&grads).expect("a gradient").into_data();
        [out.into_data(), grad(&ql), grad(&kl), grad(&vl)]
    }

    #[test]
    fn fused_attention_gradients_match_burns_autodiff() {
        let device = Device::flex();
        let leaf = |b: usize, l: usize, seed: f64| {
            Tensor::<4>::random([b, l, 3, 16], Distribution::Normal(seed, 1.5), &device)
        };
        let l = 9;
        // Sample 0 ignores its last 4 keys (padding); the other mask also blanks a whole row.
        let ignore: Vec<bool> = (0..2 * l).map(|i| i < l && i >= l - 4).collect();
        let padding = Tensor::<2, Bool>::from_data(TensorData::new(ignore, [2, l]), &device)
            .reshape([2, 1, 1, l])
            .expand([2, 3, l, l]);
        let scattered: Vec<bool> = (0..2 * 3 * l * l)
            .map(|i| (i * 31) % 7 == 0 || (i / l) % (3 * l) == 4)
            .collect();
        let scattered =
            Tensor::<4, Bool>::from_data(TensorData::new(scattered, [2, 3, l, l]), &device);
        let (q, k, v) = (leaf(2, l, 0.0), leaf(2, l, 0.1), leaf(2, l, -0.2));
        let cases = [
            (None, false),
            (None, true),
            (Some(&padding), false),
            (Some(&padding), true),
            (Some(&scattered), false),
        ];
        for (mask, causal) in cases {
            let ours = run([&q, &k, &v], mask, causal, true);
            let reference = run([&q, &k, &v], mask, causal, false);
            // Output, dq, dk, dv.
            for (a, b) in ours.iter().zip(&reference) {
                a.assert_approx_eq::<f32>(b, Tolerance::absolute(2e-5).set_relative(1e-4));
            }
            // The forward pass is the inference kernel's, bit for bit.
            let plain = super::super::attention(
                q.clone().swap_dims(1, 2),
                k.clone().swap_dims(1, 2),
                v.clone().swap_dims(1, 2),
                mask.cloned(),
                causal,
            );
            assert_eq!(ours[0], plain.into_data(), "{:?}", (mask.is_some(), causal));
        }
        // Cross attention: 5 queries, 9 keys.
        let q5 = leaf(2, 5, 0.3);
        let ours = run([&q5, &k, &v], None, false, true);
        let reference = run([&q5, &k, &v], None, false, false);
        for (a, b) in ours.iter().zip(&reference) {
            a.assert_approx_eq::<f32>(b, Tolerance::absolute(2e-5).set_relative(1e-4));
        }
    }
}
