//! The page's pure logic, testable natively: weights URLs, the prompt list, masks at a
//! threshold, scores, fingerprints, and the pictures drawn on canvases.

use image::RgbImage;
use vlsm::Logits;
use vlsm::clinical::{ClinicalImage, Slice};
use vlsm::mask_check::{Agreement, MaskCheck};
use vlsm::metrics::Overlap;
use vlsm::share::{MAX_PROMPT_CHARS, MAX_PROMPTS, ShareState, mask_fingerprint};
use vlsm::window::Window;

pub use vlsm::share::{DEFAULT_WEIGHTS_URL, normalize_weights_url};

/// Longest side of the large overlay view and of thumbnails, in pixels.
pub const VIEW_SIDE: u32 = 768;
pub const THUMB_SIDE: u32 = 160;

/// The page and the worker refuse larger images: the same budget as the CLI's default
/// (the wasm heap is 4 GiB at most).
pub const MAX_PIXELS: u64 = vlsm::preprocess::DEFAULT_MAX_PIXELS;

/// Width and height of an image from its header, refused above [`MAX_PIXELS`] before
/// anything is decoded.
pub fn check_image_size(bytes: &[u8]) -> vlsm::Result<(u32, u32)> {
    let (w, h) = vlsm::preprocess::dimensions(bytes)?;
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(vlsm::Error::Image(format!(
            "{w}×{h} is too large for the browser (at most {} megapixels)",
            MAX_PIXELS / 1_000_000
        )));
    }
    Ok((w, h))
}

/// The largest DICOM file or NIfTI volume the page opens (the file is held while it is
/// parsed), and the most voxels a volume may have: their f64 values take 768 MiB of the
/// wasm heap's 4 GiB (a 512 × 512 × 384 CT fits). The CLI takes up to
/// [`vlsm::nifti::MAX_VOXELS`].
pub const MAX_CLINICAL_FILE_BYTES: f64 = 768.0 * 1024.0 * 1024.0;
pub const MAX_CLINICAL_VOXELS: usize = 96 << 20;

/// Whether a file is refused for its size before it is read.
pub fn check_clinical_file_size(bytes: f64) -> Result<(), String> {
    if bytes > MAX_CLINICAL_FILE_BYTES {
        return Err(format!(
            "{} is too large for the browser (at most {}); use the CLI (vlsm segment)",
            human_bytes(bytes),
            human_bytes(MAX_CLINICAL_FILE_BYTES)
        ));
    }
    Ok(())
}

/// Parses a DICOM file or NIfTI volume within the page's limits.
pub fn read_clinical(bytes: &[u8]) -> vlsm::Result<ClinicalImage> {
    ClinicalImage::read(bytes, MAX_CLINICAL_VOXELS)
}

/// "axial slice 42 (0–119)", "frame 3 (0–4)": numbered from 0, as `--slices`, `--slice`
/// and share links number them.
pub fn describe_slice(file: &ClinicalImage, slice: Slice) -> String {
    let last = file.count(slice.plane).saturating_sub(1);
    match slice.plane {
        Some(plane) => format!("{} slice {} (0–{last})", plane.name(), slice.index),
        None => format!("frame {} (0–{last})", slice.index),
    }
}

/// The window a link or the user asked for, kept where it applies; a window on a colour
/// DICOM is meaningless and shown as `file`.
pub fn effective_window(file: &ClinicalImage, window: Window) -> Window {
    if file.is_greyscale() {
        window
    } else {
        Window::File
    }
}

/// Checks a prompt list before running it.
pub fn check_prompts(prompts: &[String]) -> Result<(), String> {
    if prompts.is_empty() {
        return Err("add at least one prompt".into());
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(format!("at most {MAX_PROMPTS} prompts run side by side"));
    }
    if let Some((i, p)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.chars().count() > MAX_PROMPT_CHARS)
    {
        return Err(format!(
            "prompt {} has {} characters (at most {MAX_PROMPT_CHARS})",
            i + 1,
            p.chars().count()
        ));
    }
    Ok(())
}

