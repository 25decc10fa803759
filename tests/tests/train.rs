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
