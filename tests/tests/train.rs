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
        let exported = segmenter.model.decoder().unwrap().export().unwrap();
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
/// `n` synthetic ellipse samples for full fine-tuning of `segmenter`'s model.
fn image_samples(segmenter: &Segmenter, n: u64) -> Vec<vlsm::train::ImageSample> {
    use vlsm::train::{ImageSample, target_tensor};
    let size = segmenter.input_size();
    let device = &segmenter.device;
    (0..n)
        .map(|i| {
            let (image, mask) = vlsm::synthetic::ellipse_sample(i, size as u32);
            let pixels =
                vlsm::preprocess::pixel_values(&image, &segmenter.pipeline.preprocess).unwrap();
            ImageSample {
                pixels: vlsm::model::clipseg::pixels_tensor(&[pixels], size, device),
                // Two alternatives: every epoch draws one (a list-valued prompt).
                prompts: vec![
                    ["bright ellipse", "light oval blob"]
                        .iter()
                        .map(|t| segmenter.pipeline.tokenizer.encode(t).unwrap())
                        .collect(),
                ],
                target: target_tensor(mask.as_raw(), size, device),
            }
        })
        .collect()
}

#[test]
fn saving_and_rebuilding_between_steps_changes_nothing() {
    use vlsm::train::Precision;
    // float16 also carries the loss scale across the rebuild.
    for precision in [Precision::F32, Precision::F16] {
        save_and_rebuild(precision);
    }
}

fn save_and_rebuild(precision: vlsm::train::Precision) {
    use vlsm::model::ClipSeg;
    use vlsm::train::{Recipe, Trainer};
    let dir = fixture("clipseg_simple");
    let device = Device::flex();
    let segmenter = Segmenter::from_dir(&dir, &device).unwrap();
    let samples = image_samples(&segmenter, 4);
    let recipe = Recipe {
        batch_size: 4,
        precision,
        ..Recipe::default()
    };
    let mut straight = Trainer::new(
        segmenter.model.clipseg().unwrap().clone(),
        recipe.clone(),
        &device,
    )
    .unwrap();
    straight.epoch(&samples, &samples, |_, _, _| {}).unwrap();
    let saved_weights = straight.trained().unwrap().export().unwrap();
    let saved_optimizer = straight.optimizer.into_bytes().unwrap();
    let saved_progress = straight.progress.clone();
    let saved_model = straight.trained().unwrap();
    straight.epoch(&samples, &samples, |_, _, _| {}).unwrap();

    // Rebuild: the base checkpoint with the saved tensors, a fresh trainer, the saved state.
    let dir2 = tempfile::tempdir().unwrap();
    vlsm::train::export_model(&dir, saved_weights, dir2.path(), false).unwrap();
    let rebuilt: ClipSeg = Segmenter::from_dir(dir2.path(), &device)
        .unwrap()
        .model
        .clipseg()
        .unwrap()
        .clone();
    // Full fine-tuning keeps the (resampled) vision position table fixed.
    let table = |m: &ClipSeg| {
        m.vision
            .position_embedding
            .val()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    assert_eq!(
        table(&saved_model),
        table(segmenter.model.clipseg().unwrap())
    );
    let mut resumed = Trainer::new(rebuilt, recipe, &device).unwrap();
    resumed.progress = saved_progress;
    resumed.optimizer = resumed
        .optimizer
        .clone()
        .from_bytes(saved_optimizer)
        .unwrap();
    resumed.epoch(&samples, &samples, |_, _, _| {}).unwrap();
    let a = straight.trained().unwrap().export().unwrap();
    let b = resumed.trained().unwrap().export().unwrap();
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
        "{precision:?}: largest difference {} in {}",
        worst.0, worst.1
    );
}

