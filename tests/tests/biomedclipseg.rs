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

/// A reference to check a model against: the inputs (pixels, image index, token ids), the
/// images they come from, and reference tensors (float64 where there are), named
/// `{prefix}{name}`.
struct Case {
    what: String,
    images: Vec<PathBuf>,
    prompts: Vec<String>,
    inputs: Reference,
    reference: Reference,
    /// Float32 intermediates the float64 file lacks (the decoder layers), if any.
    reference_f32: Option<Reference>,
    prefix: String,
}

impl Case {
    /// An independent shared fixture (`../shared/fixtures/<name>`).
    fn shared(name: &str) -> Self {
        let dir = shared(&format!("fixtures/{name}"));
        let inputs = Reference::read(&dir.join("inputs.safetensors"));
        let pairs = manifest(&dir)["pairs"].as_array().unwrap().clone();
        let index = inputs.get("image_index").1.clone();
        let mut images = vec![PathBuf::new(); inputs.get("pixel_values").0[0]];
        for (pair, &i) in pairs.iter().zip(&index) {
            images[i as usize] = dir.join(pair["image"].as_str().unwrap());
        }
        Self {
            what: name.into(),
            images,
            prompts: pairs
                .iter()
                .map(|p| p["prompt"].as_str().unwrap().into())
                .collect(),
            inputs,
            reference: Reference::read(&dir.join("outputs_f64.safetensors")),
            reference_f32: Some(Reference::read(&dir.join("outputs.safetensors"))),
            prefix: String::new(),
        }
    }

