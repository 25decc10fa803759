//! Speed of CLIPSeg rd64-refined at full size (random weights: speed does not depend on
//! their values) on burn's CPU backend: image encoding, prompt decoding, and the two
//! end-to-end cases of the README table. `cargo bench -p vlsm --bench clipseg`.

use criterion::{Criterion, criterion_group, criterion_main};
use vlsm::burn::tensor::{Device, Distribution, Tensor};
use vlsm::model::clipseg::pixels_tensor;
use vlsm::{ClipSeg, ClipSegConfig, Weights};

/// The CIDAS/clipseg-rd64-refined configuration.
fn rd64_refined() -> ClipSegConfig {
    let json = br#"{"projection_dim": 512, "extract_layers": [3, 6, 9], "reduce_dim": 64,
        "decoder_num_attention_heads": 4, "decoder_intermediate_size": 2048, "conditional_layer": 0,
        "use_complex_transposed_convolution": true,
        "text_config": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        "vision_config": {"patch_size": 16}}"#;
    ClipSegConfig::from_json(json).expect("valid config")
}

fn prompts(n: usize) -> Vec<vlsm::TokenizedPrompt> {
    // Ten-token prompts, padded to 77 as the tokenizer does.
    (0..n)
        .map(|i| {
            let mut ids = vec![49406];
            ids.extend((0..8).map(|j| 320 + (i * 8 + j) as i64));
            ids.push(49407);
            let len = ids.len();
            ids.resize(77, 49407);
            let mut attention_mask = vec![1; len];
            attention_mask.resize(77, 0);
            vlsm::TokenizedPrompt {
                ids,
                attention_mask,
            }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let device = Device::flex();
    let model = ClipSeg::load(&rd64_refined(), &Weights::random(0), 352, &device).expect("model");
    let pixels = || pixels_tensor(&[vec![0.1f32; 3 * 352 * 352]], 352, &device);
    let read = |t: vlsm::burn::tensor::Tensor<3>| t.into_data();
    let mut group = c.benchmark_group("clipseg-rd64-refined-352");
    group.sample_size(10);
    group.bench_function("encode image", |b| {
        b.iter(|| model.encode_image(pixels()).unwrap().reduced[0].to_data())
    });
    let image = model.encode_image(pixels()).unwrap();
    for n in [1, 10] {
        let p = prompts(n);
        group.bench_function(format!("decode {n} prompt(s)"), |b| {
            b.iter(|| {
                read(
                    model
                        .decode(&image, model.embed_prompts(&p, &device).unwrap())
                        .unwrap(),
                )
            })
        });
        // The two halves of decoding: the text tower, and the decoder on its output.
        group.bench_function(format!("text tower {n} prompt(s)"), |b| {
            b.iter(|| model.embed_prompts(&p, &device).unwrap())
        });
        let conditioning = model.embed_prompts(&p, &device).unwrap();
        group.bench_function(format!("decoder {n} prompt(s)"), |b| {
            b.iter(|| read(model.decode(&image, conditioning.clone()).unwrap()))
        });
        // The decoder's parts at this batch: one layer's attention and MLP, and the head.
        let dec = &model.decoder;
        let tokens = Tensor::<3>::random([n, 485, 64], Distribution::Normal(0.0, 1.0), &device);
        let layer = &dec.layers[0];
        group.bench_function(format!("decoder attention {n} prompt(s)"), |b| {
            b.iter(|| read(layer.self_attn.forward(tokens.clone(), None, false)))
        });
        group.bench_function(format!("decoder mlp {n} prompt(s)"), |b| {
            b.iter(|| read(layer.mlp.forward(tokens.clone())))
        });
        let map = Tensor::<4>::random([n, 64, 22, 22], Distribution::Normal(0.0, 1.0), &device);
        group.bench_function(format!("decoder head {n} prompt(s)"), |b| {
            b.iter(|| read(dec.head.forward(map.clone())))
        });
        group.bench_function(format!("1 image x {n} prompt(s)"), |b| {
            b.iter(|| {
                let image = model.encode_image(pixels()).unwrap();
                read(
                    model
                        .decode(&image, model.embed_prompts(&p, &device).unwrap())
                        .unwrap(),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
