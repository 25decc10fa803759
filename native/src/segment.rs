//! `vlsm segment IMAGE... --prompt TEXT...`

use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, Result, bail};
use vlsm::clinical::{ClinicalImage, Slice};
use vlsm::nifti::Plane;
use vlsm::window::Window;
use vlsm::{Precision, Segmenter, preprocess, render};

use crate::backend::{self, Backend};
use crate::model_source::ModelArgs;
use crate::timing::Timings;

#[derive(clap::Args)]
pub struct SegmentArgs {
    /// Images to segment (PNG, JPEG, BMP, TIFF, WebP, DICOM, NIfTI), or folders: searched
    /// recursively for images (or for files matching --glob). A DICOM file's frames are
    /// segmented one by one, their outputs named by SOP Instance UID; a NIfTI volume's
    /// slices (--slices) likewise, and each prompt's masks also make a label volume.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// In folders, segment the files whose path below the folder matches this pattern
    /// (`*`, `?`, `[..]`, `**`), e.g. `images/*.jpg` [default: any image file].
    #[arg(long, value_name = "PATTERN")]
    glob: Option<String>,
    /// A text prompt; repeat for several. Each image is encoded once for all of them.
    #[arg(long = "prompt", short = 'p', required = true)]
    prompts: Vec<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// Foreground where sigmoid(logit) > threshold [default: the study's for the model, 0.5].
    #[arg(long, value_parser = parse_threshold)]
    threshold: Option<f32>,
    /// Output directory for mask and overlay PNGs (one folder per image; images found in a
    /// folder keep their path below it).
    #[arg(long, default_value = "vlsm-out")]
    out: PathBuf,
    /// Also write raw logits at model resolution as float32 .npy: [P,S,S] (one image) or
    /// [N,P,S,S] (the N images segmented, in order); missing folders are created.
    #[arg(long, value_name = "FILE.npy")]
    save_logits: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// How the linears of the transformer blocks compute: `f32` (masks stable bit for bit)
    /// or `bf16` (weights stored in bf16, activations rounded to bf16, sums in f32: faster
    /// and half the memory on a CPU with AVX-512 BF16; logits move by about 1 %). Elsewhere
    /// bf16 falls back to f32 with a warning.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Encode this many images in one vision pass (taller matrix products that reuse each
    /// weight; each image's logits are the same as alone).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    batch_size: u16,
    /// Print wall and CPU seconds per phase, and peak memory, to stderr.
    #[arg(long)]
    timings: bool,
    /// How DICOM greyscale values become the model's 8-bit input: `file` (the file's
    /// window, else the frame's min–max), `minmax`, CENTER,WIDTH (e.g. `40,400` in HU), or a
    /// CT preset: lung, mediastinum, bone, brain, abdomen.
    #[arg(long, default_value = "file")]
    window: Window,
    /// NIfTI volumes: the plane and slices to segment, PLANE or PLANE:FROM-TO (0-based,
    /// inclusive; axial counts from the feet, coronal from the back, sagittal from the
    /// patient's right), e.g. `axial:40-60`.
    #[arg(long, default_value = "axial", value_parser = parse_slices)]
    slices: Slices,
}

/// `--slices`.
#[derive(Clone, Copy, Debug)]
pub struct Slices {
    pub plane: Plane,
    pub range: Option<(usize, usize)>,
}

pub fn parse_slices(s: &str) -> std::result::Result<Slices, String> {
    let (plane, range) = match s.split_once(':') {
        Some((p, r)) => (p, Some(r)),
        None => (s, None),
    };
    let plane: Plane = plane.parse()?;
    let range = match range {
        None => None,
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) else {
                return Err(format!("`{r}`: slices are FROM-TO, e.g. 40-60"));
            };
            if a > b {
                return Err(format!("`{r}`: FROM is after TO"));
            }
            Some((a, b))
        }
    };
    Ok(Slices { plane, range })
}

/// File extensions a folder is searched for when no --glob is given.
const IMAGE_EXTENSIONS: [&str; 10] = [
    "png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp", "dcm", "nii", "nii.gz",
];

/// An image to segment and the name of its output folder.
struct Input {
    path: PathBuf,
    name: String,
    part: Part,
}

/// What of its file an input is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    Image,
    /// A DICOM frame or a NIfTI slice.
    Clinical(Slice),
}

