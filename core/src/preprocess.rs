//! Image in, model input out — as medvlsm does it with PIL: decode, `convert("RGB")`, resize
//! to S×S with PIL's bilinear filter (antialiased when shrinking, PIL's fixed-point
//! arithmetic, so the bytes match PIL's), rescale 1/255, normalise. And the way back: a
//! model-resolution mask resized to the image's own size (PIL nearest).

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::PreprocessConfig;
use crate::error::{Error, Result};

/// The pixel budget of every image decode, natively and in the page: 64 megapixels (an
/// 8000×8000 image). A header declaring more is refused before anything is decoded, so a
/// small file cannot make the decoder allocate gigabytes (a "decompression bomb").
pub const DEFAULT_MAX_PIXELS: u64 = 64_000_000;

/// The largest budget [`set_max_pixels`] accepts: 900 megapixels (30000×30000).
pub const MAX_MAX_PIXELS: u64 = 900_000_000;

static MAX_PIXELS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_PIXELS);

/// The current pixel budget (see [`DEFAULT_MAX_PIXELS`]).
pub fn max_pixels() -> u64 {
    MAX_PIXELS.load(Ordering::Relaxed)
}

/// Changes the pixel budget for this process (the CLI's `--max-pixels`).
pub fn set_max_pixels(pixels: u64) -> Result<()> {
    if pixels == 0 || pixels > MAX_MAX_PIXELS {
        return Err(Error::Input(format!(
            "--max-pixels {pixels}: must be between 1 and {MAX_MAX_PIXELS}"
        )));
    }
    MAX_PIXELS.store(pixels, Ordering::Relaxed);
    Ok(())
}

/// The most bytes a decoder may allocate for an image of `pixels` pixels: 16-bit RGBA
/// (8 bytes a pixel, the widest layout decoded) plus room for the decoder's own tables.
fn decode_budget(pixels: u64) -> u64 {
    pixels * 8 + (16 << 20)
}

/// Refuses a width and height beyond the pixel budget, naming the limit.
pub fn check_pixels(w: u32, h: u32) -> Result<()> {
    let (pixels, limit) = (u64::from(w) * u64::from(h), max_pixels());
    if pixels > limit {
        return Err(Error::Image(format!(
            "{w}×{h} = {pixels} pixels, over the limit of {limit} (--max-pixels raises it)"
        )));
    }
    Ok(())
}

/// Decodes PNG/JPEG/BMP/TIFF/WebP bytes (the format is sniffed from the bytes, not taken
/// from a file name) to 8-bit RGB. Grey is replicated, palettes expanded, alpha dropped
/// (as PIL's `convert("RGB")`), 16-bit samples scaled to 8 bits (`round(v / 257)`).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    Ok(match decode_image(bytes)? {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Decodes a ground-truth mask: grey level > 127 is foreground (medvlsm's binarisation).
/// Returns width, height and one 0/1 byte per pixel.
pub fn decode_mask(bytes: &[u8]) -> Result<(u32, u32, Vec<u8>)> {
    Ok(crate::metrics::binarize_mask(&decode_image(bytes)?))
}

