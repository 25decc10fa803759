//! DICOM input: single- and multi-frame files, greyscale (MONOCHROME1/2, 8–16 bits, with
//! the rescale slope and intercept) and colour (RGB, YBR), in the transfer syntaxes
//! dicom-rs decodes in pure Rust: implicit and explicit VR little endian, deflated, RLE
//! lossless, JPEG baseline, extended and lossless, and natively JPEG 2000 and HTJ2K
//! (`openjp2`, OpenJPEG translated to Rust; it needs libc's allocator, so not in the
//! browser). Others (JPEG-LS, …) are
//! refused with their name.
//!
//! How a pixel becomes the model's input: greyscale values go through the modality LUT
//! (stored value × RescaleSlope + RescaleIntercept), then a window ([`crate::window`]: the
//! file's first Window Center/Width by default, else the frame's minimum to maximum) to
//! 0–255, inverted for MONOCHROME1, and the grey is repeated in R, G and B. Colour frames
//! are taken as 8-bit RGB (YBR_FULL converted with DICOM's equations).

use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use image::RgbImage;

use crate::error::{Error, Result};
use crate::window::{Window, to_grey};

/// The most frames a file may declare (a hostile header cannot make vlsm loop for ever).
pub const MAX_FRAMES: u32 = 10_000;

/// A parsed DICOM file; frames are decoded one at a time.
pub struct DicomFile {
    object: DefaultDicomObject,
    pub sop_instance_uid: String,
    pub rows: u32,
    pub columns: u32,
    pub frames: u32,
    pub samples_per_pixel: u16,
    pub photometric: String,
    /// The first Window Center and Width, when the file has them.
    pub window: Option<(f64, f64)>,
    pub transfer_syntax: String,
}

/// Whether `bytes` start like a DICOM file (`DICM` after the 128-byte preamble).
pub fn is_dicom(bytes: &[u8]) -> bool {
    bytes.len() >= 132 && &bytes[128..132] == b"DICM"
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Image(format!("DICOM: {what}"))
}

impl DicomFile {
    /// Parses the file and checks its geometry against the pixel budget; decodes nothing.
    pub fn read(bytes: &[u8]) -> Result<Self> {
        if !is_dicom(bytes) {
            return Err(bad(
                "not a DICOM file (no DICM marker after the 128-byte preamble)",
            ));
        }
        // dicom-rs (0.8) parses the deflated syntax but cannot inflate it: do that first.
        let inflated = inflate_deflated(bytes)?;
        let bytes = inflated.as_deref().unwrap_or(bytes);
        let object = OpenFileOptions::new()
            .read_preamble(ReadPreamble::Never)
            .from_reader(&bytes[128..])
            .map_err(|e| bad(format!("cannot parse the file: {e}")))?;
        let text = |tag| text_of(&object, tag);
        let number = |tag| {
            object
                .element_opt(tag)
                .ok()
                .flatten()
                .and_then(|e| e.to_int::<i64>().ok())
        };
        let float = |tag| {
            object
                .element_opt(tag)
                .ok()
                .flatten()
                .and_then(|e| e.to_multi_float64().ok())
                .and_then(|v| v.first().copied())
        };
        if object
            .element_opt(tags::PIXEL_DATA)
            .ok()
            .flatten()
            .is_none()
        {
            return Err(bad("the file has no pixel data (not an image)"));
        }
        let rows = number(tags::ROWS).ok_or_else(|| bad("no Rows"))?;
        let columns = number(tags::COLUMNS).ok_or_else(|| bad("no Columns"))?;
        let (Ok(rows), Ok(columns)) = (u32::try_from(rows), u32::try_from(columns)) else {
            return Err(bad(format!("impossible size {columns}×{rows}")));
        };
        if rows == 0 || columns == 0 {
            return Err(bad(format!("empty image ({columns}×{rows})")));
        }
        crate::preprocess::check_pixels(columns, rows)?;
        let frames = number(tags::NUMBER_OF_FRAMES).unwrap_or(1);
        if !(1..=i64::from(MAX_FRAMES)).contains(&frames) {
            return Err(bad(format!("{frames} frames (1 to {MAX_FRAMES} accepted)")));
        }
        let samples = number(tags::SAMPLES_PER_PIXEL).unwrap_or(1);
        if samples != 1 && samples != 3 {
            return Err(bad(format!(
                "{samples} samples per pixel (1 or 3 accepted)"
            )));
        }
        let window = match (float(tags::WINDOW_CENTER), float(tags::WINDOW_WIDTH)) {
            (Some(c), Some(w)) => Some((c, w)),
            _ => None,
        };
        // A JPEG 2000 codestream declares its own size, which the decoder allocates for: it
        // must be the header's (already within the pixel budget).
        if let Some(fragments) = object
            .element_opt(tags::PIXEL_DATA)
            .ok()
            .flatten()
            .and_then(|e| e.value().fragments())
        {
            for fragment in fragments {
                if let Some((w, h)) = jpeg2000_size(fragment)
                    && (w, h) != (u64::from(columns), u64::from(rows))
                {
                    return Err(bad(format!(
                        "a JPEG 2000 frame declares {w}×{h} pixels, the header {columns}×{rows}"
                    )));
                }
            }
        }
        let transfer_syntax = match inflated {
            Some(_) => DEFLATED.to_string(),
            None => object
                .meta()
                .transfer_syntax()
                .trim_end_matches('\0')
                .to_string(),
        };
        Ok(DicomFile {
            sop_instance_uid: text(tags::SOP_INSTANCE_UID).unwrap_or_default(),
            rows,
            columns,
            frames: frames as u32,
            samples_per_pixel: samples as u16,
            photometric: text(tags::PHOTOMETRIC_INTERPRETATION).unwrap_or_default(),
            window,
            transfer_syntax,
            object,
        })
    }