/// One prompt's result as the page holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptResult {
    pub prompt: String,
    pub logits: Logits,
    /// The prompt was longer than CLIP's 77 tokens and was cut.
    pub truncated: bool,
}

/// What the page shows under a mask for the current threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskSummary {
    pub fingerprint: String,
    pub foreground: u64,
    pub fraction: f64,
    /// Dice and IoU against the ground truth, when one was given.
    pub dice: Option<f64>,
    pub iou: Option<f64>,
    /// How the mask compares with the one the opened link recorded, when it applies.
    pub agreement: Option<Agreement>,
}

/// What an opened share link recorded about its masks, to compare the page's own with.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkRecord {
    pub prompts: Vec<String>,
    pub threshold: f32,
    pub image_sha256: String,
    pub masks: Vec<MaskCheck>,
    pub margin: f32,
}

impl LinkRecord {
    /// The link's record, if it has mask records.
    pub fn of(state: &ShareState) -> Option<Self> {
        (!state.masks.is_empty()).then(|| LinkRecord {
            prompts: state.prompts.clone(),
            threshold: state.threshold,
            image_sha256: state.image_sha256.clone(),
            masks: state.masks.clone(),
            margin: state.margin,
        })
    }

    /// How prompt `index`'s result compares with the link's mask, when the run is the
    /// link's: same image, same prompts, same threshold (moving the slider leaves the link).
    pub fn agreement(
        &self,
        run_prompts: &[&str],
        index: usize,
        logits: &Logits,
        threshold: f32,
        (width, height): (u32, u32),
        image_sha256: &str,
    ) -> Option<Agreement> {
        let same_run = image_sha256 == self.image_sha256
            && threshold == self.threshold
            && run_prompts.len() == self.prompts.len()
            && run_prompts.iter().zip(&self.prompts).all(|(a, b)| a == b);
        same_run.then(|| self.masks[index].compare(logits, threshold, width, height, self.margin))
    }
}

/// A short machine-readable name of an agreement (the page's `data-agreement`).
pub fn agreement_kind(agreement: &Agreement) -> &'static str {
    match agreement {
        Agreement::Exact => "exact",
        Agreement::Borderline { .. } => "borderline",
        Agreement::Differs { .. } => "differs",
        Agreement::Incomparable(_) => "incomparable",
    }
}

/// The binary mask at the image's size, its fingerprint and, with a ground truth, scores.
pub fn summarize(
    result: &PromptResult,
    threshold: f32,
    width: u32,
    height: u32,
    truth: Option<&[u8]>,
) -> (Vec<u8>, MaskSummary) {
    let mask = result.logits.mask_at(threshold, width, height);
    let foreground = mask.iter().map(|&m| u64::from(m)).sum::<u64>();
    let (dice, iou) = match truth.map(|t| Overlap::of(&mask, t)) {
        Some(Ok(o)) => (Some(o.dice()), Some(o.iou())),
        _ => (None, None),
    };
    let summary = MaskSummary {
        fingerprint: mask_fingerprint(&mask),
        foreground,
        fraction: foreground as f64 / mask.len().max(1) as f64,
        dice,
        iou,
        agreement: None,
    };
    (mask, summary)
}

/// Size of a picture that fits `max_side`, keeping the aspect ratio (never upscaled).
pub fn fit(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let longest = width.max(height);
    if longest <= max_side {
        return (width.max(1), height.max(1));
    }
    let scale = max_side as f64 / longest as f64;
    (
        ((width as f64 * scale).round() as u32).max(1),
        ((height as f64 * scale).round() as u32).max(1),
    )
}

/// Overlay colour of the n-th prompt (distinct, readable on grey images).
pub fn prompt_color(index: usize) -> [u8; 3] {
    const PALETTE: [[u8; 3]; 10] = [
        [255, 64, 64],
        [64, 160, 255],
        [64, 220, 96],
        [255, 200, 0],
        [200, 80, 255],
        [0, 220, 220],
        [255, 128, 0],
        [255, 96, 192],
        [160, 224, 64],
        [128, 128, 255],
    ];
    PALETTE[index % PALETTE.len()]
}

