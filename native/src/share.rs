//! `vlsm share` makes the page's share links; `vlsm reproduce` recomputes one natively and
//! prints each mask's fingerprint, to compare with the fingerprints the page shows.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use vlsm::clinical::{self, ClinicalImage, Slice};
use vlsm::mask_check::{Agreement, BORDERLINE_MARGIN, MaskCheck};
use vlsm::share::{
    ClinicalView, ImageSource, ShareState, ViewSettings, embeddable_png, file_url, hex,
    mask_fingerprint, normalize_weights_url, pixels_sha256,
};
use vlsm::window::Window;
use vlsm::{Segmenter, preprocess, render};

use crate::backend::{self, Backend};
use crate::download;
use crate::segment::{parse_threshold, write_atomic};

/// Where `vlsm share` links point unless `--page` says otherwise: `trunk serve`'s address.
const DEFAULT_PAGE: &str = "http://127.0.0.1:8080/";

#[derive(clap::Args)]
pub struct ShareArgs {
    /// The image (embedded in the link as a lossless PNG when small enough), or a DICOM
    /// file or NIfTI volume (the picture --slice and --window give is embedded; the link
    /// records both, so whoever holds the file gets the same picture).
    image: PathBuf,
    /// For a DICOM file, the frame (`K`, default 0); for a NIfTI volume, `PLANE:K`
    /// (default: the middle axial slice).
    #[arg(long, value_name = "SLICE")]
    slice: Option<Slice>,
    /// For greyscale DICOM and NIfTI: file, minmax, CENTER,WIDTH or a preset (lung,
    /// mediastinum, bone, brain, abdomen).
    #[arg(long, default_value = "file")]
    window: Window,
    /// A text prompt; repeat for several (at most 10).
    #[arg(long = "prompt", short = 'p', required = true)]
    prompts: Vec<String>,
    /// Model folder URL the page fetches weights from (or a Hugging Face id OWNER/NAME).
    #[arg(long, value_name = "URL")]
    weights_url: String,
    /// The same model as a local directory: its model.safetensors is hashed instead of
    /// downloading it from --weights-url, and the model runs, so the link records each mask
    /// (readers then see whether theirs match, up to pixels on the threshold).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Foreground where sigmoid(logit) > threshold [default: the study's for the model].
    #[arg(long, value_parser = parse_threshold)]
    threshold: Option<f32>,
    /// Overlay opacity the page shows (view setting).
    #[arg(long, default_value_t = 0.5, value_parser = parse_threshold)]
    opacity: f32,
    /// Where the page is served.
    #[arg(long, value_name = "URL", default_value = DEFAULT_PAGE)]
    page: String,
    /// Put this URL in the link instead of the image itself.
    #[arg(long, value_name = "URL")]
    image_url: Option<String>,
}

#[derive(clap::Args)]
pub struct ReproduceArgs {
    /// The link (or its #fragment); `-` reads it from stdin, `@FILE` from a file (links with
    /// an embedded image can exceed the 128 KiB a single command-line argument may hold).
    link: String,
    /// A local model directory to use instead of downloading the link's weights URL.
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// The image, for links whose image was too large to embed (checked by hash).
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// Also write each mask as a PNG into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Exit 0 even when the image, the weights or the masks differ from the link's (the
    /// masks are still computed and printed either way; by default a mismatch exits 1).
    /// Masks that differ only in pixels whose logits lie on the threshold (within the link's
    /// margin) agree.
    #[arg(long)]
    allow_mismatch: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
}

