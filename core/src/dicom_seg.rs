//! DICOM Segmentation (SEG) objects of masks over a DICOM image: a binary segment per
//! prompt, a frame per (segment, source frame), each frame referencing the image and frame
//! it was segmented from, so viewers (3D Slicer, OHIF) show the masks over the original.
//!
//! The patient, study and frame of reference are the source's; the series, instance and
//! dimension organisation UIDs are `2.25.` UIDs derived from a hash of the source UID, the
//! prompts and the masks, so the same result gives the same file. Segments are coded in a
//! private scheme (`99VLSM`), with the prompt as the code meaning: a text prompt names no
//! standard anatomy or finding.

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use sha2::{Digest, Sha256};

use crate::dicom::DicomFile;
use crate::error::{Error, Result};

/// The Segmentation Storage SOP class.
pub const SEGMENTATION_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.66.4";

/// One segment: its label (the prompt) and a mask per source frame (1 byte a pixel,
/// non-zero = foreground, rows × columns).
pub struct Segment<'a> {
    pub label: &'a str,
    pub masks: Vec<&'a [u8]>,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Image(format!("DICOM SEG: {what}"))
}

/// The SEG file (Explicit VR Little Endian) of `segments` over `source`'s frames.
/// `algorithm` names the model (e.g. "CLIPSeg").
pub fn write(source: &DicomFile, segments: &[Segment], algorithm: &str) -> Result<Vec<u8>> {
    let frames = source.frames as usize;
    let pixels = source.rows as usize * source.columns as usize;
    if segments.is_empty() {
        return Err(bad("no segments"));
    }
    for s in segments {
        if s.masks.len() != frames || s.masks.iter().any(|m| m.len() != pixels) {
            return Err(bad(format!(
                "segment {:?} does not have a {}×{} mask for each of the {frames} frames",
                s.label, source.columns, source.rows
            )));
        }
    }
    let object = source.object();
    let text = |tag: Tag| crate::dicom::text_of(object, tag);
    // Deterministic UIDs from what the file says.
    let mut hasher = Sha256::new();
    hasher.update(source.sop_instance_uid.as_bytes());
    for s in segments {
        hasher.update(s.label.as_bytes());
        hasher.update([0]);
        for m in &s.masks {
            hasher.update(m);
        }
    }
    let digest = hasher.finalize();
    let uid = |salt: u8| {
        let mut h = Sha256::new();
        h.update(digest);
        h.update([salt]);
        let d = h.finalize();
        // 2.25 + a 128-bit number: ISO/IEC 9834-8's UUID-derived form (≤ 64 characters).
        format!(
            "2.25.{}",
            u128::from_be_bytes(d[..16].try_into().expect("16 bytes")) >> 1
        )
    };
    let (series_uid, instance_uid, dimension_uid) = (uid(1), uid(2), uid(3));
    let source_class = text(tags::SOP_CLASS_UID).unwrap_or_default();
    let source_series = text(tags::SERIES_INSTANCE_UID).unwrap_or_default();
    let (date, time) = now();

    let mut seg = InMemDicomObject::new_empty();
    let put = |o: &mut InMemDicomObject, tag: Tag, vr: VR, value: PrimitiveValue| {
        o.put(DataElement::new(tag, vr, value));
    };
    let put_str = |o: &mut InMemDicomObject, tag: Tag, vr: VR, value: &str| {
        o.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
    };
    let sequence = |o: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>| {
        o.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
    };
    let code = |value: &str, scheme: &str, meaning: &str| {
        let mut c = InMemDicomObject::new_empty();
        put_str(&mut c, tags::CODE_VALUE, VR::SH, value);
        put_str(&mut c, tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme);
        put_str(&mut c, tags::CODE_MEANING, VR::LO, meaning);
        c
    };
    // Patient, study and frame of reference: the source's.
    for (tag, vr) in [
        (tags::PATIENT_NAME, VR::PN),
        (tags::PATIENT_ID, VR::LO),
        (tags::PATIENT_BIRTH_DATE, VR::DA),
        (tags::PATIENT_SEX, VR::CS),
        (tags::STUDY_INSTANCE_UID, VR::UI),
        (tags::STUDY_DATE, VR::DA),
        (tags::STUDY_TIME, VR::TM),
        (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
        (tags::STUDY_ID, VR::SH),
        (tags::ACCESSION_NUMBER, VR::SH),
        (tags::FRAME_OF_REFERENCE_UID, VR::UI),
    ] {
        let value = text(tag).unwrap_or_default();
        if tag == tags::FRAME_OF_REFERENCE_UID && value.is_empty() {
            continue;
        }
        put_str(&mut seg, tag, vr, &value);
    }
    if text(tags::STUDY_INSTANCE_UID)
        .unwrap_or_default()
        .is_empty()
    {
        return Err(bad("the source has no Study Instance UID"));
    }
    // Series, equipment, instance.
    put_str(&mut seg, tags::SOP_CLASS_UID, VR::UI, SEGMENTATION_STORAGE);
    put_str(&mut seg, tags::SOP_INSTANCE_UID, VR::UI, &instance_uid);
    put_str(&mut seg, tags::MODALITY, VR::CS, "SEG");
    put_str(&mut seg, tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    put(
        &mut seg,
        tags::SERIES_NUMBER,
        VR::IS,
        PrimitiveValue::from("990"),
    );
    put(
        &mut seg,
        tags::INSTANCE_NUMBER,
        VR::IS,
        PrimitiveValue::from("1"),
    );
    put_str(
        &mut seg,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        "vlsm segmentation",
    );
    put_str(&mut seg, tags::MANUFACTURER, VR::LO, "vlsm");
    put_str(&mut seg, tags::MANUFACTURER_MODEL_NAME, VR::LO, "vlsm");
    put_str(&mut seg, tags::DEVICE_SERIAL_NUMBER, VR::LO, "1");
    put_str(
        &mut seg,
        tags::SOFTWARE_VERSIONS,
        VR::LO,
        env!("CARGO_PKG_VERSION"),
    );
    put_str(&mut seg, tags::CONTENT_DATE, VR::DA, &date);
    put_str(&mut seg, tags::CONTENT_TIME, VR::TM, &time);
    put_str(&mut seg, tags::SERIES_DATE, VR::DA, &date);
    put_str(&mut seg, tags::SERIES_TIME, VR::TM, &time);
    put(
        &mut seg,
        tags::IMAGE_TYPE,
        VR::CS,
        PrimitiveValue::Strs(["DERIVED".to_string(), "PRIMARY".to_string()].into()),
    );
    put_str(&mut seg, tags::CONTENT_LABEL, VR::CS, "VLSM");
    put_str(
        &mut seg,
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        "Text-prompted segmentation",
    );
    put_str(&mut seg, tags::CONTENT_CREATOR_NAME, VR::PN, "vlsm");
    // The image: 1-bit binary frames.
    put(
        &mut seg,
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(1u16),
    );
    put_str(
        &mut seg,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    );
    put(
        &mut seg,
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(source.rows as u16),
    );
    put(
        &mut seg,
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(source.columns as u16),
    );
    put(
        &mut seg,
        tags::BITS_ALLOCATED,
        VR::US,
        PrimitiveValue::from(1u16),
    );
    put(
        &mut seg,
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(1u16),
    );
    put(&mut seg, tags::HIGH_BIT, VR::US, PrimitiveValue::from(0u16));
    put(
        &mut seg,
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(0u16),
    );
    put_str(&mut seg, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    put_str(&mut seg, tags::SEGMENTATION_TYPE, VR::CS, "BINARY");
    let total = segments.len() * frames;
    put(
        &mut seg,
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from(total.to_string()),
    );
    // The segments.
    let items = segments
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut item = InMemDicomObject::new_empty();
            put(
                &mut item,
                tags::SEGMENT_NUMBER,
                VR::US,
                PrimitiveValue::from((i + 1) as u16),
            );
            let label: String = s.label.chars().take(64).collect();
            let label = if label.trim().is_empty() {
                "(empty prompt)".to_string()
            } else {
                label
            };
            put_str(&mut item, tags::SEGMENT_LABEL, VR::LO, &label);
            put_str(&mut item, tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC");
            put_str(&mut item, tags::SEGMENT_ALGORITHM_NAME, VR::LO, algorithm);
            sequence(
                &mut item,
                tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
                vec![code("TEXT", "99VLSM", "Text-prompted region")],
            );
            sequence(
                &mut item,
                tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
                vec![code(&format!("P{}", i + 1), "99VLSM", &label)],
            );
            item
        })
        .collect();
    sequence(&mut seg, tags::SEGMENT_SEQUENCE, items);
    // Dimensions: segment number, then the source frame.
    let mut dimension_organization = InMemDicomObject::new_empty();
    put_str(
        &mut dimension_organization,
        tags::DIMENSION_ORGANIZATION_UID,
        VR::UI,
        &dimension_uid,
    );
    sequence(
        &mut seg,
        tags::DIMENSION_ORGANIZATION_SEQUENCE,
        vec![dimension_organization],
    );
    let dimension = |pointer: Tag, group: Tag, label: &str| {
        let mut d = InMemDicomObject::new_empty();
        put_str(
            &mut d,
            tags::DIMENSION_ORGANIZATION_UID,
            VR::UI,
            &dimension_uid,
        );
        put(
            &mut d,
            tags::DIMENSION_INDEX_POINTER,
            VR::AT,
            PrimitiveValue::Tags((&[pointer][..]).into()),
        );
        put(
            &mut d,
            tags::FUNCTIONAL_GROUP_POINTER,
            VR::AT,
            PrimitiveValue::Tags((&[group][..]).into()),
        );
        put_str(&mut d, tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label);
        d
    };
    sequence(
        &mut seg,
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dimension(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "Segment Number",
            ),
            dimension(
                tags::IN_STACK_POSITION_NUMBER,
                tags::FRAME_CONTENT_SEQUENCE,
                "Source Frame",
            ),
        ],
    );
    // Shared: the source's pixel spacing and orientation, when it has them.
    let mut shared = InMemDicomObject::new_empty();
    if let Some(spacing) = object
        .element_opt(tags::PIXEL_SPACING)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_float64().ok())
        .filter(|v| v.len() == 2)
    {
        let mut measures = InMemDicomObject::new_empty();
        put(
            &mut measures,
            tags::PIXEL_SPACING,
            VR::DS,
            PrimitiveValue::Strs(spacing.iter().map(|v| v.to_string()).collect()),
        );
        if let Some(thickness) = text(tags::SLICE_THICKNESS).filter(|t| !t.is_empty()) {
            put_str(&mut measures, tags::SLICE_THICKNESS, VR::DS, &thickness);
        }
        sequence(&mut shared, tags::PIXEL_MEASURES_SEQUENCE, vec![measures]);
    }
    if let Some(orientation) = text(tags::IMAGE_ORIENTATION_PATIENT).filter(|t| !t.is_empty()) {
        let mut plane = InMemDicomObject::new_empty();
        put(
            &mut plane,
            tags::IMAGE_ORIENTATION_PATIENT,
            VR::DS,
            PrimitiveValue::Strs(orientation.split('\\').map(str::to_string).collect()),
        );
        sequence(&mut shared, tags::PLANE_ORIENTATION_SEQUENCE, vec![plane]);
    }
    sequence(
        &mut seg,
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![shared],
    );
    // Per frame: which segment, which source frame.
    let position = text(tags::IMAGE_POSITION_PATIENT).filter(|t| !t.is_empty());
    let mut per_frame = Vec::with_capacity(total);
    for segment in 1..=segments.len() {
        for frame in 1..=frames {
            let mut item = InMemDicomObject::new_empty();
            let mut content = InMemDicomObject::new_empty();
            put(
                &mut content,
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                PrimitiveValue::U32([segment as u32, frame as u32].into()),
            );
            put(
                &mut content,
                tags::IN_STACK_POSITION_NUMBER,
                VR::UL,
                PrimitiveValue::from(frame as u32),
            );
            sequence(&mut item, tags::FRAME_CONTENT_SEQUENCE, vec![content]);
            let mut source_image = InMemDicomObject::new_empty();
            put_str(
                &mut source_image,
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                &source_class,
            );
            put_str(
                &mut source_image,
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                &source.sop_instance_uid,
            );
            if frames > 1 {
                put(
                    &mut source_image,
                    tags::REFERENCED_FRAME_NUMBER,
                    VR::IS,
                    PrimitiveValue::from(frame.to_string()),
                );
            }
            // The masks are at the source's pixels: same grid, same place.
            put_str(
                &mut source_image,
                tags::SPATIAL_LOCATIONS_PRESERVED,
                VR::CS,
                "YES",
            );
            sequence(
                &mut source_image,
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                vec![code(
                    "121322",
                    "DCM",
                    "Source image for image processing operation",
                )],
            );
            let mut derivation = InMemDicomObject::new_empty();
            sequence(
                &mut derivation,
                tags::SOURCE_IMAGE_SEQUENCE,
                vec![source_image],
            );
            sequence(
                &mut derivation,
                tags::DERIVATION_CODE_SEQUENCE,
                vec![code("113076", "DCM", "Segmentation")],
            );
            sequence(&mut item, tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation]);
            let mut identification = InMemDicomObject::new_empty();
            put(
                &mut identification,
                tags::REFERENCED_SEGMENT_NUMBER,
                VR::US,
                PrimitiveValue::from(segment as u16),
            );
            sequence(
                &mut item,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                vec![identification],
            );
            if let (Some(position), 1) = (&position, frames) {
                let mut plane = InMemDicomObject::new_empty();
                put(
                    &mut plane,
                    tags::IMAGE_POSITION_PATIENT,
                    VR::DS,
                    PrimitiveValue::Strs(position.split('\\').map(str::to_string).collect()),
                );
                sequence(&mut item, tags::PLANE_POSITION_SEQUENCE, vec![plane]);
            }
            per_frame.push(item);
        }
    }
    sequence(
        &mut seg,
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        per_frame,
    );
    // The source, for viewers that load a series.
    let mut instance = InMemDicomObject::new_empty();
    put_str(
        &mut instance,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        &source_class,
    );
    put_str(
        &mut instance,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        &source.sop_instance_uid,
    );
    let mut series = InMemDicomObject::new_empty();
    put_str(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &source_series,
    );
    sequence(
        &mut series,
        tags::REFERENCED_INSTANCE_SEQUENCE,
        vec![instance],
    );
    sequence(&mut seg, tags::REFERENCED_SERIES_SEQUENCE, vec![series]);
    // Frames packed bit by bit, one after another (the first pixel in the lowest bit),
    // padded to an even length at the end only.
    let bits = total * pixels;
    let mut packed = vec![0u8; bits.div_ceil(8).next_multiple_of(2)];
    let all = segments.iter().flat_map(|s| s.masks.iter());
    for (f, mask) in all.enumerate() {
        for (p, &m) in mask.iter().enumerate() {
            if m != 0 {
                let bit = f * pixels + p;
                packed[bit / 8] |= 1 << (bit % 8);
            }
        }
    }
    seg.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::from(packed),
    ));
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(SEGMENTATION_STORAGE)
        .media_storage_sop_instance_uid(instance_uid.as_str())
        .transfer_syntax("1.2.840.10008.1.2.1")
        .implementation_class_uid("2.25.293410112391289349186231839811232874812")
        .implementation_version_name("VLSM");
    let file = seg
        .with_meta(meta)
        .map_err(|e| bad(format!("file meta: {e}")))?;
    let mut out = Vec::new();
    file.write_all(&mut out)
        .map_err(|e| bad(format!("writing: {e}")))?;
    Ok(out)
}

/// Today's date (YYYYMMDD) and the time (HHMMSS), UTC.
fn now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}"),
        format!("{:02}{:02}{:02}", rest / 3600, rest / 60 % 60, rest % 60),
    )
}