/// A reader for the format the bytes hold (sniffed from the bytes, not a file name).
fn sniff(bytes: &[u8]) -> Result<(ImageReader<Cursor<&[u8]>>, image::ImageFormat)> {
    if bytes.is_empty() {
        return Err(Error::Image("the file is empty".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Image(e.to_string()))?;
    let format = reader.format().ok_or_else(|| {
        Error::Image(
            "unsupported or unrecognised format (expected PNG, JPEG, BMP, TIFF or WebP)".into(),
        )
    })?;
    Ok((reader, format))
}

/// Width and height from an image's header, without decoding it.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32)> {
    let (reader, format) = sniff(bytes)?;
    reader.into_dimensions().map_err(|e| describe(format, e))
}

/// Decodes image bytes with the size limits and truncation checks of [`decode_rgb`]: the
/// header's width and height are checked against the pixel budget first, then the decoder
/// runs with its allocations capped to what an image of that size needs.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    let (w, h) = dimensions(bytes)?;
    if w == 0 || h == 0 {
        return Err(Error::Image(format!("the image has zero size ({w}×{h})")));
    }
    check_pixels(w, h)?;
    let (mut reader, format) = sniff(bytes)?;
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder would fill the missing part with grey; PIL refuses, and so do we.
        return Err(Error::Image(
            "corrupt or truncated Jpeg data: no end-of-image marker after the image data".into(),
        ));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(decode_budget(u64::from(w) * u64::from(h)));
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(|e| describe(format, e))?;
    if decoder.dimensions() != (w, h) {
        return Err(Error::Image(format!(
            "corrupt {format:?} data: the header gives two different sizes"
        )));
    }
    decoder
        .set_limits(limits)
        .map_err(|e| describe(format, e))?;
    DynamicImage::from_decoder(decoder).map_err(|e| describe(format, e))
}

/// A complete baseline or progressive JPEG ends its last scan (SOS, `FF DA`) with an
/// end-of-image marker (`FF D9`); entropy-coded data cannot contain `FF D9` by accident.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| {
        bytes
            .windows(2)
            .rposition(|w| w[0] == 0xFF && w[1] == marker)
    };
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

fn describe(format: image::ImageFormat, e: image::ImageError) -> Error {
    use image::ImageError as E;
    match e {
        E::Limits(l) => Error::Image(format!("{format:?} image is too large to decode ({l})")),
        E::Unsupported(u) => Error::Image(format!("unsupported {format:?} variant: {u}")),
        E::Decoding(d) => Error::Image(format!("corrupt or truncated {format:?} data: {d}")),
        E::IoError(io) => Error::Image(format!("corrupt or truncated {format:?} data: {io}")),
        other => Error::Image(format!("{format:?}: {other}")),
    }
}

