//! Greyscale medical values (CT Hounsfield units, MR intensities, …) to the 8-bit grey the
//! models take, through a window: DICOM's linear VOI function (PS3.3 C.11.2.1.2.1).

use crate::error::{Error, Result};

/// How grey values become 0–255.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Window {
    /// The file's own window (DICOM's first Window Center/Width), else [`Window::MinMax`].
    File,
    /// Center and width, in the values' units (Hounsfield units for CT).
    Explicit { center: f64, width: f64 },
    /// The image's minimum to maximum, linearly.
    MinMax,
}

/// Common CT windows (center, width) in Hounsfield units.
pub const PRESETS: [(&str, f64, f64); 5] = [
    ("lung", -600.0, 1500.0),
    ("mediastinum", 50.0, 350.0),
    ("bone", 400.0, 1800.0),
    ("brain", 40.0, 80.0),
    ("abdomen", 40.0, 400.0),
];

impl std::str::FromStr for Window {
    type Err = String;

    /// `file`, `minmax`, a preset name, or `CENTER,WIDTH`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "file" => return Ok(Window::File),
            "minmax" => return Ok(Window::MinMax),
            _ => {}
        }
        if let Some(&(_, center, width)) = PRESETS.iter().find(|p| p.0 == s) {
            return Ok(Window::Explicit { center, width });
        }
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if let [c, w] = parts[..] {
            let (Ok(center), Ok(width)) = (c.parse::<f64>(), w.parse::<f64>()) else {
                return Err(format!("`{s}`: CENTER,WIDTH must be numbers"));
            };
            if !center.is_finite() || !width.is_finite() || width < 1.0 {
                return Err(format!("`{s}`: the width must be at least 1"));
            }
            return Ok(Window::Explicit { center, width });
        }
        let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
        Err(format!(
            "`{s}`: expected CENTER,WIDTH, file, minmax or a preset ({})",
            names.join(", ")
        ))
    }
}

impl std::fmt::Display for Window {
    /// What [`Window::from_str`] reads back: `file`, `minmax` or `CENTER,WIDTH` (shortest
    /// round-tripping decimals).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Window::File => f.write_str("file"),
            Window::MinMax => f.write_str("minmax"),
            Window::Explicit { center, width } => write!(f, "{center},{width}"),
        }
    }
}

/// The window spanning the finite values exactly (the minimum at 0, the maximum at 255), or
/// `None` when there is none.
pub fn spanning(values: &[f64]) -> Option<Window> {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    // A width of hi − lo + 1 puts lo at 0 and hi at 255.
    lo.is_finite().then(|| Window::Explicit {
        center: (lo + hi + 1.0) / 2.0,
        width: hi - lo + 1.0,
    })
}

/// The 8-bit grey of each value: DICOM's linear VOI function with `center`/`width`
/// (`≤ c − 0.5 − (w − 1)/2` → 0, `> c − 0.5 + (w − 1)/2` → 255, else
/// `((x − (c − 0.5)) / (w − 1) + 0.5) · 255`), rounded to the nearest integer; `invert`
/// (MONOCHROME1: low values bright) flips the result. `window` `File` takes `file_window`.
pub fn to_grey(
    values: &[f64],
    window: Window,
    file_window: Option<(f64, f64)>,
    invert: bool,
) -> Result<Vec<u8>> {
    let (center, width) = match (window, file_window) {
        (Window::Explicit { center, width }, _) => (center, width),
        (Window::File, Some((c, w))) if w >= 1.0 && c.is_finite() && w.is_finite() => (c, w),
        _ => match spanning(values) {
            Some(Window::Explicit { center, width }) => (center, width),
            _ => return Err(Error::Image("the image has no finite values".into())),
        },
    };
    let low = center - 0.5 - (width - 1.0) / 2.0;
    let high = center - 0.5 + (width - 1.0) / 2.0;
    Ok(values
        .iter()
        .map(|&x| {
            let y = if x <= low || x.is_nan() {
                0.0
            } else if x > high {
                255.0
            } else {
                // Here width > 1: with width 1, low = high and every value is on a side.
                ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
            };
            let g = y.round().clamp(0.0, 255.0) as u8;
            if invert { 255 - g } else { g }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_voi_function_at_its_edges() {
        // Window 40/400 (abdomen): [-160, 240) spans 0..255.
        let w = Window::Explicit {
            center: 40.0,
            width: 400.0,
        };
        let g = to_grey(
            &[-1000.0, -160.0, -159.5, 39.5, 240.0, 3000.0],
            w,
            None,
            false,
        )
        .unwrap();
        assert_eq!(g, [0, 0, 0, 128, 255, 255]);
        // MONOCHROME1 inverts.
        assert_eq!(to_grey(&[-1000.0], w, None, true).unwrap(), [255]);
        // The file's window, else min–max.
        assert_eq!(
            to_grey(&[0.0, 10.0], Window::File, Some((5.5, 11.0)), false).unwrap(),
            [0, 255]
        );
        assert_eq!(
            to_grey(&[2.0, 4.0, 6.0], Window::File, None, false).unwrap(),
            [0, 128, 255]
        );
        // A constant image is all at the window's bottom.
        assert_eq!(
            to_grey(&[7.0, 7.0], Window::MinMax, None, false).unwrap(),
            [0, 0]
        );
    }

    #[test]
    fn windows_parse() {
        assert_eq!(
            "lung".parse::<Window>(),
            Ok(Window::Explicit {
                center: -600.0,
                width: 1500.0
            })
        );
        assert_eq!(
            "40, 400".parse::<Window>(),
            Ok(Window::Explicit {
                center: 40.0,
                width: 400.0
            })
        );
        assert!("40,0".parse::<Window>().unwrap_err().contains("at least 1"));
        assert!("liver".parse::<Window>().unwrap_err().contains("preset"));
    }
}
