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
