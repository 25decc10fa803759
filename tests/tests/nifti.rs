//! NIfTI input against nibabel: voxel values (with the slope and intercept) equal
//! `get_fdata()` exactly, slices equal nibabel's closest-canonical (RAS+) volume shown as
//! radiology viewers show it, and label volumes keep the input's grid
//! (`tools/make_nifti_fixtures.py` writes the fixture and the references).

use serde_json::Value;
use vlsm::nifti::{Plane, read};
use vlsm_tests::{fixture, read_npy_f64};

#[test]
fn voxels_orientation_and_slices_equal_nibabels() {
    let dir = fixture("nifti");
    let volume = read(&std::fs::read(dir.join("volume.nii.gz")).unwrap()).unwrap();
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join("slices.json")).unwrap()).unwrap();
    let shape: Vec<usize> = reference["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(volume.dims.to_vec(), shape);
    assert!(
        volume.values == read_npy_f64(&dir.join("values.npy")).1,
        "values differ from nibabel's"
    );
    for r in 0..3 {
        for c in 0..4 {
            let theirs = reference["affine"][r][c].as_f64().unwrap();
            assert!(
                (volume.affine[r][c] - theirs).abs() < 1e-6,
                "affine [{r}][{c}]"
            );
        }
    }
    for plane in [Plane::Axial, Plane::Coronal, Plane::Sagittal] {
        let r = &reference["slices"][plane.name()];
        assert_eq!(
            volume.slices(plane) as u64,
            r["count"].as_u64().unwrap(),
            "{plane:?}"
        );
        let (w, h) = volume.slice_size(plane);
        assert_eq!(
            (h as u64, w as u64),
            (r["rows"].as_u64().unwrap(), r["columns"].as_u64().unwrap())
        );
        let expected: Vec<f64> = r["slice_1"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(volume.slice_values(plane, 1), expected, "{plane:?} slice 1");
    }
}

#[test]
fn label_volumes_keep_the_grid_and_bad_files_are_one_clear_error() {
    let dir = fixture("nifti");
    let bytes = std::fs::read(dir.join("volume.nii.gz")).unwrap();
    let volume = read(&bytes).unwrap();
    // Label the pixel at row 2, column 3 of axial slice 4.
    let mut labels = vec![0u8; volume.values.len()];
    let voxel = volume.voxel(Plane::Axial, 4, 2, 3);
    labels[voxel] = 1;
    for gzip in [true, false] {
        let written = read(&volume.label_file(&labels, gzip).unwrap()).unwrap();
        assert_eq!(written.dims, volume.dims);
        assert_eq!(written.affine, volume.affine);
        assert_eq!(written.values.iter().filter(|&&v| v == 1.0).count(), 1);
        assert_eq!(written.values[voxel], 1.0);
        assert_eq!(
            written.slice_values(Plane::Axial, 4)[2 * volume.slice_size(Plane::Axial).0 + 3],
            1.0
        );
    }
    let error = |bytes: &[u8]| read(bytes).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error(b"not a volume").contains("NIfTI"));
    let plain = uncompressed(&bytes);
    assert!(
        error(&plain[..plain.len() / 2]).contains("truncated"),
        "{}",
        error(&plain[..plain.len() / 2])
    );
    let mut four_d = plain.clone();
    four_d[40] = 4; // dim[0] = 4
    four_d[48] = 3; // dim[4] = 3
    assert!(error(&four_d).contains("4-D"));
    let mut huge = plain.clone();
    for at in [42, 44, 46] {
        huge[at] = 0xff;
        huge[at + 1] = 0x7f;
    }
    assert!(error(&huge).contains("voxels"), "{}", error(&huge));
    // The same header compressed: refused from the header, before inflating any voxel.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &huge).unwrap();
    let message = error(&gz.finish().unwrap());
    assert!(message.contains("more than"), "{message}");
    // A small volume followed by 32 MiB of zeros in the gzip stream reads as the small
    // volume: only what the header declares is inflated.
    let mut small = plain.clone();
    for (at, d) in [(42, 2u16), (44, 2), (46, 1)] {
        small[at..at + 2].copy_from_slice(&d.to_le_bytes());
    }
    small.truncate(352 + 4 * 2);
    small.extend(std::iter::repeat_n(0u8, 32 << 20));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &small).unwrap();
    let volume = read(&gz.finish().unwrap()).unwrap();
    assert_eq!(volume.dims, [2, 2, 1]);
    let mut two = plain;
    two[0..4].copy_from_slice(&540i32.to_le_bytes());
    assert!(error(&two).contains("NIfTI-2"));
}

/// The fixture as an uncompressed `.nii`: its header (through vlsm's writer) and its
/// stored int16 values (slope 1 here, so the values are the stored ones).
fn uncompressed(gz: &[u8]) -> Vec<u8> {
    let volume = read(gz).unwrap();
    let mut file = volume
        .label_file(&vec![0; volume.values.len()], false)
        .unwrap();
    file.truncate(352);
    file[70..72].copy_from_slice(&4i16.to_le_bytes()); // datatype int16
    file[72..74].copy_from_slice(&16i16.to_le_bytes()); // bitpix
    for v in &volume.values {
        file.extend_from_slice(&(*v as i16).to_le_bytes());
    }
    file
}