/// `x.nii.gz` and `x.nii`.
fn is_nifti(path: &Path) -> bool {
    let name = path.to_string_lossy().to_lowercase();
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// The file name without `.nii.gz`, `.nii` or its extension.
pub fn stem_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    for suffix in [".nii.gz", ".nii"] {
        if name.to_lowercase().ends_with(suffix) {
            return name[..name.len() - suffix.len()].to_string();
        }
    }
    path.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

/// The files named on the command line, folders expanded (sorted, so runs are repeatable).
fn collect_inputs(paths: &[PathBuf], glob: Option<&str>, slices: Slices) -> Result<Vec<Input>> {
    let pattern = glob
        .map(|g| glob::Pattern::new(g).with_context(|| format!("--glob `{g}`")))
        .transpose()?;
    let mut files: Vec<(PathBuf, String)> = Vec::new();
    for path in paths {
        if !path.is_dir() {
            files.push((path.clone(), stem_of(path)));
            continue;
        }
        let mut found = Vec::new();
        for entry in walkdir::WalkDir::new(path)
            .follow_links(true)
            .sort_by_file_name()
        {
            let entry = entry.with_context(|| format!("reading {}", path.display()))?;
            if !entry.file_type().is_file() {
                continue;
            }
            let rel = entry.path().strip_prefix(path).unwrap_or(entry.path());
            let wanted = match &pattern {
                Some(p) => p.matches_path(rel),
                None => {
                    is_nifti(rel)
                        || rel
                            .extension()
                            .map(|e| e.to_string_lossy().to_lowercase())
                            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
                }
            };
            if wanted {
                let name = rel
                    .parent()
                    .map(|p| p.join(stem_of(rel)))
                    .unwrap_or_else(|| PathBuf::from(stem_of(rel)))
                    .to_string_lossy()
                    .to_string();
                found.push((entry.path().to_path_buf(), name));
            }
        }
        if found.is_empty() {
            bail!(
                "{}: no {} in this folder",
                path.display(),
                match glob {
                    Some(g) => format!("file matches --glob `{g}`"),
                    None => "image files (png, jpg, bmp, tif, webp, dcm, nii)".into(),
                }
            );
        }
        files.extend(found);
    }
    Ok(unique_names(volume_slices(dicom_frames(files), slices)?))
}

/// NIfTI volumes become one input per slice of `slices` (named `<stem>_<plane>_NNN`);
/// other inputs pass through. A volume that cannot be read stays one input, so its error
/// is reported where images are read.
fn volume_slices(
    files: Vec<(PathBuf, String, Part)>,
    slices: Slices,
) -> Result<Vec<(PathBuf, String, Part)>> {
    let mut out = Vec::new();
    for (path, stem, part) in files {
        if part != Part::Image || !is_nifti(&path) {
            out.push((path, stem, part));
            continue;
        }
        let Ok(volume) = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(vlsm::nifti::read(&b)?))
        else {
            out.push((path, stem, Part::Clinical(slice(Some(slices.plane), 0))));
            continue;
        };
        let count = volume.slices(slices.plane);
        let (from, to) = slices.range.unwrap_or((0, count - 1));
        if to >= count {
            bail!(
                "{}: --slices {}:{from}-{to}, but the volume has {count} {} slices (0-{})",
                path.display(),
                slices.plane.name(),
                slices.plane.name(),
                count - 1
            );
        }
        for k in from..=to {
            out.push((
                path.clone(),
                format!("{stem}_{}_{k:03}", slices.plane.name()),
                Part::Clinical(slice(Some(slices.plane), k)),
            ));
        }
    }
    Ok(out)
}