    /// vlsm's own fixture (tools/make_biomed_fixtures.py), reference tensors under `tag.`.
    fn own(tag: &str) -> Self {
        let dir = vlsm_tests::fixture("biomedclipseg");
        let m = manifest(&dir);
        let images = vlsm_tests::fixture("images");
        Self {
            what: format!("own fixture, {tag}"),
            images: m["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| images.join(n.as_str().unwrap()))
                .collect(),
            prompts: m["pairs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["prompt"].as_str().unwrap().into())
                .collect(),
            inputs: Reference::read(&dir.join("reference.safetensors")),
            reference: Reference::read(&dir.join("reference.safetensors")),
            reference_f32: None,
            prefix: format!("{tag}."),
        }
    }

    fn expected(&self, name: &str) -> Option<Vec<f32>> {
        let key = format!("{}{name}", self.prefix);
        self.reference
            .tensors
            .contains_key(&key)
            .then(|| self.reference.f32(&key))
    }
}

/// Runs the model on the case's inputs and compares tokens, pixels, taps (block outputs 4,
/// 7, 10), BERT's CLS row, the FiLM vector, the decoder's intermediates and the logits.
fn check(seg: &Segmenter, case: &Case) {
    let device = Device::flex();
    let what = &case.what;
    let index: Vec<i64> = case
        .inputs
        .get("image_index")
        .1
        .iter()
        .map(|&i| i as i64)
        .collect();

    // Tokens: the BERT WordPiece ids, [CLS] … [SEP], padded with 0 to 256.
    let prompts: Vec<&str> = case.prompts.iter().map(String::as_str).collect();
    let tokens = seg.tokenize(&prompts).unwrap();
    let ids: Vec<Vec<i64>> = tokens.iter().map(|t| t.ids.clone()).collect();
    assert_eq!(ids, case.inputs.i64_rows("input_ids"), "{what}: token ids");
    let masks: Vec<Vec<i64>> = tokens.iter().map(|t| t.attention_mask.clone()).collect();
    assert_eq!(
        masks,
        case.inputs.i64_rows("attention_mask"),
        "{what}: attention mask"
    );

    // Preprocessing: medvlsm's dataset output from the image files (one greyscale).
    let s = seg.input_size();
    for (i, path) in case.images.iter().enumerate() {
        let rgb = preprocess::decode_rgb(&std::fs::read(path).unwrap()).unwrap();
        let px = preprocess::pixel_values(&rgb, &seg.pipeline.preprocess).unwrap();
        assert_close(
            &format!("{what}: pixel values of {}", path.display()),
            &px,
            &rows(&case.inputs, "pixel_values", &[i]),
            1e-5,
        );
    }
    let pixels = Tensor::<4>::from_data(
        TensorData::new(
            case.inputs.f32("pixel_values"),
            [case.images.len(), 3, s, s],
        ),
        &device,
    );
    let taps = seg.model.vision_taps(pixels.clone()).unwrap();
    for (tap, block) in taps.iter().zip([10, 7, 4]) {
        assert_close(
            &format!("{what}: vision block output {block}"),
            &values(tap.clone()),
            &case
                .expected(&format!("vision.block_output.{block}"))
                .unwrap(),
            TOL,
        );
    }
    let vlsm::Model::BiomedClipSeg(model) = &seg.model else {
        panic!("{what}: not loaded as BiomedCLIPSeg");
    };
    assert_close(
        &format!("{what}: pooled text"),
        &values(model.pooled_text(&tokens, &device).unwrap()),
        &case.expected("text.pooled").unwrap(),
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
        &format!("{what}: projected text"),
        &values(conditioning.clone()),
        &case.expected("text.projected").unwrap(),
        TOL,
    );

    // Decoder and logits, image index[b] with prompt b.
    let n = index.len();
    let batch = pixels.select(0, Tensor::from_data(TensorData::new(index, [n]), &device));
    let encoded = seg.model.encode_image(batch).unwrap();
    let image = encoded.clipseg().unwrap();
    let trace = seg.model.decode_traced(image, conditioning).unwrap();
    if let Some(film) = case.expected("decoder.film_output") {
        assert_close(
            &format!("{what}: FiLM output"),
            &values(trace.film_output),
            &film,
            TOL,
        );
    }
    if let Some(f32_ref) = &case.reference_f32 {
        for (i, out) in trace.layer_outputs.iter().enumerate() {
            assert_close(
                &format!("{what}: decoder layer {i}"),
                &values(out.clone()),
                &f32_ref.f32(&format!("decoder.layer_output.{i}")),
                TOL,
            );
        }
    }
    if let Some(map) = case.expected("decoder.feature_map") {
        assert_close(
            &format!("{what}: feature map"),
            &values(trace.feature_map),
            &map,
            TOL,
        );
    }
    let expected_logits = case.expected("logits").unwrap();
    assert_close(
        &format!("{what}: logits"),
        &values(trace.logits),
        &expected_logits,
        TOL,
    );

    // The high-level path (encode once per image, decode each prompt) gives the same.
    let per_pair = s * s;
    for (b, &i) in case.inputs.get("image_index").1.iter().enumerate() {
        let path = &case.images[i as usize];
        let rgb = preprocess::decode_rgb(&std::fs::read(path).unwrap()).unwrap();
        let encoded = seg.encode_image(&rgb).unwrap();
        let logits = seg.decode(&encoded, &[prompts[b]]).unwrap().remove(0);
        assert_eq!(logits.size, s);
        assert_close(
            &format!("{what}: segmenter logits of pair {b}"),
            &logits.values,
            &expected_logits[b * per_pair..(b + 1) * per_pair],
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
    check(&seg, &Case::shared("tiny_biomedclipseg"));
}

#[test]
fn biomedclipseg_from_checkpoint_safetensors_matches_medvlsm() {
    let dir = shared("fixtures/tiny_biomedclipseg");
    let st = dir.join("checkpoints/best.safetensors");
    let seg = sources(&dir, Arch::BiomedClipSeg, Some(st))
        .load(&Device::flex())
        .unwrap();
    check(&seg, &Case::shared("tiny_biomedclipseg"));
}

#[test]
fn biomedclipseg_d_from_hub_repos_matches_medvlsm() {
    let dir = shared("fixtures/tiny_biomedclipseg_d");
    let seg = sources(&dir, Arch::BiomedClipSegD, None)
        .load(&Device::flex())
        .unwrap();
    assert_eq!(seg.arch(), Arch::BiomedClipSegD);
    check(&seg, &Case::shared("tiny_biomedclipseg_d"));
}

#[test]
fn vlsm_folder_round_trips() {
    let dir = shared("fixtures/tiny_biomedclipseg_d");
    let out = tempfile::tempdir().unwrap();
    sources(&dir, Arch::BiomedClipSegD, None)
        .write_folder(out.path(), vlsm::weights::Storage::F32, None)
        .unwrap();
    let seg = Segmenter::from_dir(out.path(), &Device::flex()).unwrap();
    assert_eq!(seg.arch(), Arch::BiomedClipSegD);
    check(&seg, &Case::shared("tiny_biomedclipseg_d"));
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
    check(&seg, &Case::shared("tiny_biomedclipseg_d"));
    // The page's load: the weights streamed in odd-sized chunks, each tensor freed as it loads.
    check(
        &vlsm_tests::load_streamed(out.path(), 4093),
        &Case::shared("tiny_biomedclipseg_d"),
    );
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

fn own(arch: Arch, decoder: Option<&str>) -> Segmenter {
    let dir = vlsm_tests::fixture("biomedclipseg");
    sources(&dir, arch, decoder.map(|d| dir.join(d)))
        .load(&Device::flex())
        .unwrap_or_else(|e| panic!("{decoder:?}: {e}"))
}

#[test]
fn own_fixture_every_checkpoint_format_matches_medvlsm() {
    check(
        &own(Arch::BiomedClipSeg, Some("checkpoints/best.ckpt")),
        &Case::own("trained"),
    );
    check(
        &own(Arch::BiomedClipSeg, Some("checkpoints/best.safetensors")),
        &Case::own("trained"),
    );
    // float16 weights, against the float64 forward of the same rounded weights.
    check(
        &own(Arch::BiomedClipSeg, Some("checkpoints/best-fp16.ckpt")),
        &Case::own("fp16"),
    );
    // Towers from the hub's pickle, decoder from CIDAS's safetensors.
    check(&own(Arch::BiomedClipSegD, None), &Case::own("d"));
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
    .write_folder(out.path(), vlsm::weights::Storage::F32, None)
    .unwrap();
    let seg = Segmenter::from_dir(out.path(), &Device::flex()).unwrap();
    assert_eq!(seg.arch(), Arch::BiomedClipSeg);
    check(&seg, &Case::own("trained"));
}

/// A prompt's conditioning is the same alone and batched with a longer (padded) one: the
/// padded prompt's attention runs as the shorter sequence it stands for.
#[test]
fn a_prompt_embeds_the_same_alone_and_padded_in_a_batch() {
    let seg = own(Arch::BiomedClipSegD, None);
    let short = "a polyp";
    let long = "a very large pink polyp with an irregular surface in the upper left of the image";
    let film = |prompts: &[&str]| {
        let embedded = seg.embed_prompts(prompts).unwrap();
        embedded.conditioning.film().unwrap().clone()
    };
    let alone = film(&[short]);
    let padded = film(&[long, short]).narrow(0, 1, 1);
    assert_eq!(alone.into_data(), padded.into_data());
}

/// int8 weights (vlsm's folder written with `Storage::Int8`, as `vlsm convert --int8` does)
/// against f32: ViT, BERT and the decoder.
#[test]
fn int8_weights_stay_close_to_f32() {
    let image = image::open(vlsm_tests::fixture("images/rgb_150x100.png"))
        .unwrap()
        .to_rgb8();
    let dir = vlsm_tests::fixture("biomedclipseg");
    let out = tempfile::tempdir().unwrap();
    sources(&dir, Arch::BiomedClipSegD, None)
        .write_folder(out.path(), vlsm::weights::Storage::Int8, None)
        .unwrap();
    let int8 = Segmenter::from_dir(out.path(), &Device::flex()).unwrap();
    let seg = own(Arch::BiomedClipSegD, None);
    let a = vlsm_tests::agreement(&seg, &int8, &image, &["polyp", "a large polyp"], 0.5);
    eprintln!("BiomedCLIPSeg-D int8 weights vs f32: {a:?}");
    assert!(a.max_abs > 0.0, "int8 weights gave f32's logits exactly");
    assert!(a.relative < 0.03, "{a:?}");
    assert!(a.mask_agreement > 0.98, "{a:?}");
}

/// bf16 linears against f32 (BERT and timm's ViT: GELU MLPs, fused qkv split in three).
#[test]
fn bf16_linears_stay_close_to_f32() {
    let image = image::open(vlsm_tests::fixture("images/rgb_150x100.png"))
        .unwrap()
        .to_rgb8();
    for (arch, decoder) in [
        (Arch::BiomedClipSeg, Some("checkpoints/best.safetensors")),
        (Arch::BiomedClipSegD, None),
    ] {
        let seg = own(arch, decoder);
        let Some(a) = vlsm_tests::bf16_agreement(&seg, &image, &["polyp", "a large polyp"], 0.5)
        else {
            return;
        };
        eprintln!("{arch} bf16 vs f32: {a:?}");
        assert!(a.relative < 0.03, "{arch}: {a:?}");
        assert!(a.mask_agreement > 0.98, "{arch}: {a:?}");
    }
}
