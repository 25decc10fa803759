//! Every medvlsm annotation file in ../shared/data/medvlsm-anns parses, with the entry counts
//! of the reference's table (§2a, and the shared copy's documented corrections), and every
//! entry has the prompt ids the study evaluates for its dataset.

use vlsm::dataset::{STUDY_DATASETS, parse_annotations, study_dataset};
use vlsm_tests::shared;

/// (dataset, split, entries) as shipped in ../shared (CVC-300: the corrected 60-image test
/// list; CAMUS: no train.json).
const COUNTS: [(&str, &str, usize); 34] = [
    ("kvasir_polyp", "train", 800),
    ("kvasir_polyp", "val", 100),
    ("kvasir_polyp", "test", 100),
    ("kvasir_polyp", "testB", 100),
    ("clinicdb_polyp", "train", 490),
    ("clinicdb_polyp", "val", 61),
    ("clinicdb_polyp", "test", 61),
    ("bkai_polyp", "train", 800),
    ("bkai_polyp", "val", 100),
    ("bkai_polyp", "test", 100),
    ("cvc300_polyp", "train", 0),
    ("cvc300_polyp", "val", 0),
    ("cvc300_polyp", "test", 60),
    ("colondb_polyp", "train", 20),
    ("colondb_polyp", "val", 0),
    ("colondb_polyp", "test", 360),
    ("etis_polyp", "train", 20),
    ("etis_polyp", "val", 0),
    ("etis_polyp", "test", 176),
    ("etis_polyp", "testB", 176),
    ("isic", "train", 810),
    ("isic", "val", 90),
    ("isic", "test", 379),
    ("dfu", "train", 1600),
    ("dfu", "val", 200),
    ("dfu", "test", 200),
    ("camus", "val", 600),
    ("camus", "test", 600),
    ("busi", "train", 624),
    ("busi", "val", 78),
    ("busi", "test", 78),
    ("chexlocalize", "train", 1279),
    ("chexlocalize", "val", 446),
    ("chexlocalize", "test", 452),
];

#[test]
fn every_shared_annotation_file_parses_with_the_studys_counts_and_prompt_ids() {
    let root = shared("data/medvlsm-anns");
    let mut files = 0;
    for spec in STUDY_DATASETS {
        let anns = root.join(spec.name).join("anns");
        for entry in std::fs::read_dir(&anns).unwrap() {
            let path = entry.unwrap().path();
            let split = path.file_stem().unwrap().to_str().unwrap().to_string();
            let bytes = std::fs::read(&path).unwrap();
            let (entries, bad) = parse_annotations(&bytes, &path.display().to_string()).unwrap();
            assert!(bad.is_empty(), "{}: {bad:?}", path.display());
            let &(_, _, n) = COUNTS
                .iter()
                .find(|(d, s, _)| *d == spec.name && *s == split)
                .unwrap_or_else(|| panic!("no expected count for {}", path.display()));
            assert_eq!(entries.len(), n, "{}", path.display());
            for (i, e) in entries.iter().enumerate() {
                for id in spec.prompt_ids() {
                    let value = e
                        .prompts
                        .get(&id)
                        .unwrap_or_else(|| panic!("{} entry {i} lacks {id}", path.display()));
                    assert!(
                        !value.texts().is_empty(),
                        "{} entry {i} {id}",
                        path.display()
                    );
                }
            }
            files += 1;
        }
    }
    // 11 datasets × 3 splits, less CAMUS train, plus Kvasir and ETIS testB.
    assert_eq!(files, 34, "annotation files read");
    assert_eq!(study_dataset("chexlocalize").unwrap().prompt_count, 7);
}

#[test]
fn the_kvasir_sample_is_a_dataset_in_medvlsm_layout() {
    let root = shared("data/samples/kvasir");
    let (entries, bad) = parse_annotations(
        &std::fs::read(root.join("anns/test.json")).unwrap(),
        "test.json",
    )
    .unwrap();
    assert!(bad.is_empty());
    assert_eq!(entries.len(), 5);
    for e in &entries {
        assert!(
            root.join("images").join(&e.img_name).is_file(),
            "{}",
            e.img_name
        );
        assert!(
            root.join("masks").join(&e.mask_name).is_file(),
            "{}",
            e.mask_name
        );
        assert_eq!(e.prompts["p7"].texts().len(), 5);
    }
}