/// PIL's fixed-point precision for 8-bit resampling (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One axis of a PIL resample: for each output index, the first input index and the
/// fixed-point weights of the inputs it reads.
struct AxisCoeffs {
    starts: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` from Pillow's Resample.c, bilinear filter.
fn bilinear_coeffs(in_size: usize, out_size: usize) -> AxisCoeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle filter's support is 1
    let triangle = |x: f64| {
        let x = x.abs();
        if x < 1.0 { 1.0 - x } else { 0.0 }
    };
    let mut starts = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        // PIL multiplies by the reciprocal (`ss`); dividing can round differently.
        let ss = 1.0 / filterscale;
        let raw: Vec<f64> = (xmin..xmax)
            .map(|x| triangle((x as f64 - center + 0.5) * ss))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let v = w * (1u32 << PRECISION_BITS) as f64;
                if v < 0.0 {
                    (v - 0.5) as i32
                } else {
                    (v + 0.5) as i32
                }
            })
            .collect();
        starts.push(xmin);
        weights.push(fixed);
    }
    AxisCoeffs { starts, weights }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes to `width`×`height` exactly as PIL's `Image.resize(size, Image.BILINEAR)`
/// (Pillow 13: two separable fixed-point passes; the vertical one first when the height
/// shrinks more than twice as much as the width, else the horizontal one first, as all
/// older Pillows did).
pub fn resize_bilinear_pil(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    if (w, h) == (ow, oh) {
        return img.clone();
    }
    let src = img.as_raw();
    let horizontal_first = !(h > oh && (h - oh) as i64 > (w as i64 - ow as i64) * 2);
    let out = if horizontal_first {
        let vert = (h != oh).then(|| bilinear_coeffs(h, oh));
        // Only the rows the vertical pass will read (as PIL).
        let (first, last) = match &vert {
            Some(v) => (v.starts[0], v.starts[oh - 1] + v.weights[oh - 1].len()),
            None => (0, h),
        };
        let rows = &src[first * w * 3..last * w * 3];
        let tmp = if w != ow {
            horizontal_pass(rows, w, last - first, ow)
        } else {
            rows.to_vec()
        };
        match &vert {
            Some(v) => vertical_pass(&tmp, ow, v, first),
            None => tmp,
        }
    } else {
        let tmp = vertical_pass(src, w, &bilinear_coeffs(h, oh), 0);
        if w != ow {
            horizontal_pass(&tmp, w, oh, ow)
        } else {
            tmp
        }
    };
    RgbImage::from_raw(width, height, out).expect("buffer sized for the image")
}

/// Resamples each of `rows` RGB rows from `w` to `ow` pixels.
fn horizontal_pass(src: &[u8], w: usize, rows: usize, ow: usize) -> Vec<u8> {
    let horiz = bilinear_coeffs(w, ow);
    let mut out = vec![0u8; rows * ow * 3];
    for y in 0..rows {
        let src_row = &src[y * w * 3..(y + 1) * w * 3];
        let out_row = &mut out[y * ow * 3..(y + 1) * ow * 3];
        for (xx, (start, k)) in horiz.starts.iter().zip(&horiz.weights).enumerate() {
            for c in 0..3 {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (i, &kw) in k.iter().enumerate() {
                    acc += src_row[(start + i) * 3 + c] as i32 * kw;
                }
                out_row[xx * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

/// Resamples the columns of a `w`-pixel-wide RGB buffer whose first row is source row
/// `row_offset`, with precomputed vertical coefficients.
fn vertical_pass(src: &[u8], w: usize, vert: &AxisCoeffs, row_offset: usize) -> Vec<u8> {
    let stride = w * 3;
    let mut out = vec![0u8; vert.starts.len() * stride];
    for (yy, (start, k)) in vert.starts.iter().zip(&vert.weights).enumerate() {
        let start = start - row_offset;
        for x in 0..stride {
            let mut acc: i32 = 1 << (PRECISION_BITS - 1);
            for (i, &kw) in k.iter().enumerate() {
                acc += src[(start + i) * stride + x] as i32 * kw;
            }
            out[yy * stride + x] = clip8(acc);
        }
    }
    out
}

/// Model input for one image: `[3, S, S]` floats, channel-major, resized and normalised.
pub fn pixel_values(img: &RgbImage, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    let s = cfg.size as u32;
    let resized;
    let img = if (img.width(), img.height()) == (s, s) {
        img
    } else if cfg.do_resize {
        resized = resize_bilinear_pil(img, s, s);
        &resized
    } else {
        return Err(Error::Input(format!(
            "the checkpoint disables resizing, but the image is {}×{}, not {s}×{s}",
            img.width(),
            img.height()
        )));
    };
    let n = (s * s) as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let mut v = px.0[c] as f32;
            if cfg.do_rescale {
                v *= cfg.rescale_factor;
            }
            if cfg.do_normalize {
                v = (v - cfg.image_mean[c]) / cfg.image_std[c];
            }
            out[c * n + i] = v;
        }
    }
    Ok(out)
}

/// Resizes a row-major `w`×`h` mask to `out_w`×`out_h` as PIL's `NEAREST` does.
pub fn resize_nearest(mask: &[u8], w: usize, h: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let index = |o: usize, size_in: usize, size_out: usize| {
        // PIL: source = floor((o + 0.5) * in / out), computed in double.
        (((o as f64 + 0.5) * size_in as f64 / size_out as f64) as usize).min(size_in - 1)
    };
    let cols: Vec<usize> = (0..out_w).map(|x| index(x, w, out_w)).collect();
    let mut out = Vec::with_capacity(out_w * out_h);
    for y in 0..out_h {
        let row = &mask[index(y, h, out_h) * w..][..w];
        out.extend(cols.iter().map(|&x| row[x]));
    }
    out
}