/// float16 training's dynamic loss scaling, as PyTorch's `GradScaler`: a step whose scaled
/// gradients overflow is skipped and halves the scale; clean steps update the weights.
#[test]
fn float16_overflowing_steps_are_skipped_and_halve_the_loss_scale() {
    use vlsm::train::{Precision, Recipe, Trainer};
    let device = Device::flex();
    let segmenter = Segmenter::from_dir(&fixture("clipseg_simple"), &device).unwrap();
    let samples = image_samples(&segmenter, 40);
    let recipe = Recipe {
        batch_size: 1,
        precision: Precision::F16,
        ..Recipe::default()
    };
    let weights = |t: &Trainer<vlsm::model::ClipSeg>| t.trained().unwrap().export().unwrap();

    // A scale no float16 gradient survives: every step is skipped, nothing moves.
    let mut trainer = Trainer::new(
        segmenter.model.clipseg().unwrap().clone(),
        recipe.clone(),
        &device,
    )
    .unwrap();
    let before = weights(&trainer);
    trainer.progress.loss_scale = 2f64.powi(120);
    let log = trainer
        .epoch(&samples[..2], &samples[..1], |_, _, _| {})
        .unwrap();
    assert_eq!(log.skipped_steps, 2);
    assert_eq!(trainer.progress.loss_scale, 2f64.powi(118));
    assert_eq!(trainer.progress.clean_steps, 0);
    assert!(log.train_loss.is_finite(), "{}", log.train_loss);
    assert!(
        before == weights(&trainer),
        "a skipped step changed weights"
    );

    // A scale that overflows at first: halved until the gradients fit, then steps are taken.
    let mut trainer = Trainer::new(
        segmenter.model.clipseg().unwrap().clone(),
        recipe.clone(),
        &device,
    )
    .unwrap();
    trainer.progress.loss_scale = 2f64.powi(40);
    let log = trainer
        .epoch(&samples, &samples[..1], |_, _, _| {})
        .unwrap();
    let skipped = log.skipped_steps;
    assert!((1..40).contains(&skipped), "{skipped} of 40 steps skipped");
    assert_eq!(trainer.progress.loss_scale, 2f64.powi(40 - skipped as i32));
    assert!(trainer.progress.clean_steps <= 40 - skipped);
    assert!(before != weights(&trainer), "clean steps changed no weight");

    // float32 training ignores the loss scale.
    let mut trainer = Trainer::new(
        segmenter.model.clipseg().unwrap().clone(),
        Recipe {
            precision: Precision::F32,
            ..recipe
        },
        &device,
    )
    .unwrap();
    trainer.progress.loss_scale = 2f64.powi(120);
    let log = trainer
        .epoch(&samples[..2], &samples[..1], |_, _, _| {})
        .unwrap();
    assert_eq!(log.skipped_steps, 0);
    assert_eq!(trainer.progress.loss_scale, 2f64.powi(120));
}

/// The vision taps of synthetic ellipse image `index`, and its mask, at `segmenter`'s size.
fn ellipse_taps(segmenter: &Segmenter, index: u64) -> (Vec<Tensor<3>>, image::GrayImage) {
    let size = segmenter.input_size();
    let (image, mask) = vlsm::synthetic::ellipse_sample(index, size as u32);
    let pixels = vlsm::preprocess::pixel_values(&image, &segmenter.pipeline.preprocess).unwrap();
    let pixels = vlsm::model::clipseg::pixels_tensor(&[pixels], size, &segmenter.device);
    (segmenter.model.vision_taps(pixels).unwrap(), mask)
}