    /// The parsed data set (for writing derived objects such as a SEG, natively).
    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn object(&self) -> &DefaultDicomObject {
        &self.object
    }

    /// A frame's values: greyscale after the modality LUT (`rows × columns`), or colour as
    /// RGB triples 0–255 (`rows × columns × 3`).
    pub fn frame_values(&self, frame: u32) -> Result<Vec<f64>> {
        if frame >= self.frames {
            return Err(bad(format!("frame {frame} of {}", self.frames)));
        }
        let decoded = self
            .object
            .decode_pixel_data_frame(frame)
            .map_err(|e| self.decode_error(e))?;
        let values: Vec<f64> = decoded
            .to_vec_frame(0)
            .map_err(|e| bad(format!("converting frame {frame}: {e}")))?;
        let expected =
            self.rows as usize * self.columns as usize * usize::from(self.samples_per_pixel);
        if values.len() != expected {
            return Err(bad(format!(
                "frame {frame} has {} values, its header says {expected}",
                values.len()
            )));
        }
        let photometric = decoded.photometric_interpretation().as_str().to_string();
        if self.samples_per_pixel == 3 && photometric.starts_with("YBR_FULL") {
            return Ok(ybr_full_to_rgb(&values));
        }
        Ok(values)
    }

    fn decode_error(&self, e: dicom_pixeldata::Error) -> Error {
        let message = e.to_string();
        if message.to_lowercase().contains("unsupported") || message.contains("not supported") {
            let name = dicom_transfer_syntax_name(&self.transfer_syntax);
            return bad(format!(
                "unsupported transfer syntax {name} ({})",
                self.transfer_syntax
            ));
        }
        bad(format!("decoding the pixel data: {message}"))
    }

    /// A frame as the model's 8-bit RGB input (see the module documentation).
    pub fn frame_rgb(&self, frame: u32, window: Window) -> Result<RgbImage> {
        let values = self.frame_values(frame)?;
        let rgb: Vec<u8> = if self.samples_per_pixel == 3 {
            values
                .iter()
                .map(|v| v.round().clamp(0.0, 255.0) as u8)
                .collect()
        } else {
            let invert = self.photometric == "MONOCHROME1";
            to_grey(&values, window, self.window, invert)?
                .into_iter()
                .flat_map(|g| [g, g, g])
                .collect()
        };
        RgbImage::from_raw(self.columns, self.rows, rgb).ok_or_else(|| bad("frame size"))
    }
}

