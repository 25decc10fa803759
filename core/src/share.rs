//! Share links: everything that decides a result, in a URL fragment.
//!
//! A link is `PAGE#vlsm=1.DATA`, where DATA is base64url (no padding) of a zlib stream of
//! `JSON \0 IMAGE`: the JSON state, a NUL byte (JSON never contains a raw one), then, when the
//! image is embedded, the image as a PNG. The PNG is a lossless re-encoding of the decoded RGB
//! pixels, so every reader (browser or CLI) segments exactly the same pixels, whatever
//! decoder produced them first. The fragment never reaches a server: browsers do not send it.
//!
//! The mask **fingerprint** ([`mask_fingerprint`]) lets anyone compare a browser result with
//! a native one: the first 16 hex digits of the sha256 of the binary mask at the image's
//! original size (row-major, one byte per pixel, 1 = foreground). A link made from results
//! also carries each mask's [`MaskCheck`], so a reader can tell a real difference from a few
//! pixels on the threshold ([`crate::mask_check`]).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::mask_check::{BORDERLINE_MARGIN, MAX_MODEL_SIZE, MaskCheck};
use crate::slice::Slice;
use crate::window::Window;

/// The fragment key and the only link format version this code reads and writes.
pub const FRAGMENT_PREFIX: &str = "vlsm=1.";
pub const LINK_VERSION: u32 = 1;
/// Largest PNG embedded in a link (≈512 KiB of base64; Chromium and Firefox accept far
/// longer URLs, but chat tools and mail clients may not).
pub const MAX_EMBEDDED_IMAGE_BYTES: usize = 384 * 1024;
/// At most this many prompts run side by side.
pub const MAX_PROMPTS: usize = 10;
/// A prompt longer than this is certainly not meant (CLIP reads 77 tokens).
pub const MAX_PROMPT_CHARS: usize = 2000;
/// Refuse fragments and inflated payloads beyond these sizes (a zip bomb, a pasted file).
const MAX_FRAGMENT_CHARS: usize = 4 << 20;
const MAX_PAYLOAD_BYTES: usize = 8 << 20;

/// Where the image of a link comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// The image travels in the link, as PNG bytes.
    Embedded { name: String, png: Vec<u8> },
    /// The image is fetched from a URL.
    Url { name: String, url: String },
    /// Too large to embed and not hosted: the reader must supply it (checked by hash).
    Omitted { name: String },
}

impl ImageSource {
    pub fn name(&self) -> &str {
        match self {
            ImageSource::Embedded { name, .. }
            | ImageSource::Url { name, .. }
            | ImageSource::Omitted { name } => name,
        }
    }
}

/// What the page shows besides the masks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ViewSettings {
    /// Overlay opacity, 0–1.
    pub opacity: f32,
    /// Index of the prompt shown large.
    pub selected: usize,
}

impl Default for ViewSettings {
    fn default() -> Self {
        Self {
            opacity: 0.5,
            selected: 0,
        }
    }
}

/// Everything that decides what a user saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareState {
    /// Base URL of a Hugging Face-layout model folder (`…/config.json` etc. below it).
    pub weights_url: String,
    /// sha256 of the model's `model.safetensors`, lowercase hex, when known.
    pub weights_sha256: Option<String>,
    /// The model family ([`crate::model::Arch::name`]), when known: a reproduction with
    /// another family is a mismatch even if it loads.
    pub model: Option<String>,
    pub prompts: Vec<String>,
    /// Foreground where `sigmoid(logit) > threshold`.
    pub threshold: f32,
    pub view: ViewSettings,
    pub image: ImageSource,
    /// [`pixels_sha256`] of the image, so a fetched or supplied image can be checked.
    pub image_sha256: String,
    /// What the maker's masks were, one per prompt, or none (a link made without running).
    pub masks: Vec<MaskCheck>,
    /// How far from the threshold (in logits) a differing pixel may lie to count as
    /// borderline ([`BORDERLINE_MARGIN`] unless the link says otherwise).
    pub margin: f32,
    /// When the image is one picture of a DICOM file or NIfTI volume: which, and through
    /// which window.
    pub clinical: Option<ClinicalView>,
}

