//! medvlsm's datasets: the annotation JSON as it is (`<root>/<dataset>/anns/<split>.json`,
//! one object per image–mask–target with `img_name`, `mask_name`, `prompts`), and the rules
//! of the 11 study datasets (reference §2–3): which prompt ids each has, and which splits
//! make up its evaluation set.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{Error, Result};

/// A prompt value: one string, or a list (p7–p9, and the radiology pairs) of which medvlsm
/// picks one at random per sample.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
            Ok(entry) => entries.push(entry),
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
