//! Overlap metrics with medvlsm's conventions (MONAI `compute_dice`/`compute_iou` with
//! `ignore_empty=False`, per image): any non-zero byte is foreground; an empty prediction
//! against an empty truth scores 1, anything against an empty truth otherwise 0.

use crate::error::{Error, Result};

/// Foreground counts of a prediction/truth pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Overlap {
    pub predicted: u64,
    pub truth: u64,
    pub both: u64,
}

impl Overlap {
    pub fn of(pred: &[u8], truth: &[u8]) -> Result<Self> {
        if pred.len() != truth.len() {
            return Err(Error::Input(format!(
                "prediction has {} pixels but the ground truth has {}",
                pred.len(),
                truth.len()
            )));
        }
        let mut o = Overlap::default();
        for (&p, &t) in pred.iter().zip(truth) {
            let (p, t) = (p != 0, t != 0);
            o.predicted += u64::from(p);
            o.truth += u64::from(t);
            o.both += u64::from(p && t);
        }
        Ok(o)
    }

    /// 2|P∩G| / (|P|+|G|); 1 when both are empty.
    pub fn dice(&self) -> f64 {
        let denominator = self.predicted + self.truth;
        if denominator == 0 {
            1.0
        } else {
            2.0 * self.both as f64 / denominator as f64
        }
    }

    /// |P∩G| / |P∪G|; 1 when both are empty.
    pub fn iou(&self) -> f64 {
        let union = self.predicted + self.truth - self.both;
        if union == 0 {
            1.0
        } else {
            self.both as f64 / union as f64
        }
    }
}

/// Dice of a binary prediction against a binary truth of the same size.
pub fn dice(pred: &[u8], truth: &[u8]) -> Result<f64> {
    Ok(Overlap::of(pred, truth)?.dice())
}

/// IoU (Jaccard) of a binary prediction against a binary truth of the same size.
pub fn iou(pred: &[u8], truth: &[u8]) -> Result<f64> {
    Ok(Overlap::of(pred, truth)?.iou())
}

/// A ground-truth mask from image bytes: grey level > 127 is foreground, as medvlsm
/// binarises masks (JPEG masks such as Kvasir's are not exactly 0/255).
pub fn binarize_mask(image: &image::DynamicImage) -> (u32, u32, Vec<u8>) {
    let grey = image.to_luma8();
    let (w, h) = grey.dimensions();
    (
        w,
        h,
        grey.into_raw()
            .into_iter()
            .map(|v| u8::from(v > 127))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_cases() {
        // P = {0,1,2}, G = {1,2,3}: |P∩G| = 2 → Dice 4/6, IoU 2/4.
        let p = [1, 1, 1, 0, 0];
        let g = [0, 1, 1, 1, 0];
        assert!((dice(&p, &g).unwrap() - 4.0 / 6.0).abs() < 1e-12);
        assert!((iou(&p, &g).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(dice(&p, &p).unwrap(), 1.0);
        assert_eq!(dice(&[0, 0], &[1, 1]).unwrap(), 0.0);
        assert_eq!(iou(&[1, 0], &[0, 1]).unwrap(), 0.0);
    }

    #[test]
    fn empty_conventions() {
        assert_eq!(dice(&[0, 0, 0], &[0, 0, 0]).unwrap(), 1.0);
        assert_eq!(iou(&[0, 0, 0], &[0, 0, 0]).unwrap(), 1.0);
        assert_eq!(dice(&[0, 1, 0], &[0, 0, 0]).unwrap(), 0.0);
        assert_eq!(dice(&[0, 0, 0], &[0, 1, 0]).unwrap(), 0.0);
        assert_eq!(dice(&[], &[]).unwrap(), 1.0);
    }

    #[test]
    fn any_nonzero_is_foreground_and_sizes_must_match() {
        assert_eq!(dice(&[255, 0], &[1, 0]).unwrap(), 1.0);
        let err = dice(&[1, 0], &[1]).unwrap_err().to_string();
        assert!(err.contains("2 pixels") && err.contains("1"), "{err}");
    }

    #[test]
    fn masks_binarise_above_127() {
        let img = image::GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        let (w, h, m) = binarize_mask(&image::DynamicImage::ImageLuma8(img));
        assert_eq!((w, h, m), (4, 1, vec![0, 0, 1, 1]));
    }
}
