//! Fine-tuning pieces against references: the soft Dice loss and its gradient against MONAI's
//! `DiceLoss` (`tools/dice_loss_reference.py`), and the decoder's export to Hugging Face
//! names and layouts as the exact inverse of loading.

use serde_json::Value;
use vlsm::burn::tensor::{Device, Tensor, TensorData};
use vlsm::train::soft_dice_loss;
use vlsm::{Segmenter, Weights};
use vlsm_tests::fixture;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn soft_dice_loss_and_gradient_equal_monai() {
    let reference: Value =
        serde_json::from_slice(&std::fs::read(fixture("train/dice_loss_reference.json")).unwrap())
            .unwrap();
    let device = Device::flex().autodiff();
    for case in reference["cases"].as_array().unwrap() {
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let shape = [shape[0], shape[1], shape[2]];
        let logits =
            Tensor::<3>::from_data(TensorData::new(floats(&case["logits"]), shape), &device)
                .require_grad();
        let target =
            Tensor::<3>::from_data(TensorData::new(floats(&case["target"]), shape), &device);
        let loss = soft_dice_loss(logits.clone(), target);
        let value = f64::from(loss.clone().into_scalar::<f32>());
        let expected = case["loss"].as_f64().unwrap();
        assert!(
            (value - expected).abs() < 1e-5,
            "{shape:?}: loss {value}, MONAI {expected}"
        );
        let grads = loss.backward();
        let grad = logits
            .grad(&grads)
            .unwrap()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let expected = floats(&case["grad"]);
        let worst = grad
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = expected.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        assert!(
            worst <= 1e-4 * scale.max(1e-3),
            "{shape:?}: gradient differs by {worst} (scale {scale})"
        );
    }
}

#[test]
fn exporting_an_untrained_model_gives_back_the_checkpoint() {
    for name in ["clipseg_refined", "clipseg_simple"] {
        let dir = fixture(name);
        let segmenter = Segmenter::from_dir(&dir, &Device::flex()).unwrap();
        let exported = segmenter.model.decoder.export().unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let weights = Weights::from_safetensors(&bytes, "model.safetensors").unwrap();
        let decoder_keys: Vec<&str> = weights
            .keys()
            .filter(|k| k.starts_with("decoder."))
            .collect();
        assert_eq!(
            exported.len(),
            decoder_keys.len(),
            "{name}: every decoder tensor, no more"
        );
        for (key, shape, values) in &exported {
            assert_eq!(
                weights.shape(key).unwrap_or_else(|| panic!("{key}")),
                shape.as_slice(),
                "{name} {key}"
            );
            assert_eq!(
                &weights.read_f32(key, shape).unwrap(),
                values,
                "{name} {key}: values differ"
            );
        }
    }
}

/// Two training steps in a row equal one step, a save (weights + optimizer state) and a
/// rebuild from what was saved, then the second step: what `--resume` relies on.
#[test]
fn saving_and_rebuilding_between_steps_changes_nothing() {
    use vlsm::model::ClipSeg;
    use vlsm::train::{ImageSample, Recipe, Trainer, target_tensor};
    let dir = fixture("clipseg_simple");
    let device = Device::flex();
    let segmenter = Segmenter::from_dir(&dir, &device).unwrap();
    let size = segmenter.input_size();
    let samples: Vec<ImageSample> = (0..4)
        .map(|i| {
            let (image, mask) = vlsm::synthetic::ellipse_sample(i, size as u32);
            let pixels =
                vlsm::preprocess::pixel_values(&image, &segmenter.pipeline.preprocess).unwrap();
            ImageSample {
                pixels: vlsm::model::clipseg::pixels_tensor(&[pixels], size, &device),
                prompt: segmenter
                    .pipeline
                    .tokenizer
                    .encode("bright ellipse")
                    .unwrap(),
                target: target_tensor(mask.as_raw(), size, &device),
            }
        })
        .collect();
    let recipe = Recipe {
        batch_size: 4,
        ..Recipe::default()
    };
    let mut straight = Trainer::new(segmenter.model.clone(), recipe.clone(), &device).unwrap();
    straight.epoch(&samples, &samples, |_, _, _| {}).unwrap();
    let saved_weights = straight.trained().export().unwrap();
    let saved_optimizer = straight.optimizer.into_bytes().unwrap();
    let saved_progress = straight.progress.clone();
    let saved_model = straight.trained();
    straight.epoch(&samples, &samples, |_, _, _| {}).unwrap();

    // Rebuild: the base checkpoint with the saved tensors, a fresh trainer, the saved state.
    let dir2 = tempfile::tempdir().unwrap();
    vlsm::train::export_model(&dir, saved_weights, dir2.path(), false).unwrap();
    let rebuilt: ClipSeg = Segmenter::from_dir(dir2.path(), &device).unwrap().model;
    // Full fine-tuning keeps the (resampled) vision position table fixed.
    let table = |m: &ClipSeg| {
        m.vision
            .position_embedding
            .val()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    assert_eq!(table(&saved_model), table(&segmenter.model));
    let mut resumed = Trainer::new(rebuilt, recipe, &device).unwrap();
    resumed.progress = saved_progress;
    resumed.optimizer = resumed
        .optimizer
        .clone()
        .from_bytes(saved_optimizer)
        .unwrap();
    resumed.epoch(&samples, &samples, |_, _, _| {}).unwrap();
    let a = straight.trained().export().unwrap();
    let b = resumed.trained().export().unwrap();
    let mut worst = (0.0f32, String::new());
    for ((ka, _, va), (_, _, vb)) in a.iter().zip(&b) {
        let d = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        if d > worst.0 {
            worst = (d, ka.clone());
        }
    }
    assert_eq!(
        worst.0, 0.0,
        "largest difference {} in {}",
        worst.0, worst.1
    );
}
