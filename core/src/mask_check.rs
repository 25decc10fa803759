//! What a share link records about each mask, and how a recomputed mask compares with it.
//!
//! The exact [`fingerprint`](crate::share::mask_fingerprint) changes when a single pixel does,
//! and two backends (CPU and WebGPU, or two CPUs) may disagree on a pixel whose logit sits
//! within rounding of the threshold. So a link also records, per prompt, a *sketch* of the
//! mask at model resolution: the XOR of a 64-bit hash of every foreground pixel's index, and
//! the foreground count. The XOR of the link's sketch and a recomputed one is the XOR of the
//! hashes of exactly the pixels that differ. The reader searches its own borderline pixels
//! (those whose logit is within [`BORDERLINE_MARGIN`] of the threshold's) for a set of at most
//! [`MAX_BORDERLINE_FLIPS`] that explains it. Found: the masks agree "up to N borderline
//! pixels", and it knows which. Not found: the masks really differ (in more pixels, or in
//! pixels far from the threshold). A false "borderline" verdict needs a 64-bit hash collision.

use std::collections::HashMap;
use std::fmt;

use crate::segmenter::Logits;
use crate::share::mask_fingerprint;

/// A pixel is borderline when its logit lies within this of the threshold's logit.
pub const BORDERLINE_MARGIN: f32 = 0.01;
/// At most this many differing model pixels are looked for among the borderline ones.
pub const MAX_BORDERLINE_FLIPS: usize = 3;
/// Borderline pixels searched for one and two flips (closest to the threshold first) …
const MAX_CANDIDATES: usize = 1 << 16;
/// … and for three flips (pairs are enumerated: 2048² / 2 lookups at most).
const MAX_CANDIDATES_FOR_THREE: usize = 2048;
/// Model resolutions a link may declare (CLIPSeg 352, CRIS 416, BiomedCLIPSeg 224).
pub const MAX_MODEL_SIZE: u32 = 4096;

/// One prompt's mask as a link records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskCheck {
    /// [`mask_fingerprint`] of the mask at the image's size.
    pub fingerprint: String,
    /// Foreground pixels at the image's size.
    pub foreground: u64,
    /// The model's output side (the mask before resizing is `size`×`size`).
    pub size: u32,
    /// Foreground pixels at model resolution.
    pub model_foreground: u64,
    /// XOR of [`pixel_hash`] over the foreground pixels at model resolution.
    pub sketch: u64,
    /// Pixels at model resolution within the margin of the threshold, as the maker saw them.
    pub borderline: u64,
}

/// How a recomputed mask compares with the link's.
#[derive(Debug, Clone, PartialEq)]
pub enum Agreement {
    /// Bit for bit the same mask.
    Exact,
    /// The masks differ only in these model pixels, each within the margin of the threshold.
    Borderline {
        model_pixels: usize,
        image_pixels: u64,
        /// The largest |logit − threshold logit| among them.
        max_distance: f32,
    },
    /// A real difference: at least this many image pixels differ.
    Differs { image_pixels_at_least: u64 },
    /// Not comparable (another model resolution or image size).
    Incomparable(String),
}

impl Agreement {
    /// Exact or borderline.
    pub fn agrees(&self) -> bool {
        matches!(self, Agreement::Exact | Agreement::Borderline { .. })
    }
}

impl fmt::Display for Agreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Agreement::Exact => write!(f, "matches the link"),
            Agreement::Borderline {
                model_pixels,
                image_pixels,
                max_distance,
            } => write!(
                f,
                "matches the link up to {model_pixels} borderline pixel{} ({image_pixels} at the \
                 image's size, logits within {max_distance:.1e} of the threshold)",
                if *model_pixels == 1 { "" } else { "s" }
            ),
            Agreement::Differs {
                image_pixels_at_least,
            } => write!(
                f,
                "DIFFERS from the link (at least {image_pixels_at_least} pixels, not all near the threshold)"
            ),
            Agreement::Incomparable(why) => write!(f, "cannot be compared with the link: {why}"),
        }
    }
}

/// The threshold as a logit: `sigmoid(l) > t` ⇔ `l > logit(t)` (±∞ at 0 and 1).
fn threshold_logit(threshold: f32) -> f64 {
    let t = f64::from(threshold);
    (t / (1.0 - t)).ln()
}