pub fn share(args: ShareArgs) -> Result<()> {
    let bytes = std::fs::read(&args.image).with_context(|| args.image.display().to_string())?;
    let (rgb, clinical) = read_image(&bytes, args.slice, args.window)
        .with_context(|| args.image.display().to_string())?;
    let name = args
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let weights_url = normalize_weights_url(&args.weights_url)
        .map_err(|e| anyhow::anyhow!("--weights-url: {e}"))?;
    let weights_sha256 = match &args.weights {
        Some(dir) => {
            let path = dir.join("model.safetensors");
            if !path.is_file() {
                bail!(
                    "{} has no model.safetensors (the page reads only safetensors: run `vlsm convert`)",
                    dir.display()
                );
            }
            hash_file(&path)?
        }
        None => {
            let mut hasher = Sha256::new();
            download::get(
                &file_url(&weights_url, "model.safetensors"),
                vlsm::limits::MAX_WEIGHTS_BYTES,
                &mut hasher,
                |_, _| {},
            )?
            .context("the weights URL has no model.safetensors")?;
            hex(&hasher.finalize())
        }
    };
    // The model family, from the folder's config.json (the page reads the same file).
    let config = match &args.weights {
        Some(dir) => std::fs::read(dir.join("config.json"))
            .with_context(|| format!("{}/config.json", dir.display()))?,
        None => download::get_bytes(
            &file_url(&weights_url, "config.json"),
            vlsm::limits::download_cap("config.json"),
        )?
        .context("the weights URL has no config.json")?,
    };
    let arch = vlsm::ModelConfig::arch_of_json(&config)?;
    let image = match args.image_url {
        Some(url) => ImageSource::Url { name, url },
        None => match embeddable_png(&rgb)? {
            Some(png) => ImageSource::Embedded { name, png },
            None => {
                eprintln!(
                    "warning: {} is too large to embed (more than {} KiB as PNG): the link \
                     carries its hash only; pass --image-url URL to link to a hosted copy",
                    args.image.display(),
                    vlsm::share::MAX_EMBEDDED_IMAGE_BYTES / 1024
                );
                ImageSource::Omitted { name }
            }
        },
    };
    let mut state = ShareState {
        weights_url,
        weights_sha256: Some(weights_sha256),
        model: Some(arch.name().to_string()),
        prompts: args.prompts,
        threshold: args.threshold.unwrap_or(arch.default_threshold()),
        view: ViewSettings {
            opacity: args.opacity,
            selected: 0,
        },
        image,
        image_sha256: pixels_sha256(&rgb),
        masks: Vec::new(),
        margin: BORDERLINE_MARGIN,
        clinical,
    };
    // Checked before the model runs, so a bad prompt list costs nothing.
    state.validate()?;
    if let Some(dir) = &args.weights {
        let segmenter = Segmenter::from_dir(dir, &backend::device(Backend::Cpu)?)
            .with_context(|| format!("loading {}", dir.display()))?;
        let encoded = segmenter.encode_image(&rgb)?;
        let prompts: Vec<&str> = state.prompts.iter().map(String::as_str).collect();
        let (w, h) = rgb.dimensions();
        state.masks = segmenter
            .decode(&encoded, &prompts)?
            .iter()
            .map(|l| MaskCheck::of(l, state.threshold, w, h))
            .collect();
    }
    println!("{}", state.to_link(&args.page)?);
    Ok(())
}

pub fn reproduce(args: ReproduceArgs) -> Result<()> {
    let link = match args.link.as_str() {
        "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the link from stdin")?;
            s
        }
        l if l.starts_with('@') => std::fs::read_to_string(&l[1..])
            .with_context(|| format!("reading the link from {}", &l[1..]))?,
        l => l.to_string(),
    };
    let state = ShareState::from_link(&link)?;
    // A DICOM file or NIfTI volume (fetched or given) shows the link's slice and window.
    let view = state.clinical;
    let picture = |bytes: &[u8]| -> Result<image::RgbImage> {
        Ok(read_image(
            bytes,
            view.map(|v| v.slice),
            view.map_or(Window::File, |v| v.window),
        )?
        .0)
    };
    let (name, rgb) = match &state.image {
        ImageSource::Embedded { name, png } => (
            name.clone(),
            preprocess::decode_rgb(png).context("the link's embedded image")?,
        ),
        ImageSource::Url { name, url } => {
            let bytes = download::get_bytes(url, vlsm::limits::MAX_IMAGE_BYTES)?
                .with_context(|| format!("{url}: not found"))?;
            (name.clone(), picture(&bytes).with_context(|| url.clone())?)
        }
        ImageSource::Omitted { name } => {
            let Some(path) = &args.image else {
                bail!(
                    "the link's image ({name}) was too large to embed: pass it with --image FILE"
                );
            };
            let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
            (
                name.clone(),
                picture(&bytes).with_context(|| path.display().to_string())?,
            )
        }
    };
    if let Some(view) = view {
        eprintln!(
            "{}: slice {}, window {}",
            state.image.name(),
            view.slice,
            view.window
        );
    }
    let image_sha = pixels_sha256(&rgb);
    let mut mismatches = Vec::new();
    if image_sha != state.image_sha256 {
        eprintln!(
            "warning: the image differs from the link's (pixel sha256 {} vs {})",
            &image_sha[..16],
            &state.image_sha256[..16]
        );
        mismatches.push("image");
    }
    let dir = match &args.weights {
        Some(dir) => dir.clone(),
        None => fetch_model(&state.weights_url)?,
    };
    let weights_file = dir.join("model.safetensors");
    if weights_file.is_file() {
        let sha = hash_file(&weights_file)?;
        match &state.weights_sha256 {
            Some(expected) if *expected != sha => {
                eprintln!(
                    "warning: these weights differ from the link's (sha256 {} vs {}): results may differ",
                    &sha[..16],
                    &expected[..16]
                );
                mismatches.push("weights");
            }
            Some(_) => eprintln!("weights sha256 {sha} matches the link"),
            None => eprintln!("weights sha256 {sha} (the link names none)"),
        }
    } else {
        eprintln!(
            "warning: {} has no model.safetensors, so its hash cannot be compared with the link's",
            dir.display()
        );
    }
    let device = backend::device(args.backend)?;
    let segmenter =
        Segmenter::from_dir(&dir, &device).with_context(|| format!("loading {}", dir.display()))?;
    if let Some(model) = &state.model
        && model.as_str() != segmenter.arch().name()
    {
        eprintln!(
            "warning: the link's model is {model}, these weights are {}",
            segmenter.arch().name()
        );
        mismatches.push("model family");
    }
    let encoded = segmenter.encode_image(&rgb)?;
    let prompts: Vec<&str> = state.prompts.iter().map(String::as_str).collect();
    let logits = segmenter.decode(&encoded, &prompts)?;
    let (w, h) = rgb.dimensions();
    eprintln!(
        "{name} {w}×{h}, threshold {}, {} prompts; per prompt: index, fingerprint, foreground \
         pixels, agreement with the link's mask, prompt",
        state.threshold,
        prompts.len()
    );
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    }
    let mut stdout = std::io::stdout().lock();
    let mut differing = Vec::new();
    for (i, (prompt, l)) in prompts.iter().zip(&logits).enumerate() {
        let mask = l.mask_at(state.threshold, w, h);
        let foreground = mask.iter().filter(|&&m| m != 0).count();
        let agreement = state
            .masks
            .get(i)
            .map(|check| check.compare(l, state.threshold, w, h, state.margin));
        if agreement.as_ref().is_some_and(|a| !a.agrees()) {
            differing.push((i + 1).to_string());
        }
        writeln!(
            stdout,
            "{}\t{}\t{foreground}\t{}\t{prompt}",
            i + 1,
            mask_fingerprint(&mask),
            agreement.as_ref().map_or(
                "unchecked (the link records no masks)".to_string(),
                Agreement::to_string
            ),
        )?;
        if let Some(out) = &args.out {
            let path = out.join(format!("{:02}.mask.png", i + 1));
            write_atomic(&path, &render::mask_png(&mask, w, h)?)?;
        }
    }
    if !mismatches.is_empty() && !args.allow_mismatch {
        bail!(
            "the {} differ from the link's, so these masks need not be the link's (--allow-mismatch accepts that)",
            mismatches.join(" and ")
        );
    }
    if !differing.is_empty() && !args.allow_mismatch {
        let many = differing.len() > 1;
        bail!(
            "the mask{} of prompt{} {} differ{} from the link's, beyond pixels on the threshold \
             (--allow-mismatch accepts that)",
            if many { "s" } else { "" },
            if many { "s" } else { "" },
            differing.join(", "),
            if many { "" } else { "s" },
        );
    }
    Ok(())
}

