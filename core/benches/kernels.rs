//! Speed of the CPU kernels CLIPSeg rd64-refined spends its time in, at the model's shapes
//! (485 tokens: 22×22 patches and the class token), each beside burn's own op so a
//! regression or a gain shows: the vision tower's linears and MLP (768 → 3072), its
//! 12-head attention, CLIPSeg's decoder MLP (64 → 2048) and 4-head attention, softmax,
//! LayerNorm and QuickGELU; the linears and MLPs also with bf16 weights where the CPU has
//! AVX-512 BF16. `cargo bench -p vlsm --bench kernels`.

use criterion::{Criterion, criterion_group, criterion_main};
use vlsm::burn::nn::{LayerNormConfig, LinearConfig};
use vlsm::burn::tensor::module::attention as burn_attention;
use vlsm::burn::tensor::ops::AttentionModuleOptions;
use vlsm::burn::tensor::{Device, Distribution, Tensor, activation};
use vlsm::kernels;

const TOKENS: usize = 485;

fn bench(c: &mut Criterion) {
    let device = Device::flex();
    let normal =
        |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let read = |t: Tensor<3>| t.into_data();
    let mut group = c.benchmark_group("kernels");
    group.sample_size(20);

    for (name, d, hidden, quick) in [("vision", 768, 3072, true), ("decoder", 64, 2048, false)] {
        let x = normal([1, TOKENS, d]);
        let fc1 = LinearConfig::new(d, hidden).init(&device);
        let fc2 = LinearConfig::new(hidden, d).init(&device);
        let proj = LinearConfig::new(d, d).init(&device);
        group.bench_function(format!("{name} linear {TOKENS}x{d}x{d} burn"), |b| {
            b.iter(|| read(proj.forward(x.clone())))
        });
        group.bench_function(format!("{name} linear {TOKENS}x{d}x{d} vlsm"), |b| {
            b.iter(|| read(kernels::linear(x.clone(), &proj)))
        });
        group.bench_function(format!("{name} mlp {d}-{hidden}-{d} burn"), |b| {
            b.iter(|| {
                let h = fc1.forward(x.clone());
                let h = if quick {
                    h.clone() * activation::sigmoid(h * 1.702)
                } else {
                    activation::relu(h)
                };
                read(fc2.forward(h))
            })
        });
        group.bench_function(format!("{name} mlp {d}-{hidden}-{d} vlsm"), |b| {
            b.iter(|| read(kernels::mlp(&x, &fc1, &fc2, quick).expect("flex f32")))
        });
        if vlsm::gemm_bf16::available() {
            // The same layers with bf16 weights (`--precision bf16`).
            let bf16 = |l: &vlsm::burn::nn::Linear| kernels::linear_to_bf16(l.clone());
            let (proj, fc1, fc2) = (bf16(&proj), bf16(&fc1), bf16(&fc2));
            group.bench_function(format!("{name} linear {TOKENS}x{d}x{d} vlsm bf16"), |b| {
                b.iter(|| read(kernels::linear(x.clone(), &proj)))
            });
            group.bench_function(format!("{name} mlp {d}-{hidden}-{d} vlsm bf16"), |b| {
                b.iter(|| read(kernels::mlp(&x, &fc1, &fc2, quick).expect("flex bf16")))
            });
        }
    }

    for (name, heads, head_dim) in [("vision", 12, 64), ("decoder", 4, 16)] {
        // [B, L, H, d] projections viewed as [B, H, L, d], as the models build them.
        let qkv = || {
            Tensor::<4>::random(
                [1, TOKENS, heads, head_dim],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
            .swap_dims(1, 2)
        };
        let (q, k, v) = (qkv(), qkv(), qkv());
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        group.bench_function(
            format!("{name} attention {heads}x{TOKENS}x{head_dim} burn"),
            |b| {
                b.iter(|| {
                    burn_attention(q.clone(), k.clone(), v.clone(), None, None, options).into_data()
                })
            },
        );
        group.bench_function(
            format!("{name} attention {heads}x{TOKENS}x{head_dim} vlsm"),
            |b| {
                b.iter(|| {
                    kernels::attention(q.clone(), k.clone(), v.clone(), None, false).into_data()
                })
            },
        );
    }

    let scores = normal([12, TOKENS, TOKENS]);
    group.bench_function(format!("softmax 12x{TOKENS}x{TOKENS} burn"), |b| {
        b.iter(|| read(activation::softmax(scores.clone(), 2)))
    });
    let hidden = normal([1, TOKENS, 3072]);
    group.bench_function(format!("quick_gelu {TOKENS}x3072 burn"), |b| {
        b.iter(|| read(hidden.clone() * activation::sigmoid(hidden.clone() * 1.702)))
    });
    group.bench_function(format!("quick_gelu {TOKENS}x3072 vlsm"), |b| {
        b.iter(|| read(kernels::quick_gelu(hidden.clone())))
    });
    let x = normal([1, TOKENS, 768]);
    let norm = LayerNormConfig::new(768).init(&device);
    group.bench_function(format!("layer_norm {TOKENS}x768 burn"), |b| {
        b.iter(|| read(norm.forward(x.clone())))
    });
    group.finish();

    // The f32 linears alone at the model's shapes: vlsm's linear on the gemm crate (as burn's
    // flex runs it) beside the fixed-order AVX-512 kernel, both single products with the bias.
    // 10 and 100 rows: one prompt's tokens through the text tower, and ten prompts at once.
    if vlsm::gemm_f32::available() {
        let mut group = c.benchmark_group("gemm f32");
        group.sample_size(20);
        for (rows, k, n) in [
            (TOKENS, 768, 768),
            (TOKENS, 768, 3072),
            (TOKENS, 3072, 768),
            (TOKENS, 64, 2048),
            (TOKENS, 2048, 64),
            (197, 768, 3072),
            (197, 3072, 768),
            (10, 512, 2048),
            (10, 2048, 512),
            (100, 512, 2048),
            (100, 2048, 512),
        ] {
            let x = normal([1, rows, k]);
            let layer = LinearConfig::new(k, n).init(&device);
            group.bench_function(format!("{rows}x{k}x{n} gemm crate"), |b| {
                b.iter(|| read(kernels::linear(x.clone(), &layer)))
            });
            let xs = x.to_data().try_to_vec::<f32>().expect("f32");
            let w = layer
                .weight
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32");
            let bias = layer.bias.as_ref().expect("bias").val().into_data();
            let bias = bias.try_to_vec::<f32>().expect("f32");
            let mut out = vec![0f32; rows * n];
            group.bench_function(format!("{rows}x{k}x{n} vlsm fixed order"), |b| {
                b.iter(|| {
                    vlsm::gemm_f32::gemm(&xs, k, rows, k, &w, n, Some(&bias), &mut out, true);
                    out[0]
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
