//! NIfTI-1 volumes (`.nii`, `.nii.gz`): greyscale voxels, slices in the patient's
//! orientation, and label volumes written back over the input's grid.
//!
//! Values are the stored ones × `scl_slope` + `scl_inter` (in f64, as nibabel's
//! `get_fdata`; a slope of 0 means unscaled). Orientation comes from the affine (the sform
//! when its code is set, else the qform, else the voxel sizes): each voxel axis is matched
//! to the nearest patient axis (nibabel's closest canonical, RAS+). Slices are shown as
//! radiology viewers show them: axial with anterior at the top and the patient's right on
//! the image's left; coronal with superior at the top and the right on the left; sagittal
//! with superior at the top and anterior on the left.

use std::io::{Read, Write};

use crate::error::{Error, Result};

/// The most voxels a volume may have (a 512 × 512 × 1024 CT; its f64 values take 2 GiB).
pub const MAX_VOXELS: usize = 256 << 20;

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Image(format!("NIfTI: {what}"))
}

pub use crate::slice::Plane;

/// A NIfTI-1 volume in memory.
pub struct Volume {
    /// The file's 348-byte header, as stored (for writing label volumes over the same grid).
    header: Vec<u8>,
    big_endian: bool,
    /// Voxels along each axis (x fastest in `values`).
    pub dims: [usize; 3],
    pub values: Vec<f64>,
    /// Voxel index → patient (RAS) millimetres, row-major 3 × 4.
    pub affine: [[f64; 4]; 3],
    /// For each voxel axis: the patient axis it runs along (0 R, 1 A, 2 S) and whether it
    /// runs towards R, A or S (+1) or away (−1).
    orientation: [(usize, i8); 3],
}

/// Reads a `.nii` or `.nii.gz` (gzip is detected from its magic bytes). A compressed file is
/// inflated only as far as its header says the volume reaches, so a small file claiming a
/// huge or endless volume costs no more than the header allows.
pub fn read(bytes: &[u8]) -> Result<Volume> {
    read_within(bytes, MAX_VOXELS)
}

/// [`read`] with a lower cap on the voxels (the page's memory is tighter than the CLI's).
pub fn read_within(bytes: &[u8], max_voxels: usize) -> Result<Volume> {
    let max_voxels = max_voxels.min(MAX_VOXELS);
    let raw;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut decoder = flate2::read::MultiGzDecoder::new(bytes);
        let mut out = vec![0u8; 348];
        decoder
            .read_exact(&mut out)
            .map_err(|e| bad(format!("decompressing the header: {e}")))?;
        let declared = declared_size(&out, max_voxels)?;
        decoder
            .take((declared - 348) as u64)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("decompressing: {e}")))?;
        raw = out;
        &raw[..]
    } else {
        bytes
    };
    if bytes.len() < 348 {
        return Err(bad("shorter than a NIfTI-1 header"));
    }
    let big_endian = match (
        i32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")),
        i32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes")),
    ) {
        (348, _) => false,
        (_, 348) => true,
        (540, _) | (_, 540) => return Err(bad("NIfTI-2 files are not supported")),
        _ => return Err(bad("not a NIfTI-1 file (sizeof_hdr is not 348)")),
    };
    let h = Header {
        bytes: &bytes[..348],
        big_endian,
    };
    if &bytes[344..348] != b"n+1\0" {
        return Err(bad(
            "not a single-file NIfTI-1 (.nii) volume (magic is not n+1; .hdr/.img pairs are not supported)",
        ));
    }
    let ndim = h.i16(40);
    if !(2..=7).contains(&ndim) {
        return Err(bad(format!("{ndim} dimensions")));
    }
    let dim = |i: usize| {
        if (i as i16) <= ndim {
            h.i16(40 + 2 * i)
        } else {
            1
        }
    };
    let dims = [dim(1), dim(2), dim(3)];
    if dims.iter().any(|&d| d < 1) {
        return Err(bad(format!("dimensions {dims:?}")));
    }
    let dims = dims.map(|d| d as usize);
    if (4..=7).any(|i| dim(i) > 1) {
        return Err(bad(
            "a 4-D (or higher) volume: vlsm reads 3-D volumes; extract one with fslroi or nibabel",
        ));
    }
    let voxels = dims[0] * dims[1] * dims[2];
    if voxels > max_voxels {
        return Err(bad(format!("{voxels} voxels (at most {max_voxels})")));
    }
    let (size, kind) = match h.i16(70) {
        2 => (1, Kind::U8),
        4 => (2, Kind::I16),
        8 => (4, Kind::I32),
        16 => (4, Kind::F32),
        64 => (8, Kind::F64),
        256 => (1, Kind::I8),
        512 => (2, Kind::U16),
        768 => (4, Kind::U32),
        other => {
            return Err(bad(format!(
                "datatype {other} is not supported (greyscale numbers only)"
            )));
        }
    };
    let offset = h.f32(108);
    if !(offset >= 348.0 && offset.fract() == 0.0) {
        return Err(bad(format!("vox_offset {offset}")));
    }
    let data = bytes
        .get(offset as usize..)
        .filter(|d| d.len() >= voxels * size)
        .ok_or_else(|| {
            bad(format!(
                "truncated: {voxels} voxels of {size} bytes expected"
            ))
        })?;
    let (slope, inter) = (f64::from(h.f32(112)), f64::from(h.f32(116)));
    let scaled = slope != 0.0 && slope.is_finite() && inter.is_finite();
    let values = data[..voxels * size]
        .chunks_exact(size)
        .map(|c| {
            let v = kind.value(c, big_endian);
            if scaled { v * slope + inter } else { v }
        })
        .collect();
    let affine = affine(&h);
    Ok(Volume {
        header: bytes[..348].to_vec(),
        big_endian,
        dims,
        values,
        orientation: orientation(&affine)?,
        affine,
    })
}