/// Which picture of a DICOM file or NIfTI volume an image is, and its window. The file
/// never travels in a link: the image (embedded or omitted) is the rendered picture, named
/// after the file; whoever holds the file gets the same picture from these two.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClinicalView {
    pub slice: Slice,
    pub window: Window,
}

/// The largest frame or slice number a link may name (files are checked when read).
const MAX_SLICE_INDEX: usize = 1 << 20;

/// The JSON part of the payload.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u32,
    weights: WireWeights,
    prompts: Vec<String>,
    threshold: f32,
    #[serde(default)]
    view: ViewSettings,
    image: WireImage,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    masks: Vec<WireMask>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    margin: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clinical: Option<WireClinical>,
}

/// A [`ClinicalView`] as text: `axial:42` or a frame number; `file`, `minmax` or
/// `CENTER,WIDTH`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireClinical {
    slice: String,
    window: String,
}

impl WireClinical {
    fn check(self) -> Result<ClinicalView> {
        let bad = |what: &str, e: String| Err(Error::Link(format!("its {what}: {e}")));
        let slice = match self.slice.parse::<Slice>() {
            Ok(s) if s.index <= MAX_SLICE_INDEX => s,
            Ok(s) => return bad("slice", format!("{} is too large", s.index)),
            Err(e) => return bad("slice", truncate(&e, 80)),
        };
        match self.window.parse::<Window>() {
            Ok(window) => Ok(ClinicalView { slice, window }),
            Err(e) => bad("window", truncate(&e, 80)),
        }
    }
}

/// A [`MaskCheck`] on the wire (hex strings for the 64-bit values: JSON numbers are doubles
/// in the browser).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMask {
    fingerprint: String,
    foreground: u64,
    size: u32,
    model_foreground: u64,
    sketch: String,
    borderline: u64,
}

impl From<&MaskCheck> for WireMask {
    fn from(m: &MaskCheck) -> Self {
        WireMask {
            fingerprint: m.fingerprint.clone(),
            foreground: m.foreground,
            size: m.size,
            model_foreground: m.model_foreground,
            sketch: format!("{:016x}", m.sketch),
            borderline: m.borderline,
        }
    }
}

