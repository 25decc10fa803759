//! medvlsm's datasets: the annotation JSON as it is (`<root>/<dataset>/anns/<split>.json`,
//! one object per image–mask–target with `img_name`, `mask_name`, `prompts`), and the rules
//! of the 11 study datasets (reference §2–3): which prompt ids each has, and which splits
//! make up its evaluation set.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::slice::Slice;
use crate::window::Window;

/// A prompt value: one string, or a list (p7–p9, and the radiology pairs) of which medvlsm
/// picks one at random per sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PromptValue {
    Text(String),
    List(Vec<String>),
}

impl PromptValue {
    /// Every string of the value (one for a plain string).
    pub fn texts(&self) -> &[String] {
        match self {
            PromptValue::Text(t) => std::slice::from_ref(t),
            PromptValue::List(l) => l,
        }
    }
}

/// One annotation entry. Other keys (`bbox`, `cat`, `sentences`, …) are accepted and unused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Entry {
    pub img_name: String,
    pub mask_name: String,
    /// `p0`…`p9` → value.
    pub prompts: BTreeMap<String, PromptValue>,
    /// vlsm's addition for DICOM files and NIfTI volumes: which picture of the image and
    /// mask files the entry is (`"axial:42"`, or a frame number; a DICOM file's first
    /// frame when absent). An entry of a NIfTI volume must name its slice; `vlsm prompts`
    /// writes one entry per slice, so a volume is evaluated slice by slice.
    #[serde(default, deserialize_with = "parsed")]
    pub slice: Option<Slice>,
    /// The window for a greyscale picture (`"40,400"`, `"lung"`, `"file"`, `"minmax"`;
    /// `file` when absent: the DICOM file's own, or a volume's full range).
    #[serde(default, deserialize_with = "parsed")]
    pub window: Option<Window>,
}

impl Entry {
    /// The image's name as results show it: with the slice, if any (`ct.nii.gz#axial:42`).
    pub fn image_label(&self) -> String {
        match self.slice {
            Some(slice) => format!("{}#{slice}", self.img_name),
            None => self.img_name.clone(),
        }
    }
}

/// An optional field given as text ([`Slice`], [`Window`]).
fn parsed<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// An entry that could not be read, with its position in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct BadEntry {
    pub index: usize,
    pub message: String,
}

/// Reads one annotation file. A malformed entry does not sink the others: it is returned
/// in the second list with its index and what is wrong; a file that is not a JSON array is
/// an error.
pub fn parse_annotations(json: &[u8], source: &str) -> Result<(Vec<Entry>, Vec<BadEntry>)> {
    let (entries, bad) = parse_annotations_indexed(json, source)?;
    Ok((entries.into_iter().map(|(_, e)| e).collect(), bad))
}

/// Readable entries with their index in the file, and the unreadable ones.
pub type IndexedAnnotations = (Vec<(usize, Entry)>, Vec<BadEntry>);

/// As [`parse_annotations`], each entry with its index in the file.
pub fn parse_annotations_indexed(json: &[u8], source: &str) -> Result<IndexedAnnotations> {
    let values: Vec<serde_json::Value> = serde_json::from_slice(json)
        .map_err(|e| Error::Input(format!("{source}: not a JSON array of entries: {e}")))?;
    let mut entries = Vec::with_capacity(values.len());
    let mut bad = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        match serde_json::from_value::<Entry>(value) {
            Ok(entry) if entry.img_name.is_empty() || entry.mask_name.is_empty() => {
                bad.push(BadEntry {
                    index,
                    message: "empty img_name or mask_name".into(),
                })
            }
            Ok(entry) => entries.push((index, entry)),
            Err(e) => bad.push(BadEntry {
                index,
                message: e.to_string(),
            }),
        }
    }
    Ok((entries, bad))
}

/// What the study does with one of its datasets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetSpec {
    pub name: &'static str,
    /// Prompt ids evaluated: p0–p9, CAMUS p0–p7, BUSI and CheXlocalize p0–p6.
    pub prompt_count: usize,
    /// Splits evaluated as "test": CVC-300, ColonDB and ETIS are test-only datasets whose
    /// evaluation covers all their images (test and train lists).
    pub test_splits: &'static [&'static str],
}

impl DatasetSpec {
    pub fn prompt_ids(&self) -> Vec<String> {
        (0..self.prompt_count).map(|i| format!("p{i}")).collect()
    }
}

