//! BiomedCLIPSeg and BiomedCLIPSeg-D match medvlsm's `BiomedCLIPSeg` (on open_clip 2.24 /
//! timm 0.9.2): the independent fixtures in ../shared/fixtures/tiny_biomedclipseg{,_d},
//! loaded from their folders as they are (hub repos, Lightning `best.ckpt`).

use std::path::{Path, PathBuf};

use vlsm::burn::tensor::{Device, Tensor, TensorData};
use vlsm::files::BiomedSources;
use vlsm::model::Arch;
use vlsm::{Segmenter, TokenizedPrompt, preprocess};
use vlsm_tests::{Reference, assert_close, shared, values};

const TOL: f32 = 1e-4;

const BIOMEDCLIP: &str = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224";
const BERT: &str = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract";
const CIDAS: &str = "CIDAS/clipseg-rd64-refined";

fn sources(fixture: &Path, arch: Arch, decoder: Option<PathBuf>) -> BiomedSources {
    let hub = fixture.join("hub");
    BiomedSources {
        arch,
        biomedclip: hub.join(BIOMEDCLIP),
        bert: hub.join(BERT),
        bert_tokenizer: hub.join(BERT),
        cidas: hub.join(CIDAS),
        decoder,
    }
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Rows `index` of a `[N, …]` reference tensor.
fn rows(r: &Reference, name: &str, index: &[usize]) -> Vec<f32> {
    let (shape, v) = r.get(name);
    let row: usize = shape[1..].iter().product();
    index
        .iter()
        .flat_map(|&i| v[i * row..(i + 1) * row].iter().map(|&x| x as f32))
        .collect()
}

/// Runs the model on the fixture's own inputs and compares every checked tensor with the
/// float64 reference (and the float32 one where only that exists).
fn check(seg: &Segmenter, dir: &Path, what: &str) {
    let device = Device::flex();
    let m = manifest(dir);
    let inputs = Reference::read(&dir.join("inputs.safetensors"));
    let f64_ref = Reference::read(&dir.join("outputs_f64.safetensors"));
    let f32_ref = Reference::read(&dir.join("outputs.safetensors"));
    let pairs = m["pairs"].as_array().unwrap();
    let index: Vec<usize> = inputs
        .get("image_index")
        .1
        .iter()
        .map(|&i| i as usize)
        .collect();

    // Tokens: the BERT WordPiece ids, [CLS] … [SEP], padded with 0 to 256.
    let prompts: Vec<&str> = pairs
        .iter()
        .map(|p| p["prompt"].as_str().unwrap())
        .collect();
    let tokens = seg.tokenize(&prompts).unwrap();
    let ids: Vec<Vec<i64>> = tokens.iter().map(|t| t.ids.clone()).collect();
    assert_eq!(ids, inputs.i64_rows("input_ids"), "{what}: token ids");
    let masks: Vec<Vec<i64>> = tokens.iter().map(|t| t.attention_mask.clone()).collect();
    assert_eq!(
        masks,
        inputs.i64_rows("attention_mask"),
        "{what}: attention mask"
    );

    // Preprocessing: medvlsm's dataset output from the PNGs (one greyscale).
    let s = seg.input_size();
    let (px_shape, _) = inputs.get("pixel_values");
    let n_images = px_shape[0];
    let mut image_names = vec![String::new(); n_images];
    for (pair, &i) in pairs.iter().zip(&index) {
        image_names[i] = pair["image"].as_str().unwrap().to_string();
    }
    for (i, name) in image_names.iter().enumerate() {
        let rgb = preprocess::decode_rgb(&std::fs::read(dir.join(name)).unwrap()).unwrap();
        let px = preprocess::pixel_values(&rgb, &seg.pipeline.preprocess).unwrap();
        assert_close(
            &format!("{what}: pixel values of {name}"),
            &px,
            &rows(&inputs, "pixel_values", &[i]),
            1e-5,
        );
    }

    // Vision: block outputs 4, 7, 10 are the taps.
    let pixels = Tensor::<4>::from_data(
        TensorData::new(inputs.f32("pixel_values"), [n_images, 3, s, s]),
        &device,
    );
    let taps = seg.model.vision_taps(pixels.clone()).unwrap();
    for (tap, block) in taps.iter().zip([10, 7, 4]) {
        assert_close(
            &format!("{what}: vision block output {block}"),
            &values(tap.clone()),
            &f64_ref.f32(&format!("vision.block_output.{block}")),
            TOL,
        );
    }

    // Text: CLS of BERT's last state, then the MLP projection (the FiLM vector).
    let vlsm::Model::BiomedClipSeg(model) = &seg.model else {
        panic!("{what}: not loaded as BiomedCLIPSeg");
    };
    let pooled = model.pooled_text(&tokens, &device).unwrap();
    assert_close(
        &format!("{what}: pooled text"),
        &values(pooled),
        &f64_ref.f32("text.pooled"),
        TOL,
    );
    let conditioning = seg.model.embed_prompts(&tokens, &device).unwrap();
    assert_close(
        &format!("{what}: projected text"),
        &values(conditioning.clone()),
        &f64_ref.f32("text.projected"),
        TOL,
    );

    // Decoder and logits, image index[b] with prompt b.
    let rows_of = |t: Tensor<4>| {
        let idx = TensorData::new(index.iter().map(|&i| i as i64).collect(), [index.len()]);
        t.select(0, Tensor::from_data(idx, &device))
    };
    let image = seg.model.encode_image(rows_of(pixels)).unwrap();
    let trace = seg.model.decode_traced(&image, conditioning).unwrap();
    assert_close(
        &format!("{what}: FiLM output"),
        &values(trace.film_output),
        &f64_ref.f32("decoder.film_output"),
        TOL,
    );
    for (i, out) in trace.layer_outputs.iter().enumerate() {
        assert_close(
            &format!("{what}: decoder layer {i}"),
            &values(out.clone()),
            &f32_ref.f32(&format!("decoder.layer_output.{i}")),
            TOL,
        );
    }
    assert_close(
        &format!("{what}: feature map"),
        &values(trace.feature_map),
        &f64_ref.f32("decoder.feature_map"),
        TOL,
    );
    assert_close(
        &format!("{what}: logits"),
        &values(trace.logits),
        &f64_ref.f32("logits"),
        TOL,
    );

    // The high-level path (encode once per image, decode each prompt) gives the same.
    for (b, pair) in pairs.iter().enumerate() {
        let name = pair["image"].as_str().unwrap();
        let rgb = preprocess::decode_rgb(&std::fs::read(dir.join(name)).unwrap()).unwrap();
        let encoded = seg.encode_image(&rgb).unwrap();
        let logits = seg.decode(&encoded, &[prompts[b]]).unwrap().remove(0);
        assert_eq!(logits.size, s);
        assert_close(
            &format!("{what}: segmenter logits of pair {b}"),
            &logits.values,
            &rows(&f64_ref, "logits", &[b]),
            TOL,
        );
    }
}

#[test]
fn biomedclipseg_from_lightning_checkpoint_matches_medvlsm() {
    let dir = shared("fixtures/tiny_biomedclipseg");
    let ckpt = dir.join("checkpoints/best.ckpt");
    let seg = sources(&dir, Arch::BiomedClipSeg, Some(ckpt))
        .load(&Device::flex())
        .unwrap();
    assert_eq!(seg.arch(), Arch::BiomedClipSeg);
    assert_eq!(seg.default_threshold(), 0.5);
    check(&seg, &dir, "best.ckpt");
}

#[test]
fn biomedclipseg_from_checkpoint_safetensors_matches_medvlsm() {
    let dir = shared("fixtures/tiny_biomedclipseg");
    let st = dir.join("checkpoints/best.safetensors");
    let seg = sources(&dir, Arch::BiomedClipSeg, Some(st))
        .load(&Device::flex())
        .unwrap();
    check(&seg, &dir, "best.safetensors");
}

#[test]
fn biomedclipseg_d_from_hub_repos_matches_medvlsm() {
    let dir = shared("fixtures/tiny_biomedclipseg_d");
    let seg = sources(&dir, Arch::BiomedClipSegD, None)
        .load(&Device::flex())
        .unwrap();
    assert_eq!(seg.arch(), Arch::BiomedClipSegD);
    check(&seg, &dir, "BiomedCLIPSeg-D");
}

#[test]
fn vlsm_folder_round_trips() {
    let dir = shared("fixtures/tiny_biomedclipseg_d");
    let out = tempfile::tempdir().unwrap();
    sources(&dir, Arch::BiomedClipSegD, None)
        .write_folder(out.path(), false, None)
        .unwrap();
    let seg = Segmenter::from_dir(out.path(), &Device::flex()).unwrap();
    assert_eq!(seg.arch(), Arch::BiomedClipSegD);
    check(&seg, &dir, "vlsm folder");
    // The page's path: the same folder from bytes.
    let read = |n: &str| std::fs::read(out.path().join(n)).unwrap();
    let (config, weights, vocab) = (
        read("config.json"),
        read("model.safetensors"),
        read("vocab.txt"),
    );
    let files = vlsm::ModelFiles {
        config_json: &config,
        safetensors: &weights,
        vocab_txt: Some(&vocab),
        ..Default::default()
    };
    let seg = Segmenter::from_files(&files, &Device::flex()).unwrap();
    check(&seg, &dir, "vlsm folder from bytes");
}

#[test]
fn biomedclipseg_without_a_decoder_is_refused() {
    let dir = shared("fixtures/tiny_biomedclipseg");
    let e = sources(&dir, Arch::BiomedClipSeg, None)
        .load(&Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no trained decoder") && e.contains("biomedclipseg-d"),
        "{e}"
    );
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn prompts_beyond_256_tokens_are_truncated() {
    let dir = shared("fixtures/tiny_biomedclipseg_d");
    let seg = sources(&dir, Arch::BiomedClipSegD, None)
        .load(&Device::flex())
        .unwrap();
    let long = "polyp ".repeat(2000);
    let t: Vec<TokenizedPrompt> = seg.tokenize(&[long.as_str()]).unwrap();
    assert_eq!(t[0].ids.len(), 256);
    assert_eq!(t[0].ids[255], 3, "[SEP] closes a truncated prompt");
    assert!(t[0].attention_mask.iter().all(|&m| m == 1));
    let rgb = preprocess::decode_rgb(&std::fs::read(dir.join("image0.png")).unwrap()).unwrap();
    let logits = seg
        .decode(&seg.encode_image(&rgb).unwrap(), &[long.as_str()])
        .unwrap();
    assert!(logits[0].values.iter().all(|v| v.is_finite()));
}

/// vlsm's own fixture (tools/make_biomed_fixtures.py): reference tensors under `tag.`.
fn check_own(seg: &Segmenter, tag: &str, tol: f32) {
    let device = Device::flex();
    let dir = vlsm_tests::fixture("biomedclipseg");
    let r = Reference::read(&dir.join("reference.safetensors"));
    let m = manifest(&dir);
    let pairs = m["pairs"].as_array().unwrap();
    let prompts: Vec<&str> = pairs
        .iter()
        .map(|p| p["prompt"].as_str().unwrap())
        .collect();
    let tokens = seg.tokenize(&prompts).unwrap();
    let ids: Vec<Vec<i64>> = tokens.iter().map(|t| t.ids.clone()).collect();
    assert_eq!(ids, r.i64_rows("input_ids"), "{tag}: token ids");
    let s = seg.input_size();
    assert_eq!(s, 64);
    let images = m["images"].as_array().unwrap();
    for (i, name) in images.iter().enumerate() {
        let path = vlsm_tests::fixture("images").join(name.as_str().unwrap());
        let rgb = preprocess::decode_rgb(&std::fs::read(path).unwrap()).unwrap();
        let px = preprocess::pixel_values(&rgb, &seg.pipeline.preprocess).unwrap();
        assert_close(
            &format!("{tag}: pixels of {name}"),
            &px,
            &rows(&r, "pixel_values", &[i]),
            1e-5,
        );
    }
    let pixels = Tensor::<4>::from_data(
        TensorData::new(r.f32("pixel_values"), [images.len(), 3, s, s]),
        &device,
    );
    for (tap, block) in seg
        .model
        .vision_taps(pixels.clone())
        .unwrap()
        .iter()
        .zip([10, 7, 4])
    {
        assert_close(
            &format!("{tag}: block output {block}"),
            &values(tap.clone()),
            &r.f32(&format!("{tag}.vision.block_output.{block}")),
            tol,
        );
    }
    let vlsm::Model::BiomedClipSeg(model) = &seg.model else {
        panic!("{tag}: not BiomedCLIPSeg");
    };
    assert_close(
        &format!("{tag}: pooled text"),
        &values(model.pooled_text(&tokens, &device).unwrap()),
        &r.f32(&format!("{tag}.text.pooled")),
        tol,
    );
    let conditioning = seg.model.embed_prompts(&tokens, &device).unwrap();
    assert_close(
        &format!("{tag}: FiLM vector"),
        &values(conditioning.clone()),
        &r.f32(&format!("{tag}.text.projected")),
        tol,
    );
    let index: Vec<i64> = r.get("image_index").1.iter().map(|&i| i as i64).collect();
    let n = index.len();
    let batch = pixels.select(0, Tensor::from_data(TensorData::new(index, [n]), &device));
    let logits = seg
        .model
        .decode(&seg.model.encode_image(batch).unwrap(), conditioning)
        .unwrap();
    assert_close(
        &format!("{tag}: logits"),
        &values(logits),
        &r.f32(&format!("{tag}.logits")),
        tol,
    );
}

fn own(arch: Arch, decoder: Option<&str>) -> Segmenter {
    let dir = vlsm_tests::fixture("biomedclipseg");
    sources(&dir, arch, decoder.map(|d| dir.join(d)))
        .load(&Device::flex())
        .unwrap_or_else(|e| panic!("{decoder:?}: {e}"))
}

#[test]
fn own_fixture_every_checkpoint_format_matches_medvlsm() {
    check_own(
        &own(Arch::BiomedClipSeg, Some("checkpoints/best.ckpt")),
        "trained",
        TOL,
    );
    check_own(
        &own(Arch::BiomedClipSeg, Some("checkpoints/best.safetensors")),
        "trained",
        TOL,
    );
    // float16 weights, against the float64 forward of the same rounded weights.
    check_own(
        &own(Arch::BiomedClipSeg, Some("checkpoints/best-fp16.ckpt")),
        "fp16",
        TOL,
    );
    // Towers from the hub's pickle, decoder from CIDAS's safetensors.
    check_own(&own(Arch::BiomedClipSegD, None), "d", TOL);
}

#[test]
fn own_fixture_trained_decoder_exported_and_reloaded() {
    // vlsm's folder from the Lightning checkpoint, read back from disk and from bytes.
    let dir = vlsm_tests::fixture("biomedclipseg");
    let out = tempfile::tempdir().unwrap();
    sources(
        &dir,
        Arch::BiomedClipSeg,
        Some(dir.join("checkpoints/best.ckpt")),
    )
    .write_folder(out.path(), false, None)
    .unwrap();
    let seg = Segmenter::from_dir(out.path(), &Device::flex()).unwrap();
    assert_eq!(seg.arch(), Arch::BiomedClipSeg);
    check_own(&seg, "trained", TOL);
}