impl WireMask {
    fn check(self) -> Result<MaskCheck> {
        let bad = |what: &str| Err(Error::Link(format!("a mask record's {what} is not valid")));
        if !is_hex(&self.fingerprint, 16) {
            return bad("fingerprint");
        }
        if !is_hex(&self.sketch, 16) {
            return bad("sketch");
        }
        let Ok(sketch) = u64::from_str_radix(&self.sketch, 16) else {
            return bad("sketch");
        };
        if self.size == 0 || self.size > MAX_MODEL_SIZE {
            return bad("model size");
        }
        let pixels = u64::from(self.size).pow(2);
        if self.model_foreground > pixels || self.borderline > pixels {
            return bad("pixel count");
        }
        Ok(MaskCheck {
            fingerprint: self.fingerprint,
            foreground: self.foreground,
            size: self.size,
            model_foreground: self.model_foreground,
            sketch,
            borderline: self.borderline,
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireWeights {
    url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireImage {
    /// "embedded", "url" or "omitted".
    source: String,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    sha256: String,
}

/// sha256 (hex) of an image's decoded pixels: width and height (u32 LE), then RGB bytes.
pub fn pixels_sha256(image: &RgbImage) -> String {
    let mut hasher = Sha256::new();
    hasher.update(image.width().to_le_bytes());
    hasher.update(image.height().to_le_bytes());
    hasher.update(image.as_raw());
    hex(&hasher.finalize())
}

/// sha256 of bytes, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The first 16 hex digits of the sha256 of a binary mask (one byte per pixel, 1 =
/// foreground, 0 = background; any non-zero byte counts as 1).
pub fn mask_fingerprint(mask: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for chunk in mask.chunks(1 << 16) {
        let ones: Vec<u8> = chunk.iter().map(|&m| u8::from(m != 0)).collect();
        hasher.update(&ones);
    }
    hex(&hasher.finalize()[..8])
}

/// Bytes as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The image as it travels in a link: a PNG of its pixels, if small enough.
pub fn embeddable_png(image: &RgbImage) -> Result<Option<Vec<u8>>> {
    let png = crate::render::encode_png_best(image)?;
    Ok((png.len() <= MAX_EMBEDDED_IMAGE_BYTES).then_some(png))
}

impl ShareState {
    /// Checks every field; the one-line error names the first problem.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Link(msg));
        if !is_http_url(&self.weights_url) {
            return bad(format!(
                "weights URL must start with http:// or https://, got {:?}",
                truncate(&self.weights_url, 80)
            ));
        }
        if let Some(model) = &self.model
            && crate::model::Arch::from_name(model).is_none()
        {
            return Err(Error::Input(format!(
                "unknown model family {:?} (expected one of {})",
                truncate(model, 40),
                crate::model::Arch::ALL
                    .map(crate::model::Arch::name)
                    .join(", ")
            )));
        }
        if let Some(sha) = &self.weights_sha256
            && !is_sha256(sha)
        {
            return bad(format!(
                "weights sha256 is not 64 hex digits: {:?}",
                truncate(sha, 80)
            ));
        }
        if self.prompts.is_empty() || self.prompts.len() > MAX_PROMPTS {
            return bad(format!(
                "needs 1 to {MAX_PROMPTS} prompts, has {}",
                self.prompts.len()
            ));
        }
        if let Some(p) = self
            .prompts
            .iter()
            .find(|p| p.chars().count() > MAX_PROMPT_CHARS)
        {
            return bad(format!(
                "a prompt has {} characters (at most {MAX_PROMPT_CHARS})",
                p.chars().count()
            ));
        }
        if !(self.threshold.is_finite() && (0.0..=1.0).contains(&self.threshold)) {
            return bad(format!("threshold {} is not in 0–1", self.threshold));
        }
        if !(self.view.opacity.is_finite() && (0.0..=1.0).contains(&self.view.opacity)) {
            return bad(format!("opacity {} is not in 0–1", self.view.opacity));
        }
        if self.view.selected >= self.prompts.len() {
            return bad(format!(
                "selected prompt {} does not exist ({} prompts)",
                self.view.selected,
                self.prompts.len()
            ));
        }
        if !is_sha256(&self.image_sha256) {
            return bad("image sha256 is not 64 hex digits".into());
        }
        if !self.masks.is_empty() && self.masks.len() != self.prompts.len() {
            return bad(format!(
                "has {} mask records for {} prompts",
                self.masks.len(),
                self.prompts.len()
            ));
        }
        if !(self.margin.is_finite() && self.margin > 0.0 && self.margin <= 1.0) {
            return bad(format!(
                "borderline margin {} is not in (0, 1]",
                self.margin
            ));
        }
        match &self.image {
            ImageSource::Embedded { png, .. } if png.is_empty() => {
                bad("the embedded image is empty".into())
            }
            ImageSource::Embedded { png, .. } if png.len() > MAX_EMBEDDED_IMAGE_BYTES => {
                bad(format!(
                    "the embedded image has {} bytes (at most {MAX_EMBEDDED_IMAGE_BYTES})",
                    png.len()
                ))
            }
            ImageSource::Url { url, .. } if !is_http_url(url) => bad(format!(
                "image URL must start with http:// or https://, got {:?}",
                truncate(url, 80)
            )),
            _ => Ok(()),
        }
    }

    /// The URL fragment, without `#`: `vlsm=1.DATA`.
    pub fn to_fragment(&self) -> Result<String> {
        self.validate()?;
        let (source, url, png) = match &self.image {
            ImageSource::Embedded { png, .. } => ("embedded", None, Some(png)),
            ImageSource::Url { url, .. } => ("url", Some(url.clone()), None),
            ImageSource::Omitted { .. } => ("omitted", None, None),
        };
        let wire = Wire {
            v: LINK_VERSION,
            weights: WireWeights {
                url: self.weights_url.clone(),
                sha256: self.weights_sha256.clone(),
                model: self.model.clone(),
            },
            prompts: self.prompts.clone(),
            threshold: self.threshold,
            view: self.view,
            image: WireImage {
                source: source.into(),
                name: self.image.name().into(),
                url,
                sha256: self.image_sha256.clone(),
            },
            masks: self.masks.iter().map(WireMask::from).collect(),
            margin: (!self.masks.is_empty()).then_some(self.margin),
            clinical: self.clinical.map(|c| WireClinical {
                slice: c.slice.to_string(),
                window: c.window.to_string(),
            }),
        };
        let mut payload = serde_json::to_vec(&wire)
            .map_err(|e| Error::Link(format!("cannot serialise the state: {e}")))?;
        payload.push(0);
        if let Some(png) = png {
            payload.extend_from_slice(png);
        }
        let zlib = miniz_oxide::deflate::compress_to_vec_zlib(&payload, 9);
        Ok(format!("{FRAGMENT_PREFIX}{}", URL_SAFE_NO_PAD.encode(zlib)))
    }

    /// A full link: the page URL (any fragment it had is replaced) and the fragment.
    pub fn to_link(&self, page: &str) -> Result<String> {
        let base = page.split('#').next().unwrap_or(page);
        Ok(format!("{base}#{}", self.to_fragment()?))
    }

    /// Reads a full link, a fragment with or without `#`, or anything with `#vlsm=1.` in it.
    /// Never panics: malformed, truncated and foreign input give an [`Error::Link`].
    pub fn from_link(link: &str) -> Result<Self> {
        let link = link.trim();
        if link.len() > MAX_FRAGMENT_CHARS {
            return Err(Error::Link(format!(
                "{} characters is too long for a vlsm link",
                link.len()
            )));
        }
        let fragment = match link.find('#') {
            Some(i) => &link[i + 1..],
            None => link,
        };
        let Some(data) = fragment.strip_prefix(FRAGMENT_PREFIX) else {
            if let Some(rest) = fragment.strip_prefix("vlsm=") {
                let version = rest.split('.').next().unwrap_or("");
                return Err(Error::Link(format!(
                    "link format version {:?} is not supported (this vlsm reads version {LINK_VERSION})",
                    truncate(version, 20)
                )));
            }
            return Err(Error::Link(
                "not a vlsm link: no #vlsm=1. fragment in it".into(),
            ));
        };
        let zlib = URL_SAFE_NO_PAD
            .decode(data.trim_end_matches('='))
            .map_err(|e| Error::Link(format!("the link is damaged (not base64url: {e})")))?;
        let payload =
            miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&zlib, MAX_PAYLOAD_BYTES)
                .map_err(|e| {
                    Error::Link(format!(
                        "the link is truncated or damaged (decompression failed: {:?})",
                        e.status
                    ))
                })?;
        let nul = payload
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Error::Link("the link is damaged (no end of state marker)".into()))?;
        let wire: Wire = serde_json::from_slice(&payload[..nul])
            .map_err(|e| Error::Link(format!("the link's state is malformed: {e}")))?;
        if wire.v != LINK_VERSION {
            return Err(Error::Link(format!(
                "link format version {} is not supported (this vlsm reads version {LINK_VERSION})",
                wire.v
            )));
        }
        let rest = &payload[nul + 1..];
        let name = wire.image.name;
        let image = match (wire.image.source.as_str(), wire.image.url) {
            ("embedded", None) => ImageSource::Embedded {
                name,
                png: rest.to_vec(),
            },
            ("url", Some(url)) => ImageSource::Url { name, url },
            ("omitted", None) => ImageSource::Omitted { name },
            (other, _) => {
                return Err(Error::Link(format!(
                    "the link's image source {:?} is not valid",
                    truncate(other, 40)
                )));
            }
        };
        if !matches!(image, ImageSource::Embedded { .. }) && !rest.is_empty() {
            return Err(Error::Link(
                "the link is damaged (stray image bytes)".into(),
            ));
        }
        let state = ShareState {
            weights_url: wire.weights.url,
            weights_sha256: wire.weights.sha256,
            model: wire.weights.model,
            prompts: wire.prompts,
            threshold: wire.threshold,
            view: wire.view,
            image,
            image_sha256: wire.image.sha256,
            masks: wire
                .masks
                .into_iter()
                .map(WireMask::check)
                .collect::<Result<_>>()?,
            margin: wire.margin.unwrap_or(BORDERLINE_MARGIN),
            clinical: wire.clinical.map(WireClinical::check).transpose()?,
        };
        state.validate()?;
        Ok(state)
    }
}

fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    matches!(rest, Some(r) if !r.is_empty() && !r.starts_with('/'))
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_sha256(s: &str) -> bool {
    is_hex(s, 64)
}

/// `len` lowercase hex digits.
fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

/// The default model: CLIPSeg rd64-refined as published by its authors.
pub const DEFAULT_WEIGHTS_URL: &str =
    "https://huggingface.co/CIDAS/clipseg-rd64-refined/resolve/main";

/// A model folder URL from what a user typed: a full URL, a hub page URL
/// (`https://huggingface.co/owner/name`) or a hub id (`owner/name`).
pub fn normalize_weights_url(input: &str) -> std::result::Result<String, String> {
    let s = input.trim().trim_end_matches('/');
    if s.is_empty() {
        return Err("the weights URL is empty".into());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("the weights URL contains spaces".into());
    }
    let hub = "https://huggingface.co/";
    if !s.contains("://") {
        let parts: Vec<&str> = s.split('/').collect();
        return if parts.len() == 2 && parts.iter().all(|p| is_hub_name(p)) {
            Ok(format!("{hub}{s}/resolve/main"))
        } else {
            Err(format!(
                "{s:?} is neither an http(s) URL nor a Hugging Face model id (owner/name)"
            ))
        };
    }
    if !(s.starts_with("https://") || s.starts_with("http://")) {
        return Err(format!("the weights URL must use http or https: {s:?}"));
    }
    if let Some(rest) = s.strip_prefix(hub) {
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| is_hub_name(p)) {
            return Ok(format!("{s}/resolve/main"));
        }
    }
    Ok(s.to_string())
}

fn is_hub_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Joins a model folder URL and a file name (`…/main` + `config.json` → `…/main/config.json`).
pub fn file_url(base: &str, file: &str) -> String {
    format!("{}/{file}", base.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(image: ImageSource) -> ShareState {
        ShareState {
            weights_url: "https://huggingface.co/CIDAS/clipseg-rd64-refined/resolve/main".into(),
            weights_sha256: Some("ab".repeat(32)),
            model: Some("biomedclipseg-d".into()),
            prompts: vec![
                "polyp".into(),
                "".into(),
                "a small pink polyp, ünïcode 🙂".into(),
            ],
            threshold: 0.35,
            view: ViewSettings {
                opacity: 0.7,
                selected: 2,
            },
            image,
            image_sha256: "cd".repeat(32),
            masks: (0..3u64)
                .map(|i| MaskCheck {
                    fingerprint: format!("{:016x}", 0xfeed + i),
                    foreground: 10 + i,
                    size: 352,
                    model_foreground: 5 + i,
                    sketch: u64::MAX - i,
                    borderline: i,
                })
                .collect(),
            margin: BORDERLINE_MARGIN,
            clinical: Some(ClinicalView {
                slice: "axial:42".parse().unwrap(),
                window: "40,400".parse().unwrap(),
            }),
        }
    }

    fn small_image() -> RgbImage {
        RgbImage::from_fn(37, 23, |x, y| image::Rgb([x as u8 * 7, y as u8 * 11, 99]))
    }

    #[test]
    fn round_trips_every_image_source() {
        let png = embeddable_png(&small_image()).unwrap().unwrap();
        for image in [
            ImageSource::Embedded {
                name: "a.png".into(),
                png,
            },
            ImageSource::Url {
                name: "b.jpg".into(),
                url: "http://127.0.0.1:8000/examples/b.jpg".into(),
            },
            ImageSource::Omitted {
                name: "c.tif".into(),
            },
        ] {
            let state = sample(image);
            let link = state.to_link("http://localhost:8080/#old").unwrap();
            assert!(link.starts_with("http://localhost:8080/#vlsm=1."), "{link}");
            assert_eq!(ShareState::from_link(&link).unwrap(), state);
            let fragment = state.to_fragment().unwrap();
            assert_eq!(ShareState::from_link(&fragment).unwrap(), state);
            assert_eq!(
                ShareState::from_link(&format!("#{fragment}")).unwrap(),
                state
            );
        }
    }

    #[test]
    fn embedded_png_decodes_to_the_same_pixels() {
        let img = small_image();
        let png = embeddable_png(&img).unwrap().unwrap();
        let back = crate::preprocess::decode_rgb(&png).unwrap();
        assert_eq!(back, img);
        assert_eq!(pixels_sha256(&back), pixels_sha256(&img));
    }

    #[test]
    fn large_images_are_not_embedded() {
        // Noise does not compress: 400×400×3 bytes > the embedding limit.
        let mut state = 12345u32;
        let noisy = RgbImage::from_fn(400, 400, |_, _| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let b = state.to_le_bytes();
            image::Rgb([b[1], b[2], b[3]])
        });
        assert!(embeddable_png(&noisy).unwrap().is_none());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let png = embeddable_png(&small_image()).unwrap().unwrap();
        let link = sample(ImageSource::Embedded {
            name: "a.png".into(),
            png,
        })
        .to_link("https://example.org/vlsm/")
        .unwrap();
        let start = link.find('#').unwrap() + 1 + FRAGMENT_PREFIX.len();
        // Every truncation of the data: zlib's checksum catches all of them.
        for cut in start..link.len() {
            let err = ShareState::from_link(&link[..cut]).unwrap_err();
            assert!(matches!(err, Error::Link(_)), "{err}");
        }
        // Single-character substitutions, deterministic pseudo-random positions.
        let mut seed = 7u64;
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_%=.#";
        for _ in 0..2000 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let pos = start + (seed >> 33) as usize % (link.len() - start);
            let mut bytes = link.clone().into_bytes();
            bytes[pos] = alphabet[(seed >> 20) as usize % alphabet.len()];
            let mutated = String::from_utf8(bytes).unwrap();
            if mutated != link {
                // Either refused, or (a change in base64 padding bits) the same state.
                if let Ok(state) = ShareState::from_link(&mutated) {
                    assert_eq!(state, ShareState::from_link(&link).unwrap());
                }
            }
        }
        for junk in [
            "",
            "#",
            "https://example.org/",
            "#vlsm=1.",
            "#vlsm=2.abcd",
            "#vlsm=1.!!!!",
            "#vlsm=1.AAAA",
            "vlsm=1.eJwDAAAAAAE",
            "#vlsm=1.\u{1F642}",
        ] {
            assert!(ShareState::from_link(junk).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn mask_records_round_trip_and_bad_ones_are_refused() {
        let state = sample(ImageSource::Omitted { name: "x".into() });
        let back = ShareState::from_link(&state.to_fragment().unwrap()).unwrap();
        assert_eq!(back, state);
        // A link without records (made without running) reads back with none.
        let mut bare = state.clone();
        bare.masks.clear();
        bare.clinical = None;
        let back = ShareState::from_link(&bare.to_fragment().unwrap()).unwrap();
        assert_eq!(back, bare);
        // Records edited by hand: each refused with a line naming the field.
        let edit = |from: &str, to: &str| {
            let fragment = state.to_fragment().unwrap();
            let data = fragment.strip_prefix(FRAGMENT_PREFIX).unwrap();
            let payload = miniz_oxide::inflate::decompress_to_vec_zlib(
                &URL_SAFE_NO_PAD.decode(data).unwrap(),
            )
            .unwrap();
            let nul = payload.iter().position(|&b| b == 0).unwrap();
            let text = String::from_utf8(payload[..nul].to_vec()).unwrap();
            assert!(text.contains(from), "{text} lacks {from}");
            let mut edited = text.replacen(from, to, 1).into_bytes();
            edited.push(0);
            let zlib = miniz_oxide::deflate::compress_to_vec_zlib(&edited, 6);
            ShareState::from_link(&format!(
                "{FRAGMENT_PREFIX}{}",
                URL_SAFE_NO_PAD.encode(zlib)
            ))
            .unwrap_err()
            .to_string()
        };
        for (from, to, word) in [
            ("\"size\":352", "\"size\":0", "model size"),
            ("\"size\":352", "\"size\":99999", "model size"),
            ("\"sketch\":\"ffff", "\"sketch\":\"xyzw", "sketch"),
            ("\"fingerprint\":\"", "\"fingerprint\":\"zz", "fingerprint"),
            (
                "\"model_foreground\":5",
                "\"model_foreground\":9999999",
                "pixel count",
            ),
            ("\"margin\":0.01", "\"margin\":-1", "margin"),
            ("axial:42", "oblique:42", "slice"),
            ("axial:42", "axial:99999999", "too large"),
            ("\"window\":\"40,400\"", "\"window\":\"40,0\"", "window"),
            (
                "\"borderline\":0",
                "\"borderline\":0,\"extra\":1",
                "malformed",
            ),
        ] {
            let err = edit(from, to);
            assert!(err.contains(word), "{err} lacks {word}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn rejects_invalid_states_with_a_message() {
        let img = ImageSource::Omitted { name: "x".into() };
        type Change = Box<dyn Fn(&mut ShareState)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|s| s.prompts.clear()), "prompts"),
            (Box::new(|s| s.prompts = vec!["p".into(); 11]), "prompts"),
            (Box::new(|s| s.prompts[0] = "x".repeat(2001)), "characters"),
            (Box::new(|s| s.threshold = f32::NAN), "threshold"),
            (Box::new(|s| s.threshold = 1.5), "threshold"),
            (Box::new(|s| s.view.opacity = -0.1), "opacity"),
            (Box::new(|s| s.view.selected = 3), "selected"),
            (
                Box::new(|s| s.weights_url = "file:///etc/passwd".into()),
                "weights URL",
            ),
            (
                Box::new(|s| s.weights_url = "javascript:alert(1)".into()),
                "weights URL",
            ),
            (
                Box::new(|s| s.model = Some("cris-9000".into())),
                "model family",
            ),
            (
                Box::new(|s| s.weights_sha256 = Some("xyz".into())),
                "sha256",
            ),
            (Box::new(|s| s.image_sha256 = "AB".repeat(32)), "sha256"),
            (Box::new(|s| s.masks.truncate(2)), "mask records"),
            (Box::new(|s| s.margin = 0.0), "margin"),
            (Box::new(|s| s.margin = f32::INFINITY), "margin"),
            (
                Box::new(|s| {
                    s.image = ImageSource::Url {
                        name: "n".into(),
                        url: "data:image/png;base64,AAAA".into(),
                    }
                }),
                "image URL",
            ),
        ];
        for (change, word) in cases {
            let mut state = sample(img.clone());
            change(&mut state);
            let err = state.to_fragment().unwrap_err().to_string();
            assert!(err.contains(word), "{err} lacks {word}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn weights_urls_from_what_users_type() {
        assert_eq!(
            normalize_weights_url("CIDAS/clipseg-rd64-refined").unwrap(),
            DEFAULT_WEIGHTS_URL
        );
        assert_eq!(
            normalize_weights_url(" https://huggingface.co/CIDAS/clipseg-rd64-refined/ ").unwrap(),
            DEFAULT_WEIGHTS_URL
        );
        assert_eq!(
            normalize_weights_url(DEFAULT_WEIGHTS_URL).unwrap(),
            DEFAULT_WEIGHTS_URL
        );
        assert_eq!(
            normalize_weights_url("http://127.0.0.1:8080/models/tiny/").unwrap(),
            "http://127.0.0.1:8080/models/tiny"
        );
        for bad in [
            "",
            "  ",
            "ftp://x/y",
            "a/b/c",
            "not a url",
            "javascript:alert(1)",
        ] {
            assert!(normalize_weights_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fingerprint_is_sha256_of_zero_one_bytes() {
        // sha256 of the 4 bytes 00 01 01 00 (computed with `printf '\x00\x01\x01\x00' | sha256sum`).
        assert_eq!(mask_fingerprint(&[0, 1, 1, 0]), "d5e2d2ac07b741be");
        assert_eq!(
            mask_fingerprint(&[0, 255, 7, 0]),
            mask_fingerprint(&[0, 1, 1, 0])
        );
        assert_ne!(
            mask_fingerprint(&[0, 1, 1, 0]),
            mask_fingerprint(&[1, 1, 1, 0])
        );
        assert_eq!(
            file_url("https://h/x/", "config.json"),
            "https://h/x/config.json"
        );
    }
}