#[derive(Clone, Copy)]
enum Kind {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl Kind {
    fn value(self, c: &[u8], big: bool) -> f64 {
        macro_rules! num {
            ($t:ty) => {{
                let a = c.try_into().expect("sized chunk");
                f64::from(if big {
                    <$t>::from_be_bytes(a)
                } else {
                    <$t>::from_le_bytes(a)
                })
            }};
        }
        match self {
            Kind::U8 => f64::from(c[0]),
            Kind::I8 => f64::from(c[0] as i8),
            Kind::I16 => num!(i16),
            Kind::U16 => num!(u16),
            Kind::I32 => num!(i32),
            Kind::U32 => num!(u32),
            Kind::F32 => num!(f32),
            Kind::F64 => {
                let a = c.try_into().expect("sized chunk");
                if big {
                    f64::from_be_bytes(a)
                } else {
                    f64::from_le_bytes(a)
                }
            }
        }
    }
}

struct Header<'a> {
    bytes: &'a [u8],
    big_endian: bool,
}

impl Header<'_> {
    fn i16(&self, at: usize) -> i16 {
        let a = [self.bytes[at], self.bytes[at + 1]];
        if self.big_endian {
            i16::from_be_bytes(a)
        } else {
            i16::from_le_bytes(a)
        }
    }
    fn f32(&self, at: usize) -> f32 {
        let a = self.bytes[at..at + 4].try_into().expect("4 bytes");
        if self.big_endian {
            f32::from_be_bytes(a)
        } else {
            f32::from_le_bytes(a)
        }
    }
}

/// The voxel-to-patient affine: sform (code > 0), else qform (code > 0), else voxel sizes.
fn affine(h: &Header) -> [[f64; 4]; 3] {
    let f = |at: usize| f64::from(h.f32(at));
    if h.i16(254) > 0 {
        return [0, 1, 2].map(|r| [0, 1, 2, 3].map(|c| f(280 + 16 * r + 4 * c)));
    }
    let pix = [f(80), f(84), f(88)].map(|p| if p > 0.0 { p } else { 1.0 });
    if h.i16(252) > 0 {
        let (b, c, d) = (f(256), f(260), f(264));
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let qfac = if f(76) < 0.0 { -1.0 } else { 1.0 };
        let offset = [f(268), f(272), f(276)];
        return [0, 1, 2].map(|i| {
            [
                r[i][0] * pix[0],
                r[i][1] * pix[1],
                r[i][2] * pix[2] * qfac,
                offset[i],
            ]
        });
    }
    [
        [pix[0], 0.0, 0.0, 0.0],
        [0.0, pix[1], 0.0, 0.0],
        [0.0, 0.0, pix[2], 0.0],
    ]
}

/// The bytes a file's header says it holds (header, extensions and voxels), once its
/// dimensions are checked against [`MAX_VOXELS`]; the header's own errors are left to
/// [`read`], which reports them.
fn declared_size(header: &[u8], max_voxels: usize) -> Result<usize> {
    let big_endian = i32::from_be_bytes(header[0..4].try_into().expect("4 bytes")) == 348;
    let h = Header {
        bytes: header,
        big_endian,
    };
    let dims: Vec<usize> = (1..8)
        .map(|i| usize::try_from(h.i16(40 + 2 * i)).unwrap_or(0).max(1))
        .collect();
    let voxels = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= max_voxels)
        .ok_or_else(|| bad(format!("more than {max_voxels} voxels")))?;
    let size = (usize::try_from(h.i16(72)).unwrap_or(0) / 8).clamp(1, 16);
    let offset = h.f32(108);
    let offset = if (348.0..=1e6).contains(&offset) {
        offset as usize
    } else {
        352
    };
    Ok(offset + voxels * size)
}