/// A pixel index's 64-bit hash (splitmix64's finaliser: the same on every platform).
pub fn pixel_hash(index: usize) -> u64 {
    let mut z = (index as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// XOR of [`pixel_hash`] over a mask's foreground.
fn sketch_of(mask: &[u8]) -> u64 {
    mask.iter()
        .enumerate()
        .filter(|(_, m)| **m != 0)
        .fold(0, |x, (i, _)| x ^ pixel_hash(i))
}

impl MaskCheck {
    /// What a link records about `logits` thresholded at `threshold`, for a
    /// `width`×`height` image.
    pub fn of(logits: &Logits, threshold: f32, width: u32, height: u32) -> Self {
        let model_mask = logits.mask(threshold);
        let image_mask = logits.mask_at(threshold, width, height);
        let t = threshold_logit(threshold);
        MaskCheck {
            fingerprint: mask_fingerprint(&image_mask),
            foreground: image_mask.iter().filter(|&&m| m != 0).count() as u64,
            size: logits.size as u32,
            model_foreground: model_mask.iter().filter(|&&m| m != 0).count() as u64,
            sketch: sketch_of(&model_mask),
            borderline: logits
                .values
                .iter()
                .filter(|&&l| (f64::from(l) - t).abs() <= f64::from(BORDERLINE_MARGIN))
                .count() as u64,
        }
    }

    /// Compares recomputed `logits` (same image, threshold and prompt) with this record;
    /// `margin` bounds how far from the threshold a differing pixel may lie.
    pub fn compare(
        &self,
        logits: &Logits,
        threshold: f32,
        width: u32,
        height: u32,
        margin: f32,
    ) -> Agreement {
        let image_mask = logits.mask_at(threshold, width, height);
        if mask_fingerprint(&image_mask) == self.fingerprint {
            return Agreement::Exact;
        }
        let own_foreground = image_mask.iter().filter(|&&m| m != 0).count() as u64;
        let differs = Agreement::Differs {
            image_pixels_at_least: own_foreground.abs_diff(self.foreground).max(1),
        };
        if logits.size != self.size as usize {
            return Agreement::Incomparable(format!(
                "the model's output is {0}×{0} here, {1}×{1} in the link",
                logits.size, self.size
            ));
        }
        let model_mask = logits.mask(threshold);
        let own_model_foreground = model_mask.iter().filter(|&&m| m != 0).count() as u64;
        let delta = sketch_of(&model_mask) ^ self.sketch;
        let Some(flips) = explain(
            delta,
            self.model_foreground as i64 - own_model_foreground as i64,
            logits,
            &model_mask,
            threshold_logit(threshold),
            f64::from(margin),
        ) else {
            return differs;
        };
        if flips.is_empty() {
            // Same mask at model resolution, yet another fingerprint: the link's image size
            // differs from this one's.
            return Agreement::Incomparable(
                "the same mask at model resolution, resized to another image size".into(),
            );
        }
        let mut theirs = model_mask.clone();
        for &i in &flips {
            theirs[i] ^= 1;
        }
        let theirs = crate::preprocess::resize_nearest(
            &theirs,
            logits.size,
            logits.size,
            width as usize,
            height as usize,
        );
        if mask_fingerprint(&theirs) != self.fingerprint {
            return differs;
        }
        let t = threshold_logit(threshold);
        Agreement::Borderline {
            model_pixels: flips.len(),
            image_pixels: theirs
                .iter()
                .zip(&image_mask)
                .filter(|(a, b)| a != b)
                .count() as u64,
            max_distance: flips
                .iter()
                .map(|&i| (f64::from(logits.values[i]) - t).abs() as f32)
                .fold(0.0, f32::max),
        }
    }
}

/// The set of at most [`MAX_BORDERLINE_FLIPS`] borderline pixels whose hashes XOR to `delta`
/// and whose flips change the foreground count by `count_change` (link's minus ours).
fn explain(
    delta: u64,
    count_change: i64,
    logits: &Logits,
    mask: &[u8],
    threshold_logit: f64,
    margin: f64,
) -> Option<Vec<usize>> {
    if delta == 0 {
        return (count_change == 0).then(Vec::new);
    }
    if count_change.unsigned_abs() as usize > MAX_BORDERLINE_FLIPS {
        return None;
    }
    let mut candidates: Vec<(f64, usize)> = logits
        .values
        .iter()
        .enumerate()
        .map(|(i, &l)| ((f64::from(l) - threshold_logit).abs(), i))
        .filter(|&(d, _)| d <= margin)
        .collect();
    candidates.sort_by(|a, b| a.0.total_cmp(&b.0));
    candidates.truncate(MAX_CANDIDATES);
    let candidates: Vec<usize> = candidates.into_iter().map(|(_, i)| i).collect();
    // Flipping a foreground pixel of ours removes one from the link's count, a background
    // pixel adds one.
    let change = |set: &[usize]| -> i64 { set.iter().map(|&i| 1 - 2 * i64::from(mask[i])).sum() };
    let by_hash: HashMap<u64, usize> = candidates.iter().map(|&i| (pixel_hash(i), i)).collect();
    let fits = |set: &[usize]| change(set) == count_change;
    if let Some(&i) = by_hash.get(&delta)
        && fits(&[i])
    {
        return Some(vec![i]);
    }
    for &a in &candidates {
        if let Some(&b) = by_hash.get(&(delta ^ pixel_hash(a)))
            && a < b
            && fits(&[a, b])
        {
            return Some(vec![a, b]);
        }
    }
    let few = &candidates[..candidates.len().min(MAX_CANDIDATES_FOR_THREE)];
    for (k, &a) in few.iter().enumerate() {
        for &b in &few[k + 1..] {
            let rest = delta ^ pixel_hash(a) ^ pixel_hash(b);
            if let Some(&c) = by_hash.get(&rest)
                && c != a
                && c != b
                && fits(&[a, b, c])
            {
                return Some(vec![a, b, c]);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Smooth logits over a 32×32 output: a disc, with a gentle ramp through the threshold.
    fn disc() -> Logits {
        let n = 32;
        let values = (0..n * n)
            .map(|i| {
                let (x, y) = ((i % n) as f32 - 15.5, (i / n) as f32 - 15.5);
                (100.0 - (x * x + y * y)) / 20.0
            })
            .collect();
        Logits { size: n, values }
    }

    /// Moves pixel `i`'s logit to just across the threshold (0 at t = 0.5).
    fn nudge(logits: &mut Logits, i: usize) {
        let l = &mut logits.values[i];
        *l = if *l > 0.0 { -0.004 } else { 0.004 };
    }

    #[test]
    fn the_same_logits_match_exactly() {
        let l = disc();
        let check = MaskCheck::of(&l, 0.5, 50, 40);
        assert_eq!(
            check.compare(&l, 0.5, 50, 40, BORDERLINE_MARGIN),
            Agreement::Exact
        );
        assert_eq!(check.fingerprint, mask_fingerprint(&l.mask_at(0.5, 50, 40)));
        assert_eq!(check.size, 32);
        assert!(check.model_foreground > 0 && check.model_foreground < 32 * 32);
    }

    #[test]
    fn up_to_three_pixels_across_the_threshold_are_found_and_counted() {
        let original = disc();
        // Pixels on the disc's edge (logit near 0) in both directions.
        let edge: Vec<usize> = (0..original.values.len())
            .filter(|&i| original.values[i].abs() < 0.3)
            .collect();
        assert!(edge.len() >= 6, "{}", edge.len());
        for flips in 1..=MAX_BORDERLINE_FLIPS {
            // The maker's logits sat just across the threshold at `flips` edge pixels.
            let mut maker = original.clone();
            let mut reader = original.clone();
            for &i in edge.iter().step_by(2).take(flips) {
                nudge(&mut maker, i);
                reader.values[i] = -maker.values[i];
            }
            let check = MaskCheck::of(&maker, 0.5, 64, 64);
            match check.compare(&reader, 0.5, 64, 64, BORDERLINE_MARGIN) {
                Agreement::Borderline {
                    model_pixels,
                    image_pixels,
                    max_distance,
                } => {
                    assert_eq!(model_pixels, flips);
                    // 64 / 32: each model pixel is 2×2 image pixels.
                    assert_eq!(image_pixels, 4 * flips as u64);
                    assert!((max_distance - 0.004).abs() < 1e-6, "{max_distance}");
                }
                other => panic!("{flips} flips: {other:?}"),
            }
        }
    }

    #[test]
    fn real_differences_are_not_called_borderline() {
        let original = disc();
        let check = MaskCheck::of(&original, 0.5, 32, 32);
        // One pixel far from the threshold (the disc's centre) flipped.
        let mut centre = original.clone();
        centre.values[16 * 32 + 16] = -3.0;
        assert_eq!(
            check.compare(&centre, 0.5, 32, 32, BORDERLINE_MARGIN),
            Agreement::Differs {
                image_pixels_at_least: 1
            }
        );
        // Four borderline pixels: more than the search looks for.
        let mut reader = original.clone();
        let edge: Vec<usize> = (0..original.values.len())
            .filter(|&i| original.values[i].abs() < 0.3)
            .collect();
        let mut maker = original.clone();
        for &i in edge.iter().step_by(2).take(4) {
            nudge(&mut maker, i);
            reader.values[i] = -maker.values[i];
        }
        let check = MaskCheck::of(&maker, 0.5, 32, 32);
        assert!(
            !check
                .compare(&reader, 0.5, 32, 32, BORDERLINE_MARGIN)
                .agrees()
        );
        // A borderline flip beyond a tighter margin is a difference too.
        let mut maker = original.clone();
        let mut reader = original.clone();
        nudge(&mut maker, edge[0]);
        reader.values[edge[0]] = -maker.values[edge[0]];
        let check = MaskCheck::of(&maker, 0.5, 32, 32);
        assert!(check.compare(&reader, 0.5, 32, 32, 0.01).agrees());
        assert!(!check.compare(&reader, 0.5, 32, 32, 0.001).agrees());
    }

    #[test]
    fn other_sizes_and_extreme_thresholds_are_handled() {
        let l = disc();
        let check = MaskCheck::of(&l, 0.5, 32, 32);
        let other = Logits {
            size: 16,
            values: vec![1.0; 256],
        };
        assert!(matches!(
            check.compare(&other, 0.5, 32, 32, BORDERLINE_MARGIN),
            Agreement::Incomparable(_)
        ));
        // Thresholds 0 and 1: the threshold logit is ±∞, nothing is borderline.
        for t in [0.0, 1.0] {
            let c = MaskCheck::of(&l, t, 32, 32);
            assert_eq!(c.borderline, 0);
            assert_eq!(
                c.compare(&l, t, 32, 32, BORDERLINE_MARGIN),
                Agreement::Exact
            );
        }
    }
}
