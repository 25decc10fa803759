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

/// Boundary metrics of one prediction/truth pair, in pixels, with MONAI's conventions
/// (`compute_hausdorff_distance(percentile=95)`, `compute_surface_dice`): a boundary pixel is
/// a foreground pixel with a 4-neighbour in the background or outside the image (MONAI's
/// `binary_erosion ^ mask` on a zero-padded crop); distances are exact Euclidean distances
/// between boundary pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Boundary {
    /// 95th percentile (linear interpolation) of the symmetric boundary distances: the larger
    /// of the two directed 95th percentiles. NaN when either mask is empty (as MONAI).
    pub hd95: f64,
    /// The maximum boundary distance (plain Hausdorff). ∞ when one mask is empty, NaN when both are.
    pub hd: f64,
    /// Normalised surface Dice at `tolerance` pixels: the share of both boundaries lying
    /// within the tolerance of the other. 0 when exactly one mask is empty, NaN when both are.
    pub nsd: f64,
}

impl Boundary {
    pub fn of(
        pred: &[u8],
        truth: &[u8],
        width: usize,
        height: usize,
        tolerance: f64,
    ) -> Result<Self> {
        if pred.len() != width * height || truth.len() != width * height {
            return Err(Error::Input(format!(
                "masks of {} and {} pixels do not match a {width}×{height} image",
                pred.len(),
                truth.len()
            )));
        }
        let pred_edges = boundary_pixels(pred, width, height);
        let truth_edges = boundary_pixels(truth, width, height);
        let nan = f64::NAN;
        match (pred_edges.is_empty(), truth_edges.is_empty()) {
            (true, true) => {
                return Ok(Self {
                    hd95: nan,
                    hd: nan,
                    nsd: nan,
                });
            }
            (true, false) | (false, true) => {
                // MONAI: every distance to an empty boundary is infinite; its 95th percentile
                // (interpolating ∞ − ∞) is NaN, the maximum is ∞.
                return Ok(Self {
                    hd95: nan,
                    hd: f64::INFINITY,
                    nsd: 0.0,
                });
            }
            (false, false) => {}
        }
        let pred_to_truth = nearest_distances(&pred_edges, &truth_edges);
        let truth_to_pred = nearest_distances(&truth_edges, &pred_edges);
        let within = |d: &[f64]| d.iter().filter(|&&v| v <= tolerance).count();
        let nsd = (within(&pred_to_truth) + within(&truth_to_pred)) as f64
            / (pred_to_truth.len() + truth_to_pred.len()) as f64;
        let hd95 =
            percentile(pred_to_truth.clone(), 95.0).max(percentile(truth_to_pred.clone(), 95.0));
        let hd = percentile(pred_to_truth, 100.0).max(percentile(truth_to_pred, 100.0));
        Ok(Self { hd95, hd, nsd })
    }
}

/// Dice, IoU, HD95 and NSD of one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub dice: f64,
    pub iou: f64,
    pub hd95: f64,
    pub nsd: f64,
}

impl Scores {
    pub fn of(
        pred: &[u8],
        truth: &[u8],
        width: usize,
        height: usize,
        nsd_tolerance: f64,
    ) -> Result<Self> {
        let overlap = Overlap::of(pred, truth)?;
        let boundary = Boundary::of(pred, truth, width, height, nsd_tolerance)?;
        Ok(Self {
            dice: overlap.dice(),
            iou: overlap.iou(),
            hd95: boundary.hd95,
            nsd: boundary.nsd,
        })
    }
}

/// (x, y) of every boundary pixel.
fn boundary_pixels(mask: &[u8], width: usize, height: usize) -> Vec<(usize, usize)> {
    let on = |x: usize, y: usize| mask[y * width + x] != 0;
    let mut edges = Vec::new();
    for y in 0..height {
        for x in 0..width {
            if !on(x, y) {
                continue;
            }
            let interior = x > 0
                && y > 0
                && x + 1 < width
                && y + 1 < height
                && on(x - 1, y)
                && on(x + 1, y)
                && on(x, y - 1)
                && on(x, y + 1);
            if !interior {
                edges.push((x, y));
            }
        }
    }
    edges
}