/// Half-precision passes stay finite where float16 arithmetic would overflow: with large
/// activations (as a random full-size decoder has, FiLM outputs in the thousands) the
/// attention scores q·kᵀ exceed float16's 65504, so attention runs in float32.
#[test]
fn float16_training_logits_stay_finite_on_large_activations() {
    use vlsm::burn::module::Module;
    use vlsm::burn::tensor::FloatDType;
    use vlsm::train::{CachedSample, DecoderModel, TrainingModel, cast_params, target_tensor};
    let device = Device::flex();
    let segmenter = Segmenter::from_dir(&fixture("clipseg_refined"), &device).unwrap();
    let size = segmenter.input_size();
    let (taps, mask) = ellipse_taps(&segmenter, 0);
    let sample = CachedSample {
        taps: taps.into_iter().map(|t| t * 1000.0).collect(),
        conditioning: vec![vec![
            segmenter
                .embed_prompts(&["bright ellipse"])
                .unwrap()
                .conditioning
                .film()
                .unwrap()
                .clone(),
        ]],
        target: target_tensor(mask.as_raw(), size, &device),
    };
    let ad = device.autodiff();
    let model = vlsm::train::trainable(
        DecoderModel {
            decoder: segmenter.model.decoder().unwrap().clone(),
            grid: segmenter.model.grid(),
        }
        .fork(&ad),
    );
    let values = |t: Tensor<3>| -> Vec<f32> {
        t.cast(FloatDType::F32)
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let full = values(
        model
            .logits(&[(&sample, (0, 0))], &ad, FloatDType::F32)
            .unwrap(),
    );
    let half = values(
        cast_params(model, FloatDType::F16)
            .logits(&[(&sample, (0, 0))], &ad, FloatDType::F16)
            .unwrap(),
    );
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = full
        .iter()
        .zip(&half)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0f32,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    assert!(
        worst <= 1e-2 * scale,
        "float16 logits off by {worst} (float32 logits up to {scale})"
    );
}

/// A sample with several prompts is shown a freshly drawn one every epoch (medvlsm's list
/// prompts and `random`, redrawn at every `__getitem__`): training with the alternatives
/// A, B ends elsewhere than training with A alone or B alone, and the same seed draws the
/// same prompts again.
#[test]
fn every_epoch_draws_each_sample_a_prompt() {
    use vlsm::train::{CachedSample, DecoderModel, Recipe, Trainer, target_tensor};
    let device = Device::flex();
    let segmenter = Segmenter::from_dir(&fixture("clipseg_refined"), &device).unwrap();
    let size = segmenter.input_size();
    let (taps, mask) = ellipse_taps(&segmenter, 3);
    let embed = |t: &str| {
        let embedded = segmenter.embed_prompts(&[t]).unwrap();
        embedded.conditioning.film().unwrap().clone()
    };
    let (a, b) = (embed("bright ellipse"), embed("dark background"));
    let sample = |conditioning: Vec<Vec<Tensor<2>>>| CachedSample {
        taps: taps.clone(),
        conditioning,
        target: target_tensor(mask.as_raw(), size, &device),
    };
    let train = |conditioning: Vec<Vec<Tensor<2>>>| -> Vec<f32> {
        let model = DecoderModel {
            decoder: segmenter.model.decoder().unwrap().clone(),
            grid: segmenter.model.grid(),
        };
        let recipe = Recipe {
            batch_size: 1,
            ..Recipe::default()
        };
        let mut trainer = Trainer::new(model, recipe, &device).unwrap();
        let train = vec![sample(conditioning)];
        let val = vec![sample(vec![vec![a.clone()]])];
        for _ in 0..8 {
            trainer.epoch(&train, &val, |_, _, _| {}).unwrap();
        }
        trainer
            .trained()
            .unwrap()
            .decoder
            .film_mul
            .weight
            .val()
            .into_data()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let only_a = train(vec![vec![a.clone()]]);
    let only_b = train(vec![vec![b.clone()]]);
    let list = train(vec![vec![a.clone(), b.clone()]]);
    let groups = train(vec![vec![a.clone()], vec![b.clone()]]);
    assert_ne!(list, only_a, "B was never drawn");
    assert_ne!(list, only_b, "A was never drawn");
    assert_eq!(
        list,
        train(vec![vec![a.clone(), b.clone()]]),
        "not reproducible"
    );
    // One group of two members and two groups of one are drawn alike (uniform either way).
    assert_eq!(list, groups);
}

/// `accumulate`: a batch run as several passes takes the same step as the whole batch (a
/// model without BatchNorm: CLIPSeg, fully fine-tuned).
#[test]
fn accumulated_passes_take_the_whole_batch_step() {
    use vlsm::train::{Recipe, Trainer};
    let device = Device::flex();
    let segmenter = Segmenter::from_dir(&fixture("clipseg_simple"), &device).unwrap();
    let samples = image_samples(&segmenter, 6);
    let run = |accumulate: usize| {
        let recipe = Recipe {
            batch_size: 6,
            accumulate,
            lr: 1e-2,
            ..Recipe::default()
        };
        let mut trainer =
            Trainer::new(segmenter.model.clipseg().unwrap().clone(), recipe, &device).unwrap();
        let log = trainer.epoch(&samples, &samples, |_, _, _| {}).unwrap();
        (log.train_loss, trainer.trained().unwrap().export().unwrap())
    };
    let (loss, whole) = run(1);
    for accumulate in [2, 3] {
        let (l, parts) = run(accumulate);
        assert!(
            (l - loss).abs() < 1e-6,
            "{accumulate} passes: loss {l} vs {loss}"
        );
        // Adam divides by √v: where a gradient is zero up to rounding (the key biases',
        // which softmax ignores) the summation order decides the sign of an lr-sized
        // update. Everywhere else the step is the whole batch's.
        let (mut total, mut off) = (0usize, 0usize);
        for ((name, _, a), (_, _, b)) in whole.iter().zip(&parts) {
            for (x, y) in a.iter().zip(b) {
                total += 1;
                let d = (x - y).abs();
                if d > 1e-6 {
                    off += 1;
                }
                assert!(
                    d <= 2.0 * 1e-2 + 1e-6,
                    "{accumulate} passes: {name} off by {d:e}"
                );
            }
        }
        eprintln!("{accumulate} passes: {off} of {total} weights differ by more than 1e-6");
        assert!(
            off * 1000 < total,
            "{accumulate} passes: {off} of {total} weights differ"
        );
    }
}
