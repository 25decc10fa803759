//! Which 2-D picture of a clinical file: a DICOM frame or a NIfTI slice in one plane. Not
//! behind the `clinical` feature, so every build reads share links that name one.

/// The three viewing planes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    Axial,
    Coronal,
    Sagittal,
}

impl Plane {
    pub fn name(self) -> &'static str {
        match self {
            Plane::Axial => "axial",
            Plane::Coronal => "coronal",
            Plane::Sagittal => "sagittal",
        }
    }
}

impl std::str::FromStr for Plane {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "axial" => Ok(Plane::Axial),
            "coronal" => Ok(Plane::Coronal),
            "sagittal" => Ok(Plane::Sagittal),
            _ => Err(format!("`{s}`: the plane is axial, coronal or sagittal")),
        }
    }
}

/// Which picture of a clinical file: a DICOM frame (`plane` is `None`) or a NIfTI slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub plane: Option<Plane>,
    pub index: usize,
}

impl std::fmt::Display for Slice {
    /// `axial:42` for a NIfTI slice, `3` for a DICOM frame (what [`Slice::from_str`] reads).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.plane {
            Some(plane) => write!(f, "{}:{}", plane.name(), self.index),
            None => write!(f, "{}", self.index),
        }
    }
}

impl std::str::FromStr for Slice {
    type Err = String;

    /// `PLANE:K` (a NIfTI slice) or `K` (a DICOM frame).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (plane, index) = match s.split_once(':') {
            Some((plane, k)) => (Some(plane.parse::<Plane>()?), k),
            None => (None, s),
        };
        let index = index
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("`{s}`: expected PLANE:K (a NIfTI slice) or K (a DICOM frame)"))?;
        Ok(Slice { plane, index })
    }
}