/// DICOM files become one input per frame, named by SOP Instance UID (with `_fNNN` for
/// multi-frame files); other files pass through. A DICOM file that cannot be parsed
/// stays one input, so its error is reported where images are read.
fn dicom_frames(files: Vec<(PathBuf, String)>) -> Vec<(PathBuf, String, Part)> {
    let mut out = Vec::new();
    for (path, stem) in files {
        let is_dicom = std::fs::File::open(&path).is_ok_and(|mut f| {
            let mut head = [0u8; 132];
            std::io::Read::read_exact(&mut f, &mut head).is_ok() && vlsm::dicom::is_dicom(&head)
        });
        if !is_dicom {
            out.push((path, stem, Part::Image));
            continue;
        }
        match std::fs::read(&path)
            .ok()
            .and_then(|b| vlsm::dicom::DicomFile::read(&b).ok())
        {
            Some(file) => {
                let uid = if file.sop_instance_uid.is_empty() {
                    stem.clone()
                } else {
                    file.sop_instance_uid.clone()
                };
                for frame in 0..file.frames {
                    let name = if file.frames == 1 {
                        uid.clone()
                    } else {
                        format!("{uid}_f{frame:03}")
                    };
                    out.push((
                        path.clone(),
                        name,
                        Part::Clinical(slice(None, frame as usize)),
                    ));
                }
            }
            None => out.push((path, stem, Part::Clinical(slice(None, 0)))),
        }
    }
    out
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
    let inputs = collect_inputs(&args.images, args.glob.as_deref(), args.slices)?;
    let mut files = ClinicalFiles::default();
    // Bad input fails before the (slow) model load. One image: it is decoded now, and its
    // problem is the error. Several: every header is checked now, a bad image is reported
    // and skipped, the others are decoded one at a time (so memory holds one), and the
    // exit status says something failed.
    let mut skipped = 0usize;
    let mut skip = |e: anyhow::Error| {
        eprintln!("warning: skipped {}", format!("{e:#}").replace('\n', " "));
        skipped += 1;
    };
    let (mut first, checked): (Option<image::RgbImage>, Vec<&Input>) = match inputs.as_slice() {
        [only] => {
            let image =
                timings.measure("read images", || read_rgb(only, args.window, &mut files))?;
            (Some(image), vec![only])
        }
        several => {
            let checked = timings.measure("read images", || {
                several
                    .iter()
                    .filter(|input| match check_header(input, &mut files) {
                        Ok(()) => true,
                        Err(e) => {
                            skip(e);
                            false
                        }
                    })
                    .collect::<Vec<_>>()
            });
            if checked.is_empty() {
                bail!("none of the {} images could be read", inputs.len());
            }
            (None, checked)
        }
    };
    if let Some(path) = &args.save_logits
        && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("--save-logits: creating {}", parent.display()))?;
    }
    let precision = effective_precision(args.precision, args.backend);
    let device = backend::device(args.backend)?;
    let source = args.model.resolve()?;
    let segmenter = timings.measure("load model", || -> Result<Segmenter> {
        with_precision(source.load_in(&device, precision)?, precision)
    })?;
    let threshold = args
        .threshold
        .unwrap_or_else(|| segmenter.default_threshold());
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
    let size = segmenter.input_size();
    let mut all_logits = Vec::new();
    let mut segmented = 0usize;
    let mut written_back = ClinicalMasks::default();
    // Images are read and encoded `--batch-size` at a time.
    let mut pending = checked.into_iter().peekable();
    while pending.peek().is_some() {
        let mut batch = Vec::new();
        while batch.len() < usize::from(args.batch_size)
            && let Some(input) = pending.next()
        {
            let image = match first.take() {
                Some(image) => image,
                None => match timings
                    .measure("read images", || read_rgb(input, args.window, &mut files))
                {
                    Ok(image) => image,
                    Err(e) => {
                        skip(e);
                        continue;
                    }
                },
            };
            batch.push((input, image));
        }
        if batch.is_empty() {
            continue;
        }
        let images: Vec<&image::RgbImage> = batch.iter().map(|(_, image)| image).collect();
        let encoded = timings.measure("encode image", || segmenter.encode_images(&images))?;
        for ((input, image), encoded) in batch.iter().zip(&encoded) {
            let name = &input.name;
            let logits = timings.measure("decode prompts", || {
                segmenter.decode_embedded(encoded, &embedded)
            })?;
            timings.measure("write outputs", || -> Result<()> {
                let dir = args.out.join(name);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                for (i, (prompt, l)) in prompts.iter().zip(&logits).enumerate() {
                    let mask = l.mask_at(threshold, image.width(), image.height());
                    if let Part::Clinical(slice) = input.part {
                        let file = files.read(&input.path)?;
                        written_back.add(&input.path, &file, prompts.len(), i, slice, &mask);
                    }
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
            segmented += 1;
            if args.save_logits.is_some() {
                all_logits.extend(logits.into_iter().flat_map(|l| l.values));
            }
        }
    }
    // Each prompt's masks of a volume's slices, as label volumes over the volume's grid; a
    // DICOM file's masks as one SEG object over it.
    for FileMasks {
        path,
        file,
        per_prompt,
        frames_done,
    } in &written_back.0
    {
        if let Some(dicom) = file.dicom() {
            write_seg(
                &args.out,
                path,
                dicom,
                &prompts,
                per_prompt,
                frames_done,
                segmenter.arch(),
            )?;
            continue;
        }
        let volume = file;
        let dir = args.out.join(stem_of(path));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, (prompt, voxels)) in prompts.iter().zip(per_prompt).enumerate() {
            let file = dir.join(format!(
                "{i:02}_{}.mask.nii.gz",
                vlsm::prompts::slug(prompt)
            ));
            let nifti = volume.nifti().context("a label volume of a DICOM file")?;
            write_atomic(&file, &nifti.label_file(voxels, true)?)?;
            println!(
                "{}\t{prompt:?}\tlabel volume\t{}",
                path.display(),
                file.display()
            );
        }
    }
    if let Some(path) = &args.save_logits
        && segmented > 0
    {
        let p = prompts.len();
        let shape: Vec<usize> = if inputs.len() == 1 {
            vec![p, size, size]
        } else {
            vec![segmented, p, size, size]
        };
        write_atomic(path, &vlsm::render::npy_f32(&shape, &all_logits)?)?;
        println!("logits {shape:?}\t{}", path.display());
    }
    timings.report();
    if skipped > 0 {
        bail!(
            "{skipped} of {} images were skipped (see the warnings above); the other {segmented} were segmented",
            inputs.len()
        );
    }
    Ok(())
}

/// The precision to run in: bf16 only where its kernel runs (the CPU backend on a
/// processor with AVX-512 BF16), else f32 with a warning.
pub fn effective_precision(requested: Precision, backend: Backend) -> Precision {
    let why = match backend {
        Backend::Cpu => vlsm::segmenter::cpu_precision_problem(requested),
        _ if requested == Precision::F32 => None,
        _ => Some(vlsm::segmenter::BF16_CPU_ONLY.to_string()),
    };
    match why {
        Some(why) => {
            eprintln!(
                "warning: --precision {}: {why}; running in f32",
                requested.name()
            );
            Precision::F32
        }
        None => requested,
    }
}

/// A loaded model in `precision` where the model supports it (CRIS stays f32, with a
/// warning).
pub fn with_precision(segmenter: Segmenter, precision: Precision) -> Result<Segmenter> {
    if let Some(why) = segmenter.precision_unavailable(precision) {
        eprintln!("warning: --precision {}: {why}", precision.name());
        return Ok(segmenter);
    }
    Ok(segmenter.with_precision(precision)?)
}

/// For each NIfTI volume or DICOM file segmented: the file and, per prompt, its masks
/// written back over it — a byte per voxel of the volume (1 where a segmented slice's mask
/// is foreground), or a mask per frame of the DICOM file, frame after frame.
#[derive(Default)]
struct ClinicalMasks(Vec<FileMasks>);

struct FileMasks {
    path: PathBuf,
    file: Rc<ClinicalImage>,
    per_prompt: Vec<Vec<u8>>,
    /// DICOM: which frames got their masks (a SEG is written when all did).
    frames_done: Vec<bool>,
}

impl ClinicalMasks {
    fn add(
        &mut self,
        path: &Path,
        file: &Rc<ClinicalImage>,
        prompts: usize,
        prompt: usize,
        slice: Slice,
        mask: &[u8],
    ) {
        let index = match self.0.iter().position(|v| v.path == path) {
            Some(i) => i,
            None => {
                let (len, frames) = match (file.nifti(), file.dicom()) {
                    (Some(nifti), _) => (nifti.values.len(), 0),
                    (_, Some(d)) => {
                        let frames = d.frames as usize;
                        (frames * d.rows as usize * d.columns as usize, frames)
                    }
                    _ => return,
                };
                self.0.push(FileMasks {
                    path: path.to_path_buf(),
                    file: file.clone(),
                    per_prompt: vec![vec![0u8; len]; prompts],
                    frames_done: vec![false; frames],
                });
                self.0.len() - 1
            }
        };
        let entry = &mut self.0[index];
        let out = &mut entry.per_prompt[prompt];
        match (file.nifti(), slice.plane) {
            (Some(nifti), Some(plane)) => {
                let (w, _) = nifti.slice_size(plane);
                for (at, &m) in mask.iter().enumerate() {
                    out[nifti.voxel(plane, slice.index, at / w, at % w)] = u8::from(m != 0);
                }
            }
            _ => {
                let n = mask.len();
                if let Some(frame) = out.get_mut(slice.index * n..(slice.index + 1) * n) {
                    frame.copy_from_slice(mask);
                    entry.frames_done[slice.index] = true;
                }
            }
        }
    }
}

/// `OUT/<SOP Instance UID>.seg.dcm`: a DICOM SEG of a DICOM file's masks, a segment per
/// prompt, when every frame was segmented.
fn write_seg(
    out: &Path,
    path: &Path,
    dicom: &vlsm::dicom::DicomFile,
    prompts: &[&str],
    per_prompt: &[Vec<u8>],
    frames_done: &[bool],
    arch: vlsm::Arch,
) -> Result<()> {
    if !frames_done.iter().all(|&d| d) {
        eprintln!(
            "warning: {}: no DICOM SEG written, as not every frame was segmented",
            path.display()
        );
        return Ok(());
    }
    let pixels = dicom.rows as usize * dicom.columns as usize;
    let segments: Vec<vlsm::dicom_seg::Segment> = prompts
        .iter()
        .zip(per_prompt)
        .map(|(prompt, masks)| vlsm::dicom_seg::Segment {
            label: prompt,
            masks: masks.chunks_exact(pixels).collect(),
        })
        .collect();
    let bytes = vlsm::dicom_seg::write(dicom, &segments, arch.display_name())
        .with_context(|| path.display().to_string())?;
    let name = if dicom.sop_instance_uid.is_empty() {
        stem_of(path)
    } else {
        dicom.sop_instance_uid.clone()
    };
    let file = out.join(format!("{name}.seg.dcm"));
    write_atomic(&file, &bytes)?;
    println!("{}	DICOM SEG	{}", path.display(), file.display());
    Ok(())
}

/// The DICOM file or NIfTI volume last read: a file's frames and a volume's slices are
/// consecutive inputs, so each file is read and parsed once (not once per frame or slice).
#[derive(Default)]
struct ClinicalFiles(Option<(PathBuf, Rc<ClinicalImage>)>);

impl ClinicalFiles {
    fn read(&mut self, path: &Path) -> Result<Rc<ClinicalImage>> {
        if let Some((p, file)) = &self.0
            && p == path
        {
            return Ok(file.clone());
        }
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        let file = Rc::new(
            ClinicalImage::read(&bytes, vlsm::nifti::MAX_VOXELS)
                .with_context(|| path.display().to_string())?,
        );
        self.0 = Some((path.to_path_buf(), file.clone()));
        Ok(file)
    }
}

fn slice(plane: Option<Plane>, index: usize) -> Slice {
    Slice { plane, index }
}

/// Reads and decodes an image file, a DICOM frame or a NIfTI slice (greyscale through
/// `window`; errors name the file).
fn read_rgb(input: &Input, window: Window, files: &mut ClinicalFiles) -> Result<image::RgbImage> {
    let path = &input.path;
    match input.part {
        Part::Clinical(slice) => files
            .read(path)?
            .render(slice, window)
            .with_context(|| path.display().to_string()),
        Part::Image => {
            let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
            preprocess::decode_rgb(&bytes).with_context(|| path.display().to_string())
        }
    }
}

/// Checks that a file is an image within the pixel budget, from its header.
fn check_header(input: &Input, files: &mut ClinicalFiles) -> Result<()> {
    let path = &input.path;
    match input.part {
        Part::Clinical(_) => files.read(path).map(drop),
        Part::Image => {
            let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
            preprocess::dimensions(&bytes)
                .and_then(|(w, h)| preprocess::check_pixels(w, h))
                .with_context(|| path.display().to_string())
        }
    }
}

/// One output folder per image, named after the file (or its path below a searched
/// folder); repeated names get a suffix.
fn unique_names(files: Vec<(PathBuf, String, Part)>) -> Vec<Input> {
    let mut inputs: Vec<Input> = Vec::new();
    for (i, (path, stem, part)) in files.into_iter().enumerate() {
        let stem = if stem.is_empty() {
            format!("image{i}")
        } else {
            stem
        };
        let name = if inputs.iter().any(|x| x.name == stem) {
            format!("{stem}-{i}")
        } else {
            stem
        };
        inputs.push(Input { path, name, part });
    }
    inputs
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
        let inputs = collect_inputs(
            &[PathBuf::from("a/img.png"), PathBuf::from("b/img.png")],
            None,
            parse_slices("axial").unwrap(),
        )
        .unwrap();
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
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
