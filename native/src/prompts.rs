//! `vlsm prompts DATASET --class NAME`: medvlsm-style P0–P9 annotations for a user's own
//! images and masks. Size, count and location are measured from each mask as medvlsm does;
//! shape and colour (medvlsm asked a VQA model) come from the user or are left out.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use vlsm::clinical::{self, ClinicalImage, Kind, Slice};
use vlsm::dataset::PromptValue;
use vlsm::window::Window;

use crate::segment::{Slices, stem_of};
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
    /// For NIfTI volumes with label volumes: the plane and slices written, one entry each
    /// (`axial`, `coronal:10-50`; default every axial slice). Slices without the target
    /// get "no {class}" prompts, as BKAI's empty images do.
    #[arg(long, value_parser = crate::segment::parse_slices, default_value = "axial")]
    slices: crate::segment::Slices,
    /// For greyscale DICOM and NIfTI images: the window written into each entry (file,
    /// minmax, CENTER,WIDTH or a preset); entries without one use `file`.
    #[arg(long)]
    window: Option<Window>,
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
    /// vlsm's: which picture of a DICOM file or NIfTI volume (see `vlsm::dataset::Entry`).
    #[serde(skip_serializing_if = "Option::is_none")]
    slice: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<String>,
}

#[derive(Serialize)]
struct Sentence {
    idx: u32,
    sent_id: u32,
    sent: String,
}

