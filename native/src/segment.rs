//! `vlsm segment IMAGE... --prompt TEXT...`

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use vlsm::{Segmenter, preprocess, render};

use crate::backend::{self, Backend};
use crate::hub;
use crate::timing::Timings;

#[derive(clap::Args)]
pub struct SegmentArgs {
    /// Images to segment (PNG, JPEG, BMP, TIFF, WebP).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// A text prompt; repeat for several. Each image is encoded once for all of them.
    #[arg(long = "prompt", short = 'p', required = true)]
    prompts: Vec<String>,
    /// Hugging Face model id, fetched from the hub (cached).
    #[arg(long, default_value = hub::DEFAULT_MODEL, conflicts_with = "weights")]
    model: String,
    /// A local Hugging Face model directory (config.json, weights, tokenizer files).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Foreground where sigmoid(logit) > threshold.
    #[arg(long, default_value_t = 0.5, value_parser = parse_threshold)]
    threshold: f32,
    /// Output directory for mask and overlay PNGs.
    #[arg(long, default_value = "vlsm-out")]
    out: PathBuf,
    /// Also write raw logits at model resolution as float32 .npy: [P,S,S] (one image) or [N,P,S,S].
    #[arg(long, value_name = "FILE.npy")]
    save_logits: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// Print wall and CPU seconds per phase, and peak memory, to stderr.
    #[arg(long)]
    timings: bool,
}

pub fn parse_threshold(s: &str) -> std::result::Result<f32, String> {
    let t: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(0.0..=1.0).contains(&t) {
        return Err(format!("{t} is outside 0..=1"));
    }
    Ok(t)
}

pub fn run(args: SegmentArgs) -> Result<()> {
    let mut timings = Timings::new(args.timings);
    // Read every image before the (slow) model load, so bad input fails at once.
    let images = timings.measure("read images", || {
        args.images
            .iter()
            .map(|path| {
                let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
                preprocess::decode_rgb(&bytes).with_context(|| format!("{}", path.display()))
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let device = backend::device(args.backend)?;
    let dir = match &args.weights {
        Some(dir) => dir.clone(),
        None => hub::fetch(&args.model)?,
    };
    let segmenter = timings.measure("load model", || {
        Segmenter::from_dir(&dir, &device).with_context(|| format!("loading {}", dir.display()))
    })?;
    let prompts: Vec<&str> = args.prompts.iter().map(String::as_str).collect();
    // The text tower runs once for all images.
    let embedded = timings.measure("decode prompts", || segmenter.embed_prompts(&prompts))?;
    for (prompt, tokens) in prompts.iter().zip(&embedded.tokens) {
        if tokens.len() == segmenter.pipeline.tokenizer.max_length() {
            let short: String = prompt.chars().take(40).collect();
            eprintln!(
                "warning: prompt \"{short}…\" is longer than the model's {} tokens; truncated as transformers does",
                tokens.len()
            );
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let names = output_names(&args.images);
    let size = segmenter.input_size();
    let mut all_logits = Vec::new();
    for (image, name) in images.iter().zip(&names) {
        let encoded = timings.measure("encode image", || segmenter.encode_image(image))?;
        let logits = timings.measure("decode prompts", || {
            segmenter.decode_embedded(&encoded, &embedded)
        })?;
        timings.measure("write outputs", || -> Result<()> {
            let dir = args.out.join(name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (i, (prompt, l)) in prompts.iter().zip(&logits).enumerate() {
                let mask = l.mask_at(args.threshold, image.width(), image.height());
                let stem = format!("{i:02}_{}", vlsm::prompts::slug(prompt));
                let mask_path = dir.join(format!("{stem}.mask.png"));
                write_atomic(
                    &mask_path,
                    &render::mask_png(&mask, image.width(), image.height())?,
                )?;
                let overlay = render::overlay(image, &mask, [255, 40, 40], 0.45)?;
                let overlay_path = dir.join(format!("{stem}.overlay.png"));
                write_atomic(&overlay_path, &render::encode_png(&overlay)?)?;
                let fg = mask.iter().filter(|&&m| m != 0).count() as f64 / mask.len() as f64;
                println!(
                    "{}\t{prompt:?}\t{:.1}% foreground\t{}\t{}",
                    name,
                    fg * 100.0,
                    mask_path.display(),
                    overlay_path.display()
                );
            }
            Ok(())
        })?;
        if args.save_logits.is_some() {
            all_logits.extend(logits.into_iter().flat_map(|l| l.values));
        }
    }
    if let Some(path) = &args.save_logits {
        let (n, p) = (images.len(), prompts.len());
        let shape: Vec<usize> = if n == 1 {
            vec![p, size, size]
        } else {
            vec![n, p, size, size]
        };
        write_atomic(path, &vlsm::render::npy_f32(&shape, &all_logits)?)?;
        println!("logits {shape:?}\t{}", path.display());
    }
    timings.report();
    Ok(())
}

/// One output folder per image, named after the file; repeated names get a suffix.
fn output_names(paths: &[PathBuf]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (i, path) in paths.iter().enumerate() {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let stem = if stem.is_empty() {
            format!("image{i}")
        } else {
            stem
        };
        let name = if names.contains(&stem) {
            format!("{stem}-{i}")
        } else {
            stem
        };
        names.push(name);
    }
    names
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(name) = path.file_name() else {
        bail!("{} is not a file path", path.display());
    };
    let tmp = path.with_file_name(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_image_names_are_kept_apart() {
        let names = output_names(&[PathBuf::from("a/img.png"), PathBuf::from("b/img.png")]);
        assert_eq!(names, ["img", "img-1"]);
    }

    #[test]
    fn thresholds_outside_unit_interval_are_refused() {
        assert!(parse_threshold("0.35").is_ok());
        assert!(parse_threshold("1.5").is_err());
        assert!(parse_threshold("nan").is_err());
        assert!(parse_threshold("abc").is_err());
    }
}