const TEST: &[&str] = &["test"];
const ALL: &[&str] = &["test", "train"];

/// The 11 datasets of the study, in the paper's order.
pub const STUDY_DATASETS: [DatasetSpec; 11] = [
    spec("kvasir_polyp", 10, TEST),
    spec("clinicdb_polyp", 10, TEST),
    spec("bkai_polyp", 10, TEST),
    spec("cvc300_polyp", 10, ALL),
    spec("colondb_polyp", 10, ALL),
    spec("etis_polyp", 10, ALL),
    spec("isic", 10, TEST),
    spec("dfu", 10, TEST),
    spec("camus", 8, TEST),
    spec("busi", 7, TEST),
    spec("chexlocalize", 7, TEST),
];

const fn spec(
    name: &'static str,
    prompt_count: usize,
    test_splits: &'static [&'static str],
) -> DatasetSpec {
    DatasetSpec {
        name,
        prompt_count,
        test_splits,
    }
}

/// The study's rules for a dataset, or `None` for a user's own dataset (then every prompt id
/// its annotations have is used, and `test` is the test split).
pub fn study_dataset(name: &str) -> Option<DatasetSpec> {
    STUDY_DATASETS.iter().copied().find(|s| s.name == name)
}

/// How list-valued prompts (p7–p9, radiology pairs) are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum ListPrompts {
    /// Every member, each its own row; per-image scores average the members.
    All,
    /// One member per (image, prompt id), chosen with a seeded generator from the seed and
    /// the entry — like medvlsm's `random.choice` but independent of loading order, so
    /// shards and resumed runs pick the same member.
    Random { seed: u64 },
}

impl ListPrompts {
    /// The member indices of `value` to evaluate for one entry.
    pub fn members(&self, value: &PromptValue, key: &str) -> Vec<usize> {
        let n = value.texts().len();
        match (self, value) {
            (_, PromptValue::Text(_)) => vec![0],
            (_, PromptValue::List(_)) if n == 0 => Vec::new(),
            (ListPrompts::All, _) => (0..n).collect(),
            (ListPrompts::Random { seed }, _) => {
                // FNV-1a of the key, mixed with the seed.
                let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
                });
                vec![crate::stats::SplitMix64(hash ^ seed).below(n)]
            }
        }
    }
}

/// The prompt ids of a dataset: the study's for its datasets, else every `p<N>` its entries
/// have, in numeric order.
pub fn prompt_ids(name: &str, entries: &[Entry]) -> Vec<String> {
    if let Some(spec) = study_dataset(name) {
        return spec.prompt_ids();
    }
    let mut ids: Vec<String> = entries
        .iter()
        .flat_map(|e| e.prompts.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    ids.sort_by_key(|id| (prompt_number(id), id.clone()));
    ids
}

/// `p7` → 7; other names sort after every `p<N>`.
pub fn prompt_number(id: &str) -> u32 {
    id.strip_prefix('p')
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX)
}

/// The annotation files read for a dataset and split: for the study's test-only datasets
/// (CVC-300, ColonDB, ETIS) "test" means their test and train lists.
pub fn splits_for(name: &str, split: &str) -> Vec<String> {
    match study_dataset(name) {
        Some(spec) if split == "test" => spec.test_splits.iter().map(|s| s.to_string()).collect(),
        _ => vec![split.to_string()],
    }
}

/// Checks a file name from an annotation stays inside its folder (no absolute path, no `..`).
pub fn check_relative(name: &str) -> Result<()> {
    let bad = name.starts_with('/')
        || name.starts_with('\\')
        || name.contains(':')
        || name.split(['/', '\\']).any(|part| part == "..");
    if bad {
        return Err(Error::Input(format!(
            "`{name}` points outside the dataset folder"
        )));
    }
    Ok(())
}

/// Where an entry's image or mask lives: `<dir>/<name>`, else (CAMUS's layout)
/// `<dir>/<split>/<name>`, with val images kept under `train/`.
#[cfg(feature = "std")]
pub fn locate(dir: &std::path::Path, split: &str, name: &str) -> Result<std::path::PathBuf> {
    check_relative(name)?;
    let direct = dir.join(name);
    if direct.is_file() {
        return Ok(direct);
    }
    let mut tried = vec![direct];
    let subdirs: &[&str] = if split == "val" {
        &["val", "train"]
    } else {
        &[split]
    };
    for sub in subdirs {
        let path = dir.join(sub).join(name);
        if path.is_file() {
            return Ok(path);
        }
        tried.push(path);
    }
    Err(Error::Input(format!(
        "{} not found",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )))
}