/// Each voxel axis's nearest patient axis and direction (distinct axes, largest first).
fn orientation(affine: &[[f64; 4]; 3]) -> Result<[(usize, i8); 3]> {
    let mut out = [(usize::MAX, 0i8); 3];
    let mut used = [false; 3];
    // Columns by how clearly they point somewhere, most clearly first.
    let mut pairs: Vec<(f64, usize, usize)> = (0..3)
        .flat_map(|c| (0..3).map(move |r| (affine[r][c].abs(), c, r)))
        .collect();
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (size, column, row) in pairs {
        if size > 0.0 && out[column].0 == usize::MAX && !used[row] {
            out[column] = (row, if affine[row][column] > 0.0 { 1 } else { -1 });
            used[row] = true;
        }
    }
    if out.iter().any(|o| o.0 == usize::MAX) {
        return Err(bad("the affine is degenerate (an axis points nowhere)"));
    }
    Ok(out)
}

impl Volume {
    /// Canonical (RAS) sizes: voxels along R, A and S.
    fn canonical_dims(&self) -> [usize; 3] {
        let mut n = [0; 3];
        for (axis, &(patient, _)) in self.orientation.iter().enumerate() {
            n[patient] = self.dims[axis];
        }
        n
    }

    /// The slices of a plane.
    pub fn slices(&self, plane: Plane) -> usize {
        let [x, y, z] = self.canonical_dims();
        match plane {
            Plane::Axial => z,
            Plane::Coronal => y,
            Plane::Sagittal => x,
        }
    }

    /// Width and height of a plane's slices as shown.
    pub fn slice_size(&self, plane: Plane) -> (usize, usize) {
        let [x, y, z] = self.canonical_dims();
        match plane {
            Plane::Axial => (x, y),
            Plane::Coronal => (x, z),
            Plane::Sagittal => (y, z),
        }
    }

    /// The index in `values` of pixel (row, column) of slice `k` as shown.
    pub fn voxel(&self, plane: Plane, k: usize, row: usize, column: usize) -> usize {
        let [nx, ny, nz] = self.canonical_dims();
        // Canonical coordinates: R, A and S grow with the index.
        let c = match plane {
            Plane::Axial => [nx - 1 - column, ny - 1 - row, k],
            Plane::Coronal => [nx - 1 - column, k, nz - 1 - row],
            Plane::Sagittal => [k, ny - 1 - column, nz - 1 - row],
        };
        let v = [0, 1, 2].map(|axis| {
            let (patient, sign) = self.orientation[axis];
            if sign > 0 {
                c[patient]
            } else {
                self.dims[axis] - 1 - c[patient]
            }
        });
        v[0] + self.dims[0] * (v[1] + self.dims[1] * v[2])
    }

    /// Slice `k`'s values as shown, row by row.
    pub fn slice_values(&self, plane: Plane, k: usize) -> Vec<f64> {
        let (w, h) = self.slice_size(plane);
        (0..h)
            .flat_map(|row| (0..w).map(move |column| (row, column)))
            .map(|(row, column)| self.values[self.voxel(plane, k, row, column)])
            .collect()
    }

    /// A NIfTI-1 file (gzip-compressed when `gzip`) of `labels` (one byte per voxel, in
    /// `values`' order) over this volume's grid: the same dimensions, voxel sizes, qform
    /// and sform, as uint8 with the label intent, so it opens over the input in ITK-SNAP
    /// or 3D Slicer.
    pub fn label_file(&self, labels: &[u8], gzip: bool) -> Result<Vec<u8>> {
        if labels.len() != self.values.len() {
            return Err(bad("label volume of another size"));
        }
        let mut h = self.header.clone();
        let big = self.big_endian;
        let put_i16 = |h: &mut Vec<u8>, at: usize, v: i16| {
            h[at..at + 2].copy_from_slice(&if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        };
        let put_f32 = |h: &mut Vec<u8>, at: usize, v: f32| {
            h[at..at + 4].copy_from_slice(&if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            });
        };
        put_i16(&mut h, 40, 3); // dim[0]
        for i in 4..8 {
            put_i16(&mut h, 40 + 2 * i, 1);
        }
        put_i16(&mut h, 68, 1002); // intent: NIFTI_INTENT_LABEL
        put_i16(&mut h, 70, 2); // datatype: uint8
        put_i16(&mut h, 72, 8); // bitpix
        put_f32(&mut h, 108, 352.0); // vox_offset: header + 4 extension bytes
        put_f32(&mut h, 112, 1.0); // scl_slope
        put_f32(&mut h, 116, 0.0); // scl_inter
        put_f32(&mut h, 124, 1.0); // cal_max
        put_f32(&mut h, 128, 0.0); // cal_min
        let mut file = h;
        file.extend_from_slice(&[0, 0, 0, 0]); // no extensions
        file.extend_from_slice(labels);
        if !gzip {
            return Ok(file);
        }
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(&file)
            .and_then(|()| encoder.finish())
            .map_err(|e| bad(format!("compressing: {e}")))
    }
}
