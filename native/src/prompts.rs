//! `vlsm prompts DATASET --class NAME`: medvlsm-style P0–P9 annotations for a user's own
//! images and masks. Size, count and location are measured from each mask as medvlsm does;
//! shape and colour (medvlsm asked a VQA model) come from the user or are left out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use vlsm::dataset::PromptValue;
use vlsm::preprocess;
use vlsm::prompts::{PromptAttributes, mask_attributes, number_words, study_prompts};

#[derive(clap::Args)]
pub struct PromptsArgs {
    /// A dataset folder with `images/` and `masks/` (a mask has its image's file stem, plus
    /// --mask-suffix, with any image extension).
    dataset: PathBuf,
    /// The target's name, e.g. "polyp", "skin melanoma", "foot ulcer".
    #[arg(long = "class")]
    class: String,
    /// The target's shape word for p2–p6, p8, p9 (e.g. "round"); left out when not given.
    #[arg(long)]
    shape: Option<String>,
    /// The target's colour word for p3–p6, p8, p9 (e.g. "pink"); left out when not given.
    #[arg(long)]
    color: Option<String>,
    /// A general description for p7–p9 ("{class} which is {description}"); repeat for the
    /// list (medvlsm has 5). Without any, p7–p9 are not written.
    #[arg(long = "description")]
    descriptions: Vec<String>,
    /// Mask file stem = image stem + this (ISIC: `_Segmentation`).
    #[arg(long, default_value = "")]
    mask_suffix: String,
    /// The annotation file written: `anns/<split>.json`.
    #[arg(long, default_value = "test")]
    split: String,
    /// Replace an existing annotation file.
    #[arg(long)]
    force: bool,
}

/// An entry in medvlsm's format (with the keys its loaders expect).
#[derive(Serialize)]
struct EntryOut {
    bbox: [u32; 4],
    cat: u32,
    segment_id: String,
    img_name: String,
    mask_name: String,
    sentences: [Sentence; 1],
    prompts: BTreeMap<String, PromptValue>,
    sentences_num: u32,
}

#[derive(Serialize)]
struct Sentence {
    idx: u32,
    sent_id: u32,
    sent: String,
}

const IMAGE_EXTENSIONS: [&str; 9] = [
    "png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp", "gif", "dcm",
];

pub fn run(args: PromptsArgs) -> Result<()> {
    let class = args.class.trim();
    if class.is_empty() {
        bail!("--class is empty: name the target (e.g. --class polyp)");
    }
    let images_dir = args.dataset.join("images");
    let masks_dir = args.dataset.join("masks");
    for dir in [&images_dir, &masks_dir] {
        if !dir.is_dir() {
            bail!(
                "{} is not a folder (expected images/ and masks/ in {})",
                dir.display(),
                args.dataset.display()
            );
        }
    }
    vlsm::dataset::check_relative(&args.split)?;
    let out = args
        .dataset
        .join("anns")
        .join(format!("{}.json", args.split));
    if out.exists() && !args.force {
        bail!("{} exists: pass --force to replace it", out.display());
    }
    let images = image_files(&images_dir)?;
    if images.is_empty() {
        bail!("{} has no images", images_dir.display());
    }
    let masks = image_files(&masks_dir)?;
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    println!("image\tcount\tsize\tlocation");
    for image in &images {
        let stem = image
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let wanted = format!("{stem}{}", args.mask_suffix);
        let Some(mask) = masks
            .iter()
            .find(|m| m.file_stem().is_some_and(|s| s.to_string_lossy() == wanted))
        else {
            problems.push(format!(
                "{}: no mask named {wanted}.* in {}",
                image.display(),
                masks_dir.display()
            ));
            continue;
        };
        match entry(image, mask, class, &args) {
            Ok((e, measured)) => {
                println!(
                    "{}\t{}\t{}\t{}",
                    e.img_name, measured.count, measured.size, measured.location
                );
                entries.push(e);
            }
            Err(err) => problems.push(format!("{err:#}")),
        }
    }
    // Each problem is a warning; the one error line, at the end, counts them.
    for p in &problems {
        eprintln!("warning: skipped {p}");
    }
    if entries.is_empty() {
        bail!("no image could be annotated");
    }
    std::fs::create_dir_all(out.parent().expect("anns/"))?;
    let json = serde_json::to_vec_pretty(&entries)?;
    crate::segment::write_atomic(&out, &json)?;
    let mut left_out = Vec::new();
    if args.shape.is_none() {
        left_out.push("shape (give --shape)");
    }
    if args.color.is_none() {
        left_out.push("colour (give --color)");
    }
    if args.descriptions.is_empty() {
        left_out.push("p7–p9, which need --description");
    }
    eprintln!(
        "wrote {} entries to {}{}",
        entries.len(),
        out.display(),
        if left_out.is_empty() {
            String::new()
        } else {
            format!("; left out: {}", left_out.join(", "))
        }
    );
    if !problems.is_empty() {
        bail!(
            "{} of {} images could not be annotated (listed above)",
            problems.len(),
            images.len()
        );
    }
    Ok(())
}

