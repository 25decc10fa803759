//! Pictures of results: binary mask PNGs and overlays.

use image::{GrayImage, ImageFormat, RgbImage};
use std::io::Cursor;

use crate::error::{Error, Result};

/// Encodes a row-major 0/1 mask as a greyscale PNG with values 0/255.
pub fn mask_png(mask: &[u8], width: u32, height: u32) -> Result<Vec<u8>> {
    let pixels = mask.iter().map(|&m| if m != 0 { 255 } else { 0 }).collect();
    let img = GrayImage::from_raw(width, height, pixels).ok_or_else(|| {
        Error::Input(format!(
            "mask has {} pixels, not {width}×{height}",
            mask.len()
        ))
    })?;
    encode_png(&img)
}

/// The image with the mask's foreground tinted by `color` at `alpha` (0–1).
pub fn overlay(image: &RgbImage, mask: &[u8], color: [u8; 3], alpha: f32) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    if mask.len() != (w as usize) * (h as usize) {
        return Err(Error::Input(format!(
            "mask has {} pixels, not {w}×{h}",
            mask.len()
        )));
    }
    let mut out = image.clone();
    for (px, &m) in out.pixels_mut().zip(mask) {
        if m != 0 {
            for (v, &tint) in px.0.iter_mut().zip(&color) {
                *v = (*v as f32 * (1.0 - alpha) + tint as f32 * alpha).round() as u8;
            }
        }
    }
    Ok(out)
}

/// Encodes an 8-bit image as PNG.
pub fn encode_png<P>(img: &image::ImageBuffer<P, Vec<u8>>) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType<Subpixel = u8>,
{
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| Error::Image(format!("encoding PNG: {e}")))?;
    Ok(bytes)
}

/// Encodes an RGB image as the smallest PNG the encoder makes (for share links).
pub fn encode_png_best(img: &RgbImage) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut bytes = Vec::new();
    PngEncoder::new_with_quality(&mut bytes, CompressionType::Best, FilterType::Adaptive)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Image(format!("encoding PNG: {e}")))?;
    Ok(bytes)
}

/// A float32 NumPy `.npy` file (format 1.0), e.g. raw logits `[size, size]`.
pub fn npy_f32(shape: &[usize], values: &[f32]) -> Result<Vec<u8>> {
    if shape.iter().product::<usize>() != values.len() {
        return Err(Error::Input(format!(
            "npy shape {shape:?} does not hold {} values",
            values.len()
        )));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + values.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn npy_header_is_aligned_and_data_follows() {
        let bytes = super::npy_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.5]).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        let data = &bytes[10 + header_len..];
        assert_eq!(data.len(), 24);
        assert_eq!(f32::from_le_bytes(data[20..24].try_into().unwrap()), 5.5);
        assert!(super::npy_f32(&[2, 2], &[1.0]).is_err());
    }
}