/// An image file as RGB, or a DICOM file's or NIfTI volume's picture `slice` (its default
/// when `None`) through `window`, with the view a link records for it.
fn read_image(
    bytes: &[u8],
    slice: Option<Slice>,
    window: Window,
) -> Result<(image::RgbImage, Option<ClinicalView>)> {
    if clinical::sniff(bytes).is_none() {
        if slice.is_some() {
            bail!("--slice is for DICOM files and NIfTI volumes; this is an image");
        }
        return Ok((preprocess::decode_rgb(bytes)?, None));
    }
    let file = ClinicalImage::read(bytes, vlsm::nifti::MAX_VOXELS)?;
    let slice = slice.unwrap_or_else(|| file.default_slice());
    let rgb = file.render(slice, window)?;
    Ok((rgb, Some(ClinicalView { slice, window })))
}

/// The sha256 of a file's bytes, lowercase hex, read in chunks.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| path.display().to_string())?;
    Ok(hex(&hasher.finalize()))
}

/// Downloads a model folder URL into vlsm's cache (one directory per URL), file by file
/// through temporary names (see [`download::get_file`]), so an interrupted or refused
/// download is never mistaken for a model.
fn fetch_model(base: &str) -> Result<PathBuf> {
    let cache = std::env::var_os("VLSM_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("vlsm")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/vlsm")))
        .context("no cache directory: set VLSM_CACHE or pass --weights DIR")?;
    let dir = cache
        .join("urls")
        .join(&hex(&Sha256::digest(base.as_bytes()))[..16]);
    for (file, required) in [
        ("config.json", true),
        ("model.safetensors", true),
        ("preprocessor_config.json", false),
        ("tokenizer.json", false),
        ("vocab.json", false),
        ("merges.txt", false),
        ("vocab.txt", false),
        ("tokenizer_config.json", false),
        ("special_tokens_map.json", false),
    ] {
        let path = dir.join(file);
        if path.is_file() {
            continue;
        }
        let url = file_url(base, file);
        eprintln!("downloading {url}");
        if download::get_file(&url, vlsm::limits::download_cap(file), &path)?.is_none() && required
        {
            bail!("{url}: not found (404)");
        }
    }
    Ok(dir)
}