/// An entry's image and binarised mask (> 127) from `<dataset_dir>/images` and `/masks`,
/// checked to have the same size; errors name the files.
#[cfg(feature = "std")]
pub fn read_sample(
    dataset_dir: &std::path::Path,
    split: &str,
    entry: &Entry,
) -> Result<(image::RgbImage, Vec<u8>)> {
    let image_path = locate(&dataset_dir.join("images"), split, &entry.img_name)
        .map_err(|e| Error::Input(format!("image: {e}")))?;
    let mask_path = locate(&dataset_dir.join("masks"), split, &entry.mask_name)
        .map_err(|e| Error::Input(format!("mask: {e}")))?;
    // Errors name the file (read errors already do).
    let named = |p: &std::path::Path, e: Error| match e {
        Error::Io { .. } => e,
        e => Error::Input(format!("{}: {e}", p.display())),
    };
    let image = decode_image(&image_path, entry).map_err(|e| named(&image_path, e))?;
    let (w, h, mask) = decode_mask(&mask_path, entry).map_err(|e| named(&mask_path, e))?;
    if (w, h) != image.dimensions() {
        return Err(Error::Input(format!(
            "mask {} is {w}×{h} but image {} is {}×{}",
            mask_path.display(),
            image_path.display(),
            image.width(),
            image.height()
        )));
    }
    Ok((image, mask))
}

