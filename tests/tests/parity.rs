//! Logits and intermediates match transformers (reference files made by
//! tools/make_fixtures.py and, independently, ../shared/fixtures) on the CPU backend.

use vlsm::burn::tensor::{Device, Tensor, TensorData};
use vlsm::model::clipseg::pixels_tensor;
use vlsm::{ClipSeg, ClipSegConfig, Segmenter, TokenizedPrompt, Weights, preprocess};
use vlsm_tests::{Reference, assert_close, fixture, shared, values};

const TOL: f32 = 1e-4;

fn manifest() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture("manifest.json")).unwrap()).unwrap()
}

fn check_model(name: &str) {
    let device = Device::flex();
    let dir = fixture(name);
    let seg = Segmenter::from_dir(&dir, &device).unwrap();
    let reference = Reference::read(&dir.join("reference.safetensors"));
    let info = &manifest()["models"][name];
    let prompts: Vec<&str> = info["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let images: Vec<&str> = info["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let logit_images = info["logit_images"].as_array().unwrap().len();
    let s = seg.input_size();

    // Tokenizer: our ids are transformers' ids.
    let tokens = seg.tokenize(&prompts).unwrap();
    let ids: Vec<Vec<i64>> = tokens.iter().map(|t| t.ids.clone()).collect();
    assert_eq!(ids, reference.i64_rows("input_ids"), "{name}: token ids");
    let masks: Vec<Vec<i64>> = tokens.iter().map(|t| t.attention_mask.clone()).collect();
    assert_eq!(
        masks,
        reference.i64_rows("attention_mask"),
        "{name}: attention mask"
    );

    // Preprocessing: PIL's bytes, so the same floats.
    for (i, img) in images.iter().enumerate() {
        let bytes = std::fs::read(fixture("images").join(img)).unwrap();
        let rgb = preprocess::decode_rgb(&bytes).unwrap();
        let px = preprocess::pixel_values(&rgb, &seg.pipeline.preprocess).unwrap();
        assert_close(
            &format!("{name}: pixel values of {img}"),
            &px,
            &reference.f32(&format!("pixel_values.{i}")),
            1e-5,
        );
    }

    // Intermediates on the first image, so a failure says where.
    let px = reference.f32("pixel_values.0");
    let pixels = pixels_tensor(&[px], s, &device);
    let states = seg
        .model
        .clipseg()
        .unwrap()
        .vision
        .hidden_states(pixels.clone())
        .unwrap();
    for (k, state) in states.iter().enumerate() {
        assert_close(
            &format!("{name}: vision hidden state {k}"),
            &values(state.clone()),
            &reference.f32(&format!("vision.hidden_states.{k}")),
            TOL,
        );
    }
    let (hidden, pooled) = seg
        .model
        .clipseg()
        .unwrap()
        .text
        .forward(&tokens, false, &device)
        .unwrap();
    assert_close(
        &format!("{name}: text last hidden state"),
        &values(hidden),
        &reference.f32("text.last_hidden_state"),
        TOL,
    );
    assert_close(
        &format!("{name}: text pooled"),
        &values(pooled),
        &reference.f32("text.pooler_output"),
        TOL,
    );
    let conditioning = seg
        .model
        .embed_prompts(&tokens, &device)
        .unwrap()
        .film()
        .unwrap()
        .clone();
    assert_close(
        &format!("{name}: conditional embeddings"),
        &values(conditioning.clone()),
        &reference.f32("text.text_embeds"),
        TOL,
    );
    let encoded = seg.model.encode_image(pixels).unwrap();
    let image = encoded.clipseg().unwrap();
    let trace = seg.model.decode_traced(image, conditioning).unwrap();
    assert_close(
        &format!("{name}: FiLM output"),
        &values(trace.film_output),
        &reference.f32("decoder.film_output"),
        TOL,
    );
    for (i, out) in trace.layer_outputs.iter().enumerate() {
        let expected = reference.f32(&format!("decoder.layer_output.{i}"));
        let got = values(out.clone());
        // Steps before FiLM run once per image; transformers repeats them per prompt.
        let got = if got.len() < expected.len() {
            got.repeat(expected.len() / got.len())
        } else {
            got
        };
        assert_close(&format!("{name}: decoder layer {i}"), &got, &expected, TOL);
    }
    assert_close(
        &format!("{name}: decoder feature map"),
        &values(trace.feature_map),
        &reference.f32("decoder.feature_map"),
        TOL,
    );

    // End to end through the public API: image file → logits, for every reference image.
    for (i, img) in images.iter().take(logit_images).enumerate() {
        let bytes = std::fs::read(fixture("images").join(img)).unwrap();
        let rgb = preprocess::decode_rgb(&bytes).unwrap();
        let encoded = seg.encode_image(&rgb).unwrap();
        let logits: Vec<f32> = seg
            .decode(&encoded, &prompts)
            .unwrap()
            .into_iter()
            .flat_map(|l| l.values)
            .collect();
        assert_close(
            &format!("{name}: logits of {img}"),
            &logits,
            &reference.f32(&format!("logits.{i}")),
            TOL,
        );
    }
}

#[test]
fn refined_head_with_interpolated_positions_matches_transformers() {
    check_model("clipseg_refined");
}

#[test]
fn simple_head_with_late_film_matches_transformers() {
    check_model("clipseg_simple");
}

#[test]
fn pytorch_bin_checkpoint_gives_the_same_logits_as_safetensors() {
    let device = Device::flex();
    let a = Segmenter::from_dir(&fixture("clipseg_simple"), &device).unwrap();
    let b = Segmenter::from_dir(&fixture("clipseg_simple_bin"), &device).unwrap();
    let rgb =
        preprocess::decode_rgb(&std::fs::read(fixture("images/rgb_150x100.png")).unwrap()).unwrap();
    let prompts = ["polyp", "a large tumour"];
    let la = a.decode(&a.encode_image(&rgb).unwrap(), &prompts).unwrap();
    let lb = b.decode(&b.encode_image(&rgb).unwrap(), &prompts).unwrap();
    assert_eq!(la, lb);
}

#[test]
fn batched_images_match_one_at_a_time() {
    let device = Device::flex();
    let seg = Segmenter::from_dir(&fixture("clipseg_refined"), &device).unwrap();
    let imgs: Vec<_> = ["rgb_150x100.png", "palette_110x75.png"]
        .iter()
        .map(|f| {
            preprocess::decode_rgb(&std::fs::read(fixture("images").join(f)).unwrap()).unwrap()
        })
        .collect();
    let batch = seg.encode_images(&[&imgs[0], &imgs[1]]).unwrap();
    for (img, enc) in imgs.iter().zip(&batch) {
        let single = seg
            .decode(&seg.encode_image(img).unwrap(), &["polyp"])
            .unwrap();
        let batched = seg.decode(enc, &["polyp"]).unwrap();
        assert_close(
            "batched vs single",
            &batched[0].values,
            &single[0].values,
            1e-5,
        );
    }
}

/// The independent fixtures in ../shared/fixtures (toy vocabulary, given ids and pixels),
/// against their float64 ground truth.
fn check_shared(name: &str) {
    let device = Device::flex();
    let dir = shared(&format!("fixtures/{name}"));
    let config =
        ClipSegConfig::from_json(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let weights = Weights::from_safetensors(&bytes, name).unwrap();
    let inputs = Reference::read(&dir.join("inputs.safetensors"));
    let (px_shape, px) = inputs.get("pixel_values");
    let model = ClipSeg::load(&config, &weights, px_shape[2], &device).unwrap();
    let ids = inputs.i64_rows("input_ids");
    let masks = inputs.i64_rows("attention_mask");
    let prompts: Vec<TokenizedPrompt> = ids
        .into_iter()
        .zip(masks)
        .map(|(ids, attention_mask)| TokenizedPrompt {
            ids,
            attention_mask,
        })
        .collect();
    let px: Vec<f32> = px.iter().map(|&v| v as f32).collect();
    let pixels = Tensor::<4>::from_data(
        TensorData::new(px, [px_shape[0], px_shape[1], px_shape[2], px_shape[3]]),
        &device,
    );
    let logits = values(model.forward(pixels, &prompts, &device).unwrap());
    let truth = Reference::read(&dir.join("outputs_f64.safetensors"));
    assert_close(
        &format!("{name}: logits vs float64"),
        &logits,
        &truth.f32("logits"),
        TOL,
    );
    let (_, pooled) = model.text.forward(&prompts, true, &device).unwrap();
    assert_close(
        &format!("{name}: text pooled vs float64"),
        &values(pooled),
        &truth.f32("text.pooler_output"),
        TOL,
    );
}

#[test]
fn shared_fixture_tiny_simple_matches_float64() {
    check_shared("tiny_simple");
}

#[test]
fn shared_fixture_tiny_refined_matches_float64() {
    check_shared("tiny_refined");
}

#[test]
fn loading_from_bytes_equals_loading_from_the_directory() {
    let device = Device::flex();
    let dir = fixture("clipseg_refined");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let (config, weights, pre, vocab, merges) = (
        read("config.json"),
        read("model.safetensors"),
        read("preprocessor_config.json"),
        read("vocab.json"),
        read("merges.txt"),
    );
    let files = vlsm::ModelFiles {
        config_json: &config,
        safetensors: &weights,
        preprocessor_config_json: Some(&pre),
        vocab_json: Some(&vocab),
        merges_txt: Some(&merges),
        ..Default::default()
    };
    let from_bytes = Segmenter::from_files(&files, &device).unwrap();
    let from_dir = Segmenter::from_dir(&dir, &device).unwrap();
    let rgb =
        preprocess::decode_rgb(&std::fs::read(fixture("images/rgb_53x37.png")).unwrap()).unwrap();
    let a = from_bytes
        .decode(&from_bytes.encode_image(&rgb).unwrap(), &["polyp"])
        .unwrap();
    let b = from_dir
        .decode(&from_dir.encode_image(&rgb).unwrap(), &["polyp"])
        .unwrap();
    assert_eq!(a, b);
}

/// bf16 linears (`--precision bf16`) against f32 on the refined fixture: logits within a few
/// percent of their range, masks nearly all the same. The figures are printed for the
/// README's accuracy table (`cargo test -p vlsm-tests bf16 -- --nocapture`).
#[test]
fn bf16_linears_stay_close_to_f32() {
    let seg = Segmenter::from_dir(&fixture("clipseg_refined"), &Device::flex()).unwrap();
    let image = image::open(fixture("images/rgb_150x100.png"))
        .unwrap()
        .to_rgb8();
    let prompts = ["polyp", "a round pink polyp", "", "skin melanoma"];
    let Some(a) = vlsm_tests::bf16_agreement(&seg, &image, &prompts, 0.5) else {
        return;
    };
    eprintln!("clipseg_refined bf16 vs f32: {a:?}");
    assert!(a.relative < 0.03, "{a:?}");
    assert!(a.mask_agreement > 0.98, "{a:?}");

    // Only the blocks' linears change; the patch embedding and projections stay f32.
    let bf16 = Segmenter::new(seg.model.clone(), seg.pipeline.clone(), &seg.device)
        .with_precision(vlsm::Precision::Bf16)
        .unwrap();
    let vlsm::Model::ClipSeg(m) = &bf16.model else {
        panic!("not CLIPSeg");
    };
    use vlsm::burn::tensor::DType;
    let dtype = |l: &vlsm::burn::nn::Linear| l.weight.val().dtype();
    let layer = &m.vision.layers[0];
    for l in [
        &layer.self_attn.q_proj,
        &layer.self_attn.out_proj,
        &layer.mlp.fc1,
        &layer.mlp.fc2,
    ] {
        assert_eq!(dtype(l), DType::BF16);
    }
    assert_eq!(dtype(&m.text.layers[1].mlp.fc2), DType::BF16);
    assert_eq!(dtype(&m.vision.patch_embedding), DType::F32);
    assert_eq!(dtype(&m.text_projection), DType::F32);
    assert_eq!(dtype(&m.decoder.film_mul), DType::F32);

    // Stored in bf16 as each layer loads (what the CLI does): the same model, bit for bit.
    let loaded = Segmenter::from_dir_in(
        &fixture("clipseg_refined"),
        &Device::flex(),
        vlsm::Precision::Bf16,
    )
    .unwrap();
    let vlsm::Model::ClipSeg(l) = &loaded.model else {
        panic!("not CLIPSeg");
    };
    assert_eq!(dtype(&l.vision.layers[0].mlp.fc1), DType::BF16);
    assert_eq!(dtype(&l.vision.patch_embedding), DType::F32);
    let run = |s: &Segmenter| {
        s.decode(&s.encode_image(&image).unwrap(), &prompts)
            .unwrap()
    };
    for (a, b) in run(&bf16).iter().zip(&run(&loaded)) {
        assert_eq!(a.values, b.values);
    }

    // bf16 runs a batch's prompts through each linear together (one product for all their
    // tokens): a prompt still embeds bit for bit as it does alone.
    let film = |prompts: &[&str]| {
        let t = loaded
            .embed_prompts(prompts)
            .unwrap()
            .conditioning
            .film()
            .unwrap()
            .clone();
        vlsm_tests::values(t)
    };
    let together = film(&prompts);
    let width = together.len() / prompts.len();
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(film(&[p]), together[i * width..(i + 1) * width], "{p:?}");
    }
}