fn entry(
    image: &Path,
    mask: &Path,
    class: &str,
    args: &PromptsArgs,
) -> Result<(EntryOut, vlsm::prompts::MaskAttributes)> {
    let bytes = std::fs::read(mask).with_context(|| mask.display().to_string())?;
    let grey = grey_mask(&bytes).with_context(|| mask.display().to_string())?;
    let (w, h) = grey.dimensions();
    let image_bytes = std::fs::read(image).with_context(|| image.display().to_string())?;
    let (iw, ih) = if vlsm::dicom::is_dicom(&image_bytes) {
        vlsm::dicom::DicomFile::read(&image_bytes).map(|f| (f.columns, f.rows))
    } else {
        preprocess::dimensions(&image_bytes)
    }
    .with_context(|| image.display().to_string())?;
    if (iw, ih) != (w, h) {
        bail!(
            "mask {} is {w}×{h} but image {} is {iw}×{ih}",
            mask.display(),
            image.display()
        );
    }
    let measured = mask_attributes(grey.as_raw(), w as usize, h as usize);
    let prompts = if measured.count == 0 {
        // An image without the target: every prompt says so (as BKAI's "no polyp").
        let none = format!("no {class}");
        let mut p = BTreeMap::new();
        p.insert("p0".to_string(), PromptValue::Text(String::new()));
        let last = if args.descriptions.is_empty() { 6 } else { 9 };
        for i in 1..=last {
            p.insert(format!("p{i}"), PromptValue::Text(none.clone()));
        }
        p
    } else {
        let attributes = PromptAttributes {
            class: class.to_string(),
            shape: args.shape.clone().unwrap_or_default(),
            color: args.color.clone().unwrap_or_default(),
            size: measured.size.clone(),
            number: number_words(measured.count as u32),
            location: measured.location.clone(),
        };
        study_prompts(&attributes, &args.descriptions)
    };
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    let entry = EntryOut {
        bbox: foreground_box(grey.as_raw(), w, h),
        cat: 0,
        segment_id: image
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        img_name: name(image),
        mask_name: name(mask),
        sentences: [Sentence {
            idx: 0,
            sent_id: 0,
            sent: String::new(),
        }],
        prompts,
        sentences_num: 1,
    };
    Ok((entry, measured))
}

/// [x1, y1, x2, y2] (x2, y2 exclusive) of the foreground (> 127); zeros when empty.
fn foreground_box(grey: &[u8], w: u32, h: u32) -> [u32; 4] {
    let (mut x1, mut y1, mut x2, mut y2) = (u32::MAX, u32::MAX, 0, 0);
    for y in 0..h {
        for x in 0..w {
            if grey[(y * w + x) as usize] > 127 {
                x1 = x1.min(x);
                y1 = y1.min(y);
                x2 = x2.max(x + 1);
                y2 = y2.max(y + 1);
            }
        }
    }
    if x2 == 0 { [0; 4] } else { [x1, y1, x2, y2] }
}

/// A mask as 8-bit grey: an image's luma, or a DICOM label image's first frame as 255
/// where its value is above 0 (so medvlsm's rules, which count exactly-255 pixels, see it
/// as a binary mask).
fn grey_mask(bytes: &[u8]) -> Result<image::GrayImage> {
    if vlsm::dicom::is_dicom(bytes) {
        let file = vlsm::dicom::DicomFile::read(bytes)?;
        if file.samples_per_pixel != 1 {
            bail!("a DICOM mask must be greyscale");
        }
        let grey = file
            .frame_values(0)?
            .iter()
            .map(|&v| if v > 0.0 { 255 } else { 0 })
            .collect();
        return image::GrayImage::from_raw(file.columns, file.rows, grey)
            .context("DICOM mask size");
    }
    Ok(preprocess::decode_image(bytes)?.to_luma8())
}

fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|e| {
                    IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str())
                })
        })
        .collect();
    files.sort();
    Ok(files)
}