/// RGBA pixels of `image` (already at view size) with `mask` (same size, model mask
/// resized nearest) tinted by `color` at `opacity`, for a canvas `ImageData`.
pub fn overlay_rgba(
    image: &RgbImage,
    mask: Option<&[u8]>,
    color: [u8; 3],
    opacity: f32,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(image.as_raw().len() / 3 * 4);
    for (i, px) in image.pixels().enumerate() {
        let on = mask.is_some_and(|m| m.get(i).copied().unwrap_or(0) != 0);
        for (c, &v) in px.0.iter().enumerate() {
            out.push(if on {
                (v as f32 * (1.0 - opacity) + color[c] as f32 * opacity).round() as u8
            } else {
                v
            });
        }
        out.push(255);
    }
    out
}

/// RGBA pixels of a binary mask: white foreground on black.
pub fn mask_rgba(mask: &[u8]) -> Vec<u8> {
    mask.iter()
        .flat_map(|&m| {
            let v = if m != 0 { 255 } else { 0 };
            [v, v, v, 255]
        })
        .collect()
}

/// "12.3 MB", "850 kB", "17 B".
pub fn human_bytes(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.2} GB", bytes / 1e9)
    } else if bytes >= 1e6 {
        format!("{:.1} MB", bytes / 1e6)
    } else if bytes >= 1e3 {
        format!("{:.0} kB", bytes / 1e3)
    } else {
        format!("{bytes:.0} B")
    }
}