/// An image file, or (with clinical support) the entry's picture of a DICOM file or NIfTI
/// volume through its window.
#[cfg(feature = "std")]
fn decode_image(path: &std::path::Path, entry: &Entry) -> Result<image::RgbImage> {
    #[cfg(feature = "clinical")]
    if let Some((file, slice)) = clinical_picture(path, entry)? {
        return file.render(slice, entry.window.unwrap_or(Window::File));
    }
    if entry.slice.is_some() {
        return Err(Error::Input(format!(
            "the entry names slice {:?} of an image that is not a DICOM file or NIfTI volume",
            entry.slice.map(|s| s.to_string())
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    crate::preprocess::decode_rgb(&bytes)
}

/// A mask image (foreground where grey > 127), or (with clinical support) the entry's
/// picture of a DICOM or NIfTI label file (foreground where its value is above 0, as label
/// images store it).
#[cfg(feature = "std")]
fn decode_mask(path: &std::path::Path, entry: &Entry) -> Result<(u32, u32, Vec<u8>)> {
    #[cfg(feature = "clinical")]
    if let Some((file, slice)) = clinical_picture(path, entry)? {
        return file.label_mask(slice);
    }
    #[cfg(not(feature = "clinical"))]
    let _ = entry;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    crate::preprocess::decode_mask(&bytes)
}

/// For a DICOM file or NIfTI volume: the parsed file (the last one read is kept per
/// thread, as a volume's slices are consecutive entries) and the entry's picture.
#[cfg(feature = "clinical")]
fn clinical_picture(
    path: &std::path::Path,
    entry: &Entry,
) -> Result<Option<(std::rc::Rc<crate::clinical::ClinicalImage>, Slice)>> {
    use std::cell::RefCell;
    use std::io::Read;
    use std::rc::Rc;

    use crate::clinical::{ClinicalImage, Kind};

    type Cached = (std::path::PathBuf, std::time::SystemTime, Rc<ClinicalImage>);
    thread_local! {
        // Two: an entry's image and its mask.
        static RECENT: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
    }
    let mut head = [0u8; 352];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| Error::io(path, e))?;
    let Some(kind) = crate::clinical::sniff(&head[..n]) else {
        return Ok(None);
    };
    let slice = match (entry.slice, kind) {
        (Some(slice), _) => slice,
        (None, Kind::Dicom) => Slice {
            plane: None,
            index: 0,
        },
        (None, Kind::Nifti) => {
            return Err(Error::Input(
                "a NIfTI volume: the entry must name its slice (\"slice\": \"axial:42\"; \
                 `vlsm prompts` writes one entry per slice)"
                    .into(),
            ));
        }
    };
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|e| Error::io(path, e))?;
    let cached = RECENT.with(|r| {
        r.borrow()
            .iter()
            .find(|c| c.0 == path && c.1 == modified)
            .map(|c| c.2.clone())
    });
    let file = match cached {
        Some(file) => file,
        None => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            let file = Rc::new(ClinicalImage::read(&bytes, crate::nifti::MAX_VOXELS)?);
            RECENT.with(|r| {
                let mut r = r.borrow_mut();
                r.retain(|c| c.0 != path);
                r.insert(0, (path.to_path_buf(), modified, file.clone()));
                r.truncate(2);
            });
            file
        }
    };
    Ok(Some((file, slice)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_lists_and_extra_keys_parse() {
        let json = br#"[
            {"bbox": [1, 2, 3, 4], "cat": 0, "img_name": "a.jpg", "mask_name": "a.jpg",
             "prompts": {"p0": "", "p1": "polyp", "p7": ["x", "y"]}, "sentences_num": 1},
            {"img_name": "b.png", "mask_name": "mask_1/b.png", "prompts": {"p1": ["L", "R"]}}
        ]"#;
        let (entries, bad) = parse_annotations(json, "t.json").unwrap();
        assert!(bad.is_empty());
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].prompts["p1"].texts(), ["polyp"]);
        assert_eq!(entries[0].prompts["p7"].texts(), ["x", "y"]);
        assert_eq!(entries[1].mask_name, "mask_1/b.png");
    }

    #[test]
    fn a_bad_entry_is_reported_with_its_index_and_the_rest_kept() {
        let json = br#"[
            {"img_name": "a", "mask_name": "a", "prompts": {}},
            {"img_name": "b", "prompts": {}},
            {"img_name": "c", "mask_name": "c", "prompts": {"p1": 3}},
            {"img_name": "", "mask_name": "d", "prompts": {}}
        ]"#;
        let (entries, bad) = parse_annotations(json, "t.json").unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(bad.iter().map(|b| b.index).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(bad[0].message.contains("mask_name"), "{}", bad[0].message);
        let err = parse_annotations(b"{}", "x.json").unwrap_err().to_string();
        assert!(err.contains("x.json"), "{err}");
    }

    #[test]
    fn list_prompts_all_or_seeded() {
        let list = PromptValue::List(vec!["a".into(), "b".into(), "c".into()]);
        assert_eq!(ListPrompts::All.members(&list, "k"), [0, 1, 2]);
        assert_eq!(
            ListPrompts::All.members(&PromptValue::Text("x".into()), "k"),
            [0]
        );
        let r = ListPrompts::Random { seed: 42 };
        assert_eq!(r.members(&list, "img1/p7"), r.members(&list, "img1/p7"));
        let picks: std::collections::BTreeSet<usize> = (0..50)
            .map(|i| r.members(&list, &format!("img{i}/p7"))[0])
            .collect();
        assert_eq!(picks.len(), 3, "all members get picked over 50 images");
        assert!(
            ListPrompts::All
                .members(&PromptValue::List(vec![]), "k")
                .is_empty()
        );
    }

    #[test]
    fn prompt_ids_and_splits() {
        let (entries, _) = parse_annotations(
            br#"[{"img_name": "a", "mask_name": "a", "prompts": {"p10": "", "p2": "x", "p1": "y"}}]"#,
            "t",
        )
        .unwrap();
        assert_eq!(prompt_ids("mine", &entries), ["p1", "p2", "p10"]);
        assert_eq!(prompt_ids("busi", &entries).len(), 7);
        assert_eq!(splits_for("colondb_polyp", "test"), ["test", "train"]);
        assert_eq!(splits_for("colondb_polyp", "val"), ["val"]);
        assert_eq!(splits_for("mine", "test"), ["test"]);
        assert!(check_relative("mask_1/a.png").is_ok());
        for bad in ["../x.png", "/etc/passwd", "a/../../b", "C:\\x"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn study_rules() {
        assert_eq!(study_dataset("camus").unwrap().prompt_ids().len(), 8);
        assert_eq!(
            study_dataset("busi").unwrap().prompt_ids().last().unwrap(),
            "p6"
        );
        assert_eq!(
            study_dataset("etis_polyp").unwrap().test_splits,
            ["test", "train"]
        );
        assert_eq!(study_dataset("kvasir_polyp").unwrap().test_splits, ["test"]);
        assert!(study_dataset("my_data").is_none());
    }
}