/// For every point of `from`, the Euclidean distance to the nearest point of `to` (not
/// empty): an exact distance transform of `to` over the bounding box of both sets.
fn nearest_distances(from: &[(usize, usize)], to: &[(usize, usize)]) -> Vec<f64> {
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for &(x, y) in from.iter().chain(to) {
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
    let mut grid = vec![f64::INFINITY; w * h];
    for &(x, y) in to {
        grid[(y - y0) * w + (x - x0)] = 0.0;
    }
    squared_distance_transform(&mut grid, w, h);
    from.iter()
        .map(|&(x, y)| grid[(y - y0) * w + (x - x0)].sqrt())
        .collect()
}

/// In place: each cell becomes the squared Euclidean distance to the nearest zero cell
/// (Felzenszwalb & Huttenlocher's separable lower-envelope algorithm: columns, then rows).
fn squared_distance_transform(grid: &mut [f64], width: usize, height: usize) {
    let longest = width.max(height);
    let mut line = vec![0.0; longest];
    let mut out = vec![0.0; longest];
    let mut hull = vec![0usize; longest];
    let mut bounds = vec![0.0; longest + 1];
    for x in 0..width {
        for y in 0..height {
            line[y] = grid[y * width + x];
        }
        distance_1d(&line[..height], &mut out[..height], &mut hull, &mut bounds);
        for y in 0..height {
            grid[y * width + x] = out[y];
        }
    }
    for y in 0..height {
        let row = &mut grid[y * width..(y + 1) * width];
        line[..width].copy_from_slice(row);
        distance_1d(&line[..width], &mut out[..width], &mut hull, &mut bounds);
        row.copy_from_slice(&out[..width]);
    }
}

/// One-dimensional squared distance transform of the sampled function `f` (∞ = no feature).
fn distance_1d(f: &[f64], out: &mut [f64], hull: &mut [usize], bounds: &mut [f64]) {
    let n = f.len();
    // Parabolas with an infinite apex are left out of the lower envelope.
    let mut k: isize = -1;
    for q in 0..n {
        if f[q].is_infinite() {
            continue;
        }
        loop {
            if k < 0 {
                k = 0;
                hull[0] = q;
                bounds[0] = f64::NEG_INFINITY;
                bounds[1] = f64::INFINITY;
                break;
            }
            let p = hull[k as usize];
            let s =
                ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q as f64 - p as f64));
            if s <= bounds[k as usize] {
                k -= 1;
                continue;
            }
            k += 1;
            hull[k as usize] = q;
            bounds[k as usize] = s;
            bounds[k as usize + 1] = f64::INFINITY;
            break;
        }
    }
    if k < 0 {
        out.fill(f64::INFINITY);
        return;
    }
    let mut j = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while bounds[j + 1] < q as f64 {
            j += 1;
        }
        let p = hull[j];
        let d = q as f64 - p as f64;
        *o = d * d + f[p];
    }
}

/// The `p`-th percentile (0–100) with linear interpolation between order statistics (numpy's
/// and torch's default); NaN for no values.
pub fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = p / 100.0 * (values.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    values[lo] + (values[hi] - values[lo]) * (rank - lo as f64)
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
    fn boundary_metrics_by_hand() {
        // Two 2×2 squares, the second shifted right by one pixel, in a 5×3 image: every
        // pixel of a 2×2 square is on its boundary.
        #[rustfmt::skip]
        let p = [1, 1, 0, 0, 0,
                 1, 1, 0, 0, 0,
                 0, 0, 0, 0, 0];
        #[rustfmt::skip]
        let g = [0, 1, 1, 0, 0,
                 0, 1, 1, 0, 0,
                 0, 0, 0, 0, 0];
        let b = Boundary::of(&p, &g, 5, 3, 0.5).unwrap();
        // Distances pred→truth: 1,0,1,0; truth→pred: 0,1,0,1. 95th percentile of
        // [0,0,1,1] = 1; two of four within 0.5 on each side.
        assert_eq!((b.hd95, b.hd, b.nsd), (1.0, 1.0, 0.5));
        assert_eq!(Boundary::of(&p, &g, 5, 3, 1.0).unwrap().nsd, 1.0);
        let same = Boundary::of(&p, &p, 5, 3, 0.0).unwrap();
        assert_eq!((same.hd95, same.nsd), (0.0, 1.0));
        let empty = [0u8; 15];
        let one_empty = Boundary::of(&p, &empty, 5, 3, 1.0).unwrap();
        assert!(one_empty.hd95.is_nan() && one_empty.hd.is_infinite() && one_empty.nsd == 0.0);
        let both = Boundary::of(&empty, &empty, 5, 3, 1.0).unwrap();
        assert!(both.hd95.is_nan() && both.nsd.is_nan());
        assert!(Boundary::of(&p, &g, 4, 3, 1.0).is_err());
    }

    #[test]
    fn distance_transform_is_exact() {
        // Against brute force on a scattered point set.
        let (w, h) = (23, 17);
        let points: Vec<(usize, usize)> =
            (0..9).map(|i| ((i * 7 + 3) % w, (i * 5 + 1) % h)).collect();
        let all: Vec<(usize, usize)> = (0..h).flat_map(|y| (0..w).map(move |x| (x, y))).collect();
        let fast = nearest_distances(&all, &points);
        for (&(x, y), d) in all.iter().zip(fast) {
            let brute = points
                .iter()
                .map(|&(px, py)| {
                    ((x as f64 - px as f64).powi(2) + (y as f64 - py as f64).powi(2)).sqrt()
                })
                .fold(f64::INFINITY, f64::min);
            assert!((d - brute).abs() < 1e-12, "({x},{y}): {d} vs {brute}");
        }
    }

    #[test]
    fn percentiles_interpolate_linearly() {
        assert_eq!(percentile(vec![4.0, 1.0, 3.0, 2.0], 50.0), 2.5);
        assert!((percentile((0..=10).map(f64::from).collect(), 95.0) - 9.5).abs() < 1e-12);
        assert!(percentile(Vec::new(), 95.0).is_nan());
    }

    #[test]
    fn masks_binarise_above_127() {
        let img = image::GrayImage::from_raw(4, 1, vec![0, 127, 128, 255]).unwrap();
        let (w, h, m) = binarize_mask(&image::DynamicImage::ImageLuma8(img));
        assert_eq!((w, h, m), (4, 1, vec![0, 0, 1, 1]));
    }
}