/// A file name for downloads from a prompt: "02_small-round-polyp" (as the CLI names files).
pub fn download_stem(index: usize, prompt: &str) -> String {
    format!("{:02}_{}", index + 1, vlsm::prompts::slug(prompt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_over_the_pixel_budget_are_refused_from_the_header() {
        let png = |w, h| {
            let mut bytes = Vec::new();
            image::GrayImage::new(w, h)
                .write_to(
                    &mut std::io::Cursor::new(&mut bytes),
                    image::ImageFormat::Png,
                )
                .unwrap();
            bytes
        };
        assert_eq!(check_image_size(&png(8000, 8000)).unwrap(), (8000, 8000));
        let err = check_image_size(&png(9000, 9000)).unwrap_err().to_string();
        assert!(err.contains("9000×9000 is too large"), "{err}");
        assert!(check_image_size(b"not an image").is_err());
    }

    #[test]
    fn clinical_files_within_the_pages_limits() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let volume =
            read_clinical(&std::fs::read(fixtures.join("nifti/volume.nii.gz")).unwrap()).unwrap();
        let slice = volume.default_slice();
        assert_eq!(
            describe_slice(&volume, slice),
            format!(
                "axial slice {} (0–{})",
                slice.index,
                volume.count(slice.plane) - 1
            )
        );
        let dicom =
            read_clinical(&std::fs::read(fixtures.join("dicom/multiframe_rle.dcm")).unwrap())
                .unwrap();
        assert!(describe_slice(&dicom, dicom.default_slice()).starts_with("frame 0 (0–"));
        let rgb = read_clinical(&std::fs::read(fixtures.join("dicom/rgb.dcm")).unwrap()).unwrap();
        assert_eq!(
            effective_window(&rgb, "lung".parse().unwrap()),
            Window::File
        );
        assert!(
            check_clinical_file_size(2e9)
                .unwrap_err()
                .contains("too large")
        );
        assert!(check_clinical_file_size(1e6).is_ok());
        assert!(matches!(
            read_clinical(b"not a volume at all"),
            Err(e) if e.to_string().contains("neither")
        ));
    }

    #[test]
    fn prompt_lists_are_checked() {
        assert!(check_prompts(&[]).is_err());
        assert!(check_prompts(&["".into()]).is_ok());
        assert!(check_prompts(&vec!["p".into(); 11]).is_err());
        let err = check_prompts(&["a".into(), "x".repeat(5000)]).unwrap_err();
        assert!(err.contains("prompt 2"), "{err}");
    }

    #[test]
    fn summaries_follow_the_threshold_and_score_against_truth() {
        // 2×2 logits: sigmoid = 0.27, 0.5, 0.73, 0.95.
        let result = PromptResult {
            prompt: "x".into(),
            logits: Logits {
                size: 2,
                values: vec![-1.0, 0.0, 1.0, 3.0],
            },
            truncated: false,
        };
        let truth = vec![0, 0, 1, 1, 0, 0, 1, 1]; // 4×2 image: right half.
        let (mask, s) = summarize(&result, 0.5, 4, 2, Some(&truth));
        assert_eq!(mask, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(s.foreground, 4);
        assert_eq!(s.dice, Some(0.5));
        assert_eq!(s.fingerprint, mask_fingerprint(&mask));
        let (_, low) = summarize(&result, 0.2, 4, 2, Some(&truth));
        assert_eq!(low.foreground, 8);
        assert!((low.iou.unwrap() - 0.5).abs() < 1e-12);
        let (_, none) = summarize(&result, 0.99, 4, 2, Some(&[0; 8]));
        assert_eq!(none.dice, Some(1.0)); // empty vs empty
        let (_, unscored) = summarize(&result, 0.5, 4, 2, None);
        assert_eq!(unscored.dice, None);
    }

    #[test]
    fn a_links_masks_are_compared_only_on_the_links_run() {
        let logits = Logits {
            size: 2,
            values: vec![-1.0, 0.004, 1.0, 3.0],
        };
        let record = LinkRecord {
            prompts: vec!["x".into()],
            threshold: 0.5,
            image_sha256: "ab".repeat(32),
            masks: vec![MaskCheck::of(&logits, 0.5, 4, 2)],
            margin: vlsm::mask_check::BORDERLINE_MARGIN,
        };
        let sha = "ab".repeat(32);
        let on = |prompts: &[&str], l: &Logits, t: f32, sha: &str| {
            record.agreement(prompts, 0, l, t, (4, 2), sha)
        };
        assert_eq!(on(&["x"], &logits, 0.5, &sha), Some(Agreement::Exact));
        // The pixel at 0.004 came out just below the threshold here: borderline.
        let mut other = logits.clone();
        other.values[1] = -0.003;
        assert!(matches!(
            on(&["x"], &other, 0.5, &sha),
            Some(Agreement::Borderline {
                model_pixels: 1,
                image_pixels: 2,
                ..
            })
        ));
        // Another threshold, prompt or image: not the link's run, nothing to say.
        assert_eq!(on(&["x"], &logits, 0.6, &sha), None);
        assert_eq!(on(&["y"], &logits, 0.5, &sha), None);
        assert_eq!(on(&["x"], &logits, 0.5, &"cd".repeat(32)), None);
    }

    #[test]
    fn pictures_and_names() {
        assert_eq!(fit(100, 50, 768), (100, 50));
        assert_eq!(fit(2000, 1000, 768), (768, 384));
        assert_eq!(fit(1, 10000, 160), (1, 160));
        let img = RgbImage::from_raw(2, 1, vec![100, 100, 100, 0, 0, 0]).unwrap();
        let rgba = overlay_rgba(&img, Some(&[1, 0]), [255, 0, 0], 0.5);
        assert_eq!(rgba, vec![178, 50, 50, 255, 0, 0, 0, 255]);
        assert_eq!(mask_rgba(&[1, 0]), vec![255, 255, 255, 255, 0, 0, 0, 255]);
        assert_eq!(
            download_stem(1, "Small, round polyp!"),
            "02_small-round-polyp"
        );
        assert_eq!(download_stem(0, ""), "01_empty");
        assert_eq!(human_bytes(603_000_000.0), "603.0 MB");
    }
}
