//! DICOM input against pydicom: decoded values (after the modality LUT) equal pydicom's
//! exactly, on the fixtures `tools/make_dicom_fixtures.py` writes (explicit and implicit VR,
//! MONOCHROME1, RGB, multi-frame RLE, deflated); bad files give one clear error.

use std::path::PathBuf;

use serde_json::Value;
use vlsm::dicom::DicomFile;
use vlsm::window::Window;
use vlsm_tests::{fixture, read_npy_f64};

fn dir() -> PathBuf {
    fixture("dicom")
}

#[test]
fn decoded_values_equal_pydicoms() {
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir().join("reference.json")).unwrap()).unwrap();
    let files = reference.as_object().unwrap();
    assert_eq!(files.len(), 10);
    for (name, r) in files {
        let bytes = std::fs::read(dir().join(format!("{name}.dcm"))).unwrap();
        let file = DicomFile::read(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(file.rows as u64, r["rows"].as_u64().unwrap(), "{name}");
        assert_eq!(
            file.columns as u64,
            r["columns"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(file.frames as u64, r["frames"].as_u64().unwrap(), "{name}");
        assert_eq!(
            file.photometric,
            r["photometric"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            file.sop_instance_uid,
            r["sop_instance_uid"].as_str().unwrap()
        );
        assert_eq!(file.transfer_syntax, r["transfer_syntax"].as_str().unwrap());
        let window = r["window"]
            .as_array()
            .map(|w| (w[0].as_f64().unwrap(), w[1].as_f64().unwrap()));
        assert_eq!(file.window, window, "{name}");
        let (shape, expected) = read_npy_f64(&dir().join(format!("{name}.values.npy")));
        assert_eq!(shape[0] as u32, file.frames);
        let per_frame = expected.len() / shape[0];
        for frame in 0..file.frames {
            let ours = file.frame_values(frame).unwrap();
            let theirs = &expected[frame as usize * per_frame..][..per_frame];
            // (jpeg_lossless's reference is what it encodes: pydicom 3 needs a plugin to
            // decode it, and libjpeg-turbo decodes it back to those values exactly.)
            if name == "jpeg_baseline" {
                // Lossy JPEG: the standard lets decoders round the inverse DCT differently
                // (dicom-rs uses jpeg-decoder, pydicom Pillow's libjpeg-turbo).
                let diffs: Vec<f64> = ours
                    .iter()
                    .zip(theirs)
                    .map(|(a, b)| (a - b).abs())
                    .collect();
                let most = diffs.iter().copied().fold(0.0, f64::max);
                let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
                assert!(
                    most <= 1.0 && mean < 0.2,
                    "{name}: max |Δ| {most}, mean {mean}"
                );
                continue;
            }
            assert!(
                ours == theirs,
                "{name} frame {frame}: values differ from pydicom's"
            );
        }
        // The model's input: the size of the image, grey repeated in R, G and B.
        let rgb = file.frame_rgb(0, Window::File).unwrap();
        assert_eq!(rgb.dimensions(), (file.columns, file.rows));
        if file.samples_per_pixel == 1 {
            assert!(rgb.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        }
    }
}

#[test]
fn windows_and_monochrome1_shape_the_models_input() {
    let ct = DicomFile::read(&std::fs::read(dir().join("ct_explicit.dcm")).unwrap()).unwrap();
    let hu = ct.frame_values(0).unwrap();
    // The file's window is 40/400: -160 HU and below black, 240 and above white.
    let rgb = ct.frame_rgb(0, Window::File).unwrap();
    for (v, p) in hu.iter().zip(rgb.pixels()) {
        if *v <= -160.0 {
            assert_eq!(p[0], 0);
        } else if *v >= 240.0 {
            assert_eq!(p[0], 255);
        }
    }
    let lung = ct.frame_rgb(0, "lung".parse().unwrap()).unwrap();
    assert_ne!(lung, rgb);
    // MONOCHROME1: low values bright, so its grey is the inverse of the min–max window.
    let m1 = DicomFile::read(&std::fs::read(dir().join("mono1_implicit.dcm")).unwrap()).unwrap();
    let values = m1.frame_values(0).unwrap();
    let rgb = m1.frame_rgb(0, Window::File).unwrap();
    let (lo, hi) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    for (v, p) in values.iter().zip(rgb.pixels()) {
        if *v == lo {
            assert_eq!(p[0], 255);
        }
        if *v == hi {
            assert_eq!(p[0], 0);
        }
    }
}

#[test]
fn bad_dicom_files_are_one_clear_error() {
    let read = |name: &str| DicomFile::read(&std::fs::read(dir().join(name)).unwrap());
    let truncated = read("truncated.dcm").err().map(|e| e.to_string());
    // A cut file may parse up to the pixel data and fail there, or fail parsing.
    let message = match truncated {
        Some(m) => m,
        None => read("truncated.dcm")
            .unwrap()
            .frame_values(0)
            .unwrap_err()
            .to_string(),
    };
    assert!(message.starts_with("image: DICOM: "), "{message}");
    // JPEG-LS has no pure-Rust decoder here: named, not decoded.
    let jpegls = read("jpegls_unsupported.dcm").unwrap();
    let message = jpegls.frame_values(0).unwrap_err().to_string();
    assert!(
        message.contains("unsupported transfer syntax JPEG-LS"),
        "{message}"
    );
    assert!(!message.contains('\n'));
    // A broken JPEG 2000 codestream: an error, not a panic.
    let message = match read("j2k_corrupt.dcm") {
        Ok(file) => file.frame_values(0).unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(message.starts_with("image: DICOM: "), "{message}");
    assert!(!message.contains('\n'), "{message}");
    let not_dicom = DicomFile::read(b"plain text, not a DICOM file")
        .err()
        .unwrap()
        .to_string();
    assert!(not_dicom.contains("not a DICOM file"), "{not_dicom}");
    // A header declaring more pixels than allowed is refused before decoding.
    let mut ct = std::fs::read(dir().join("ct_explicit.dcm")).unwrap();
    // Rows (0028,0010) and Columns (0028,0011), US 2 bytes, explicit VR: patched to 65535.
    for element in [0x10, 0x11] {
        let at = ct
            .windows(6)
            .position(|w| w == [0x28, 0x00, element, 0x00, b'U', b'S'])
            .unwrap();
        ct[at + 8..at + 10].copy_from_slice(&[0xff, 0xff]);
    }
    let huge = DicomFile::read(&ct).err().unwrap().to_string();
    assert!(huge.contains("pixels"), "{huge}");
    // A JPEG 2000 codestream declaring more pixels than the header is refused before the
    // decoder allocates for it.
    let mut j2k = std::fs::read(dir().join("j2k_lossless.dcm")).unwrap();
    let soc = j2k
        .windows(4)
        .position(|w| w == [0xff, 0x4f, 0xff, 0x51])
        .unwrap();
    j2k[soc + 8..soc + 16].copy_from_slice(&[0, 0, 0xea, 0x60, 0, 0, 0xea, 0x60]);
    let lying = DicomFile::read(&j2k).err().unwrap().to_string();
    assert!(lying.contains("declares 60000×60000"), "{lying}");
}

#[test]
fn datasets_may_list_dicom_images_and_masks() {
    // A medvlsm-layout dataset whose image and mask are DICOM files (the mask: foreground
    // where the value is above 0).
    let tmp = tempfile::tempdir().unwrap();
    let ds = tmp.path().join("ct");
    for sub in ["images", "masks", "anns"] {
        std::fs::create_dir_all(ds.join(sub)).unwrap();
    }
    std::fs::copy(dir().join("ct_explicit.dcm"), ds.join("images/a.dcm")).unwrap();
    std::fs::copy(dir().join("mono1_implicit.dcm"), ds.join("masks/a.dcm")).unwrap();
    let json = br#"[{"img_name": "a.dcm", "mask_name": "a.dcm", "prompts": {"p1": "x"}}]"#;
    let (entries, _) = vlsm::dataset::parse_annotations(json, "test.json").unwrap();
    let (image, mask) = vlsm::dataset::read_sample(&ds, "test", &entries[0]).unwrap();
    let ct = DicomFile::read(&std::fs::read(dir().join("ct_explicit.dcm")).unwrap()).unwrap();
    assert_eq!(image, ct.frame_rgb(0, Window::File).unwrap());
    let m = DicomFile::read(&std::fs::read(dir().join("mono1_implicit.dcm")).unwrap()).unwrap();
    let expected: Vec<u8> = m
        .frame_values(0)
        .unwrap()
        .iter()
        .map(|&v| u8::from(v > 0.0))
        .collect();
    assert_eq!(mask, expected);
}