const IMAGE_EXTENSIONS: [&str; 11] = [
    "png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp", "gif", "dcm", "nii", "gz",
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
        let stem = stem_of(image);
        let wanted = format!("{stem}{}", args.mask_suffix);
        let Some(mask) = masks.iter().find(|m| stem_of(m) == wanted) else {
            problems.push(format!(
                "{}: no mask named {wanted}.* in {}",
                image.display(),
                masks_dir.display()
            ));
            continue;
        };
        match image_entries(image, mask, class, &args) {
            Ok(annotated) => {
                for (e, measured) in annotated {
                    println!(
                        "{}\t{}\t{}\t{}",
                        e.slice
                            .as_ref()
                            .map_or(e.img_name.clone(), |s| format!("{}#{s}", e.img_name)),
                        measured.count,
                        measured.size,
                        measured.location
                    );
                    entries.push(e);
                }
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

/// The entries of one image and its mask: one, or for a NIfTI volume with a label volume
/// one per slice of `--slices`, and for multi-frame DICOM files one per frame.
fn image_entries(
    image: &Path,
    mask: &Path,
    class: &str,
    args: &PromptsArgs,
) -> Result<Vec<(EntryOut, vlsm::prompts::MaskAttributes)>> {
    let bytes = std::fs::read(mask).with_context(|| mask.display().to_string())?;
    let image_bytes = std::fs::read(image).with_context(|| image.display().to_string())?;
    let names = Names::of(image, mask);
    let image_kind = clinical::sniff(&image_bytes);
    if clinical::sniff(&bytes).is_some() && image_kind.is_some() {
        let read = |b: &[u8], p: &Path| {
            ClinicalImage::read(b, vlsm::nifti::MAX_VOXELS).with_context(|| p.display().to_string())
        };
        let image_file = read(&image_bytes, image)?;
        let mask_file = read(&bytes, mask)?;
        drop((bytes, image_bytes));
        let pictures: Vec<Slice> = match image_file.kind() {
            Kind::Nifti => {
                let Slices { plane, range } = args.slices;
                let count = image_file.count(Some(plane));
                let (from, to) = range.unwrap_or((0, count - 1));
                if to >= count {
                    bail!(
                        "{}: --slices {}:{from}-{to}, but the volume has {count} {} slices",
                        image.display(),
                        plane.name(),
                        plane.name()
                    );
                }
                (from..=to)
                    .map(|index| Slice {
                        plane: Some(plane),
                        index,
                    })
                    .collect()
            }
            Kind::Dicom => (0..image_file.count(None))
                .map(|index| Slice { plane: None, index })
                .collect(),
        };
        let single = pictures.len() == 1 && image_file.kind() == Kind::Dicom;
        let mut out = Vec::new();
        for slice in pictures {
            let grey = label_grey(&mask_file, slice)
                .with_context(|| format!("{} ({slice})", mask.display()))?;
            check_sizes(image, mask, image_file.size(slice), grey.dimensions())?;
            // A single-frame file's entry is as its PNG equivalent's.
            let picture = (!single).then_some(slice);
            out.push(entry_of(&names, &grey, class, args, picture));
        }
        return Ok(out);
    }
    if image_kind == Some(Kind::Nifti) {
        bail!(
            "{}: a NIfTI volume needs a NIfTI label volume as its mask, not {}",
            image.display(),
            mask.display()
        );
    }
    let grey = grey_mask(&bytes).with_context(|| mask.display().to_string())?;
    let (iw, ih) = if image_kind == Some(Kind::Dicom) {
        vlsm::dicom::DicomFile::read(&image_bytes).map(|f| (f.columns, f.rows))
    } else {
        preprocess::dimensions(&image_bytes)
    }
    .with_context(|| image.display().to_string())?;
    check_sizes(image, mask, (iw, ih), grey.dimensions())?;
    Ok(vec![entry_of(&names, &grey, class, args, None)])
}

fn check_sizes(image: &Path, mask: &Path, (iw, ih): (u32, u32), (w, h): (u32, u32)) -> Result<()> {
    if (iw, ih) != (w, h) {
        bail!(
            "mask {} is {w}×{h} but image {} is {iw}×{ih}",
            mask.display(),
            image.display()
        );
    }
    Ok(())
}

/// An entry's file names and id stem.
struct Names {
    image: String,
    mask: String,
    stem: String,
}

impl Names {
    fn of(image: &Path, mask: &Path) -> Self {
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        };
        Names {
            image: name(image),
            mask: name(mask),
            stem: stem_of(image),
        }
    }
}

/// One entry from its (binary, 0/255) mask; `slice` names the picture of a clinical file.
fn entry_of(
    names: &Names,
    grey: &image::GrayImage,
    class: &str,
    args: &PromptsArgs,
    slice: Option<Slice>,
) -> (EntryOut, vlsm::prompts::MaskAttributes) {
    let (w, h) = grey.dimensions();
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
    let segment_id = match slice {
        Some(Slice {
            plane: Some(plane),
            index,
        }) => format!("{}_{}_{index:03}", names.stem, plane.name()),
        Some(Slice { index, .. }) => format!("{}_f{index:03}", names.stem),
        None => names.stem.clone(),
    };
    let entry = EntryOut {
        bbox: foreground_box(grey.as_raw(), w, h),
        cat: 0,
        segment_id,
        img_name: names.image.clone(),
        mask_name: names.mask.clone(),
        sentences: [Sentence {
            idx: 0,
            sent_id: 0,
            sent: String::new(),
        }],
        prompts,
        sentences_num: 1,
        slice: slice.map(|s| s.to_string()),
        window: args.window.map(|w| w.to_string()),
    };
    (entry, measured)
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
    if clinical::sniff(bytes).is_some() {
        let file = ClinicalImage::read(bytes, vlsm::nifti::MAX_VOXELS)?;
        return label_grey(&file, file.default_slice());
    }
    Ok(preprocess::decode_image(bytes)?.to_luma8())
}

/// A label file's picture as a 0/255 mask.
fn label_grey(file: &ClinicalImage, slice: Slice) -> Result<image::GrayImage> {
    let (w, h, mask) = file.label_mask(slice)?;
    let grey = mask.iter().map(|&m| m * 255).collect();
    image::GrayImage::from_raw(w, h, grey).context("mask size")
}

fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.to_string_lossy().to_lowercase();
            p.is_file()
                && p.extension().is_some_and(|e| {
                    IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str())
                })
                && (!name.ends_with(".gz") || name.ends_with(".nii.gz"))
        })
        .collect();
    files.sort();
    Ok(files)
}