const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// For a file in Deflated Explicit VR Little Endian: the same file with its data set
/// inflated and the transfer syntax in the file meta group changed to Explicit VR Little
/// Endian; `None` for any other file. The inflated size is bounded by the pixel budget.
fn inflate_deflated(bytes: &[u8]) -> Result<Option<Vec<u8>>> {
    // (0002,0000) UL: the meta group's length, right after "DICM".
    let group = bytes
        .get(132..144)
        .ok_or_else(|| bad("truncated file meta group"))?;
    if group[..6] != [0x02, 0x00, 0x00, 0x00, b'U', b'L'] {
        return Ok(None); // not the standard layout: let the parser judge it
    }
    let length = u32::from_le_bytes([group[8], group[9], group[10], group[11]]) as usize;
    let meta_end = 144usize
        .checked_add(length)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("truncated file meta group"))?;
    // (0002,0010) UI: the transfer syntax.
    let meta = &bytes[144..meta_end];
    let Some(at) = meta
        .windows(6)
        .position(|w| w == [0x02, 0x00, 0x10, 0x00, b'U', b'I'])
    else {
        return Ok(None);
    };
    let value_len = u16::from_le_bytes([meta[at + 6], meta[at + 7]]) as usize;
    let value = meta
        .get(at + 8..at + 8 + value_len)
        .ok_or_else(|| bad("truncated transfer syntax"))?;
    if String::from_utf8_lossy(value).trim_end_matches('\0') != DEFLATED {
        return Ok(None);
    }
    // The most a data set may inflate to: the pixel budget at 16 bits × 3 samples, plus
    // room for the other elements.
    let limit = (crate::preprocess::max_pixels() as usize).saturating_mul(6) + (64 << 20);
    let data_set = miniz_oxide::inflate::decompress_to_vec_with_limit(&bytes[meta_end..], limit)
        .map_err(|e| bad(format!("inflating the deflated data set: {e:?}")))?;
    let mut uid = EXPLICIT_LE.as_bytes().to_vec();
    uid.push(0); // UIDs are padded to an even length with NUL
    let mut out = Vec::with_capacity(meta_end + data_set.len());
    out.extend_from_slice(&bytes[..132]);
    let new_length = (length - value_len + uid.len()) as u32;
    out.extend_from_slice(&group[..8]);
    out.extend_from_slice(&new_length.to_le_bytes());
    out.extend_from_slice(&meta[..at + 6]);
    out.extend_from_slice(&(uid.len() as u16).to_le_bytes());
    out.extend_from_slice(&uid);
    out.extend_from_slice(&meta[at + 8 + value_len..]);
    out.extend_from_slice(&data_set);
    Ok(Some(out))
}

/// DICOM's YBR_FULL to RGB (PS3.3 C.7.6.3.1.2), rounded.
fn ybr_full_to_rgb(values: &[f64]) -> Vec<f64> {
    values
        .chunks_exact(3)
        .flat_map(|p| {
            let (y, cb, cr) = (p[0], p[1] - 128.0, p[2] - 128.0);
            [
                y + 1.402 * cr,
                y - 0.344_136 * cb - 0.714_136 * cr,
                y + 1.772 * cb,
            ]
            .map(|v| v.round().clamp(0.0, 255.0))
        })
        .collect()
}

/// A transfer syntax's name, for error messages.
/// A text element's value without its padding, if the data set has it.
pub(crate) fn text_of(object: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<String> {
    object
        .element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().trim_end_matches('\0').to_string())
}

/// Width and height a JPEG 2000 codestream declares (its SIZ segment right after SOC), if
/// the bytes start one.
fn jpeg2000_size(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() < 24 || bytes[..4] != [0xff, 0x4f, 0xff, 0x51] {
        return None;
    }
    let u32_at = |i: usize| u64::from(u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap()));
    // SOC, SIZ marker, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz.
    let (x, y) = (u32_at(8), u32_at(12));
    let (x0, y0) = (u32_at(16), u32_at(20));
    Some((x.saturating_sub(x0), y.saturating_sub(y0)))
}

fn dicom_transfer_syntax_name(uid: &str) -> &'static str {
    match uid {
        "1.2.840.10008.1.2" => "Implicit VR Little Endian",
        "1.2.840.10008.1.2.1" => "Explicit VR Little Endian",
        "1.2.840.10008.1.2.1.99" => "Deflated Explicit VR Little Endian",
        "1.2.840.10008.1.2.2" => "Explicit VR Big Endian",
        "1.2.840.10008.1.2.5" => "RLE Lossless",
        "1.2.840.10008.1.2.4.50" => "JPEG Baseline",
        "1.2.840.10008.1.2.4.51" => "JPEG Extended",
        "1.2.840.10008.1.2.4.57" | "1.2.840.10008.1.2.4.70" => "JPEG Lossless",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "JPEG-LS",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "JPEG 2000",
        "1.2.840.10008.1.2.4.201" | "1.2.840.10008.1.2.4.202" | "1.2.840.10008.1.2.4.203" => {
            "HTJ2K"
        }
        _ => "unknown",
    }
}
