//! DICOM files and NIfTI volumes as the 2-D images the models take: which picture of the
//! file (a DICOM frame, a NIfTI slice in one plane), through which window, and a label
//! file's mask for the same picture. The CLI, share links and the page all go through
//! here, so a slice and window give the same pixels everywhere.

use image::RgbImage;

use crate::dicom::{self, DicomFile};
use crate::error::{Error, Result};
use crate::nifti::{self, Plane, Volume};
use crate::window::{self, Window};

pub use crate::slice::Slice;

/// The two kinds of clinical file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dicom,
    Nifti,
}

/// What a file's first bytes say it is: DICOM (`DICM` after the preamble), NIfTI-1 (its
/// header size and magic) or gzip (taken for a `.nii.gz`: no other input is gzipped).
pub fn sniff(bytes: &[u8]) -> Option<Kind> {
    if dicom::is_dicom(bytes) {
        return Some(Kind::Dicom);
    }
    if bytes.starts_with(&[0x1f, 0x8b]) {
        return Some(Kind::Nifti);
    }
    let nifti_header = bytes.len() >= 348
        && (bytes[0..4] == 348i32.to_le_bytes() || bytes[0..4] == 348i32.to_be_bytes())
        && &bytes[344..348] == b"n+1\0";
    nifti_header.then_some(Kind::Nifti)
}

/// A parsed DICOM file or NIfTI volume.
pub enum ClinicalImage {
    Dicom(DicomFile),
    Nifti {
        volume: Volume,
        /// The window spanning the whole volume's values (computed once), so every slice
        /// of a volume is windowed alike under `file` and `minmax`.
        spanning: Option<Window>,
    },
}

impl ClinicalImage {
    /// Parses a DICOM file or a NIfTI volume (at most `max_voxels` voxels).
    pub fn read(bytes: &[u8], max_voxels: usize) -> Result<Self> {
        match sniff(bytes) {
            Some(Kind::Dicom) => Ok(Self::Dicom(DicomFile::read(bytes)?)),
            Some(Kind::Nifti) => {
                let volume = nifti::read_within(bytes, max_voxels)?;
                Ok(Self::Nifti {
                    spanning: window::spanning(&volume.values),
                    volume,
                })
            }
            None => Err(Error::Image(
                "neither a DICOM file nor a NIfTI-1 volume".into(),
            )),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Dicom(_) => Kind::Dicom,
            Self::Nifti { .. } => Kind::Nifti,
        }
    }

    pub fn dicom(&self) -> Option<&DicomFile> {
        match self {
            Self::Dicom(file) => Some(file),
            Self::Nifti { .. } => None,
        }
    }

    pub fn nifti(&self) -> Option<&Volume> {
        match self {
            Self::Nifti { volume, .. } => Some(volume),
            Self::Dicom(_) => None,
        }
    }

    /// Frames of a DICOM file; slices of a NIfTI volume in `plane` (axial when `None`).
    pub fn count(&self, plane: Option<Plane>) -> usize {
        match self {
            Self::Dicom(file) => file.frames as usize,
            Self::Nifti { volume, .. } => volume.slices(plane.unwrap_or(Plane::Axial)),
        }
    }

    /// The picture shown first: a DICOM file's first frame, a volume's middle axial slice.
    pub fn default_slice(&self) -> Slice {
        match self {
            Self::Dicom(_) => Slice {
                plane: None,
                index: 0,
            },
            Self::Nifti { volume, .. } => Slice {
                plane: Some(Plane::Axial),
                index: volume.slices(Plane::Axial) / 2,
            },
        }
    }

    /// Whether a window applies (greyscale), or the pixels are colour already.
    pub fn is_greyscale(&self) -> bool {
        match self {
            Self::Dicom(file) => file.samples_per_pixel == 1,
            Self::Nifti { .. } => true,
        }
    }

    /// The file's own window (DICOM's first Window Center/Width), if any.
    pub fn file_window(&self) -> Option<(f64, f64)> {
        self.dicom().and_then(|f| f.window)
    }

