//! Token ids equal transformers' CLIP tokenizer on every prompt in the medvlsm annotations,
//! on edge cases, and on the independent ids in ../shared/fixtures/tokenizer.

use std::collections::{BTreeSet, HashMap};

use sha2::{Digest, Sha256};
use vlsm::tokenize::{PromptTokenizer, TokenizerSettings};
use vlsm_tests::{fixture, shared};

fn from_vocab_merges() -> PromptTokenizer {
    let dir = fixture("tokenizer");
    PromptTokenizer::from_vocab_merges(
        &std::fs::read(dir.join("vocab.json")).unwrap(),
        &std::fs::read(dir.join("merges.txt")).unwrap(),
        &TokenizerSettings::default(),
        77,
    )
    .unwrap()
}

fn from_tokenizer_json() -> PromptTokenizer {
    let json = std::fs::read(shared("fixtures/tokenizer/tokenizer.json")).unwrap();
    PromptTokenizer::from_tokenizer_json(&json, &TokenizerSettings::default(), 77).unwrap()
}

fn hex16(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn ids_digest(ids: &[i64]) -> String {
    let text: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    hex16(text.join(" ").as_bytes())
}

/// Every prompt string in the medvlsm annotation files: p0–p9 values (list members
/// included) and the `sentences`.
fn medvlsm_prompts() -> BTreeSet<String> {
    let root = shared("data/medvlsm-anns");
    let mut prompts = BTreeSet::new();
    let mut files = 0;
    for dataset in std::fs::read_dir(&root).unwrap() {
        let anns = dataset.unwrap().path().join("anns");
        for file in std::fs::read_dir(&anns).unwrap() {
            let path = file.unwrap().path();
            let entries: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            files += 1;
            for entry in entries.as_array().unwrap() {
                for value in entry["prompts"]
                    .as_object()
                    .into_iter()
                    .flat_map(|m| m.values())
                {
                    match value {
                        serde_json::Value::String(s) => {
                            prompts.insert(s.clone());
                        }
                        serde_json::Value::Array(list) => {
                            prompts.extend(list.iter().map(|s| s.as_str().unwrap().to_string()));
                        }
                        other => panic!("{}: unexpected prompt {other}", path.display()),
                    }
                }
                for sentence in entry["sentences"].as_array().into_iter().flatten() {
                    prompts.insert(sentence["sent"].as_str().unwrap().to_string());
                }
            }
        }
    }
    assert!(
        files >= 30,
        "expected the 11 datasets' annotation files, found {files}"
    );
    prompts
}

#[test]
fn ids_equal_transformers_on_every_medvlsm_prompt() {
    let reference = reference_digests("tokens/medvlsm_ids.tsv");
    let prompts = medvlsm_prompts();
    assert_eq!(
        prompts.len(),
        reference.len(),
        "prompt count differs from the reference"
    );
    for (name, tokenizer) in [
        ("vocab.json+merges.txt", from_vocab_merges()),
        ("tokenizer.json", from_tokenizer_json()),
    ] {
        let mut wrong = Vec::new();
        for prompt in &prompts {
            let key = hex16(prompt.as_bytes());
            let expected = reference
                .get(&key)
                .unwrap_or_else(|| panic!("no reference for {prompt:?}"));
            let t = tokenizer.encode(prompt).unwrap();
            assert_eq!(t.ids.len(), 77);
            if &ids_digest(&t.ids) != expected {
                wrong.push(prompt.clone());
            }
        }
        assert!(
            wrong.is_empty(),
            "{name}: {} of {} prompts differ, e.g. {:?}",
            wrong.len(),
            prompts.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
}

#[test]
fn ids_equal_transformers_on_edge_cases() {
    let extra: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tokens/extra.json")).unwrap()).unwrap();
    let tokenizers = [from_vocab_merges(), from_tokenizer_json()];
    for case in extra.as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids: Vec<i64> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let mask: Vec<i64> = case["attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        for t in &tokenizers {
            let got = t.encode(prompt).unwrap();
            assert_eq!(got.ids, ids, "ids for {prompt:?}");
            assert_eq!(got.attention_mask, mask, "attention mask for {prompt:?}");
        }
    }
}

#[test]
fn long_prompts_are_truncated_keeping_end_of_text() {
    let t = from_vocab_merges();
    let got = t.encode(&"polyp ".repeat(2000)).unwrap();
    assert_eq!(got.ids.len(), 77);
    assert_eq!(got.ids[0], 49406);
    assert_eq!(got.ids[76], 49407);
    assert_eq!(got.len(), 77);
}

#[test]
fn ids_equal_the_shared_independent_reference() {
    let tokens: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shared("fixtures/tokenizer/tokens.json")).unwrap())
            .unwrap();
    let t = from_vocab_merges();
    for row in tokens["rows"].as_array().unwrap() {
        let prompt = row["prompt"].as_str().unwrap();
        let ids: Vec<i64> = row["ids_hf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let got = t.encode(prompt).unwrap();
        assert_eq!(&got.ids[..ids.len()], &ids[..], "{prompt:?}");
    }
}

/// BiomedCLIPSeg's tokenizer on the fixture vocabulary (tools/make_bert_tokens.py).
fn bert() -> PromptTokenizer {
    PromptTokenizer::from_bert_vocab(
        &std::fs::read(fixture("bert/vocab.txt")).unwrap(),
        true,
        256,
    )
    .unwrap()
}

fn reference_digests(file: &str) -> HashMap<String, String> {
    std::fs::read_to_string(fixture(file))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('\t').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn bert_ids_equal_transformers_on_every_medvlsm_prompt() {
    let reference = reference_digests("tokens/bert_medvlsm_ids.tsv");
    let prompts = medvlsm_prompts();
    assert_eq!(prompts.len(), reference.len(), "prompt count differs");
    let t = bert();
    let wrong: Vec<&String> = prompts
        .iter()
        .filter(|p| {
            let ids = t.encode(p).unwrap().ids;
            assert_eq!(ids.len(), 256);
            Some(&ids_digest(&ids)) != reference.get(&hex16(p.as_bytes()))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} prompts differ from BertTokenizer, e.g. {:?}",
        wrong.len(),
        prompts.len(),
        &wrong[..wrong.len().min(5)]
    );
}

#[test]
fn bert_ids_equal_transformers_on_edge_cases() {
    let extra: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tokens/bert_extra.json")).unwrap()).unwrap();
    let t = bert();
    let ints = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    for case in extra.as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let got = t.encode(prompt).unwrap();
        assert_eq!(got.ids, ints(&case["input_ids"]), "ids for {prompt:?}");
        assert_eq!(
            got.attention_mask,
            ints(&case["attention_mask"]),
            "attention mask for {prompt:?}"
        );
    }
}

#[test]
fn bert_vocabularies_without_their_special_tokens_are_refused() {
    let e = PromptTokenizer::from_bert_vocab(b"a\nb\n", true, 256)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vocab.txt has no `[CLS]`"), "{e}");
    assert!(PromptTokenizer::from_bert_vocab(b"\xff\xfe", true, 256).is_err());
}