    /// Checks that `slice` names a picture of this file (a frame for DICOM, a plane and
    /// slice for NIfTI).
    pub fn check(&self, slice: Slice) -> Result<()> {
        let (what, count) = match (self, slice.plane) {
            (Self::Dicom(_), Some(_)) => {
                return Err(Error::Input(format!(
                    "slice {slice}: a DICOM file has frames, not planes (give the frame number)"
                )));
            }
            (Self::Nifti { .. }, None) => {
                return Err(Error::Input(format!(
                    "slice {slice}: a NIfTI volume needs a plane (axial:K, coronal:K or sagittal:K)"
                )));
            }
            (Self::Dicom(_), None) => ("frames".to_string(), self.count(None)),
            (Self::Nifti { .. }, Some(plane)) => {
                (format!("{} slices", plane.name()), self.count(Some(plane)))
            }
        };
        if slice.index >= count {
            return Err(Error::Input(format!(
                "slice {slice}: the file has {count} {what} (0-{})",
                count.saturating_sub(1)
            )));
        }
        Ok(())
    }

    /// Width and height of a picture.
    pub fn size(&self, slice: Slice) -> (u32, u32) {
        match self {
            Self::Dicom(file) => (file.columns, file.rows),
            Self::Nifti { volume, .. } => {
                let (w, h) = volume.slice_size(slice.plane.unwrap_or(Plane::Axial));
                (w as u32, h as u32)
            }
        }
    }

    /// A picture as the model's 8-bit RGB input. A volume's `file` and `minmax` windows
    /// span the whole volume's values, so neighbouring slices are windowed alike; a DICOM
    /// frame's are its own (see [`crate::dicom`]).
    pub fn render(&self, slice: Slice, window: Window) -> Result<RgbImage> {
        self.check(slice)?;
        match self {
            Self::Dicom(file) => file.frame_rgb(slice.index as u32, window),
            Self::Nifti { volume, spanning } => {
                let window = match window {
                    Window::File | Window::MinMax => spanning.ok_or_else(|| {
                        Error::Image("NIfTI: the volume has no finite values".into())
                    })?,
                    w => w,
                };
                let plane = slice.plane.expect("checked");
                let (w, h) = volume.slice_size(plane);
                crate::preprocess::check_pixels(w as u32, h as u32)?;
                let grey = window::to_grey(
                    &volume.slice_values(plane, slice.index),
                    window,
                    None,
                    false,
                )?;
                let rgb = grey.into_iter().flat_map(|g| [g, g, g]).collect();
                RgbImage::from_raw(w as u32, h as u32, rgb)
                    .ok_or_else(|| Error::Image("slice size".into()))
            }
        }
    }

    /// A label file's mask for a picture: foreground where the value is above 0 (label
    /// images store 0 for background and a label number elsewhere).
    pub fn label_mask(&self, slice: Slice) -> Result<(u32, u32, Vec<u8>)> {
        self.check(slice)?;
        if !self.is_greyscale() {
            return Err(Error::Image(
                "a mask must be greyscale (one sample per pixel)".into(),
            ));
        }
        let values = match self {
            Self::Dicom(file) => file.frame_values(slice.index as u32)?,
            Self::Nifti { volume, .. } => {
                volume.slice_values(slice.plane.expect("checked"), slice.index)
            }
        };
        let (w, h) = self.size(slice);
        Ok((w, h, values.iter().map(|&v| u8::from(v > 0.0)).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_and_windows_round_trip_as_text() {
        for s in ["axial:42", "sagittal:0", "3"] {
            assert_eq!(s.parse::<Slice>().unwrap().to_string(), s);
        }
        assert!("axial".parse::<Slice>().is_err());
        assert!("oblique:3".parse::<Slice>().is_err());
        assert!("-1".parse::<Slice>().is_err());
        for w in [
            Window::File,
            Window::MinMax,
            Window::Explicit {
                center: -600.0,
                width: 1500.0,
            },
            Window::Explicit {
                center: 0.1 + 0.2,
                width: 1.0 / 3.0 + 1.0,
            },
        ] {
            assert_eq!(w.to_string().parse::<Window>(), Ok(w));
        }
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n"), None);
        assert_eq!(sniff(&[0x1f, 0x8b, 8, 0]), Some(Kind::Nifti));
        let mut dicom = vec![0u8; 132];
        dicom[128..].copy_from_slice(b"DICM");
        assert_eq!(sniff(&dicom), Some(Kind::Dicom));
        let mut nifti = vec![0u8; 352];
        nifti[0..4].copy_from_slice(&348i32.to_le_bytes());
        nifti[344..348].copy_from_slice(b"n+1\0");
        assert_eq!(sniff(&nifti), Some(Kind::Nifti));
    }
}
