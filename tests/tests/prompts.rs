//! Size, count and location words against medvlsm's own measuring code
//! (`tools/attributes_reference.py` runs `scripts/features_from_img.py` from a medvlsm clone
//! on synthetic masks: soft rims, objects touching the border, objects without a 255 pixel,
//! empty masks).

use base64::Engine;
use serde_json::Value;
use vlsm::preprocess::decode_image;
use vlsm::prompts::mask_attributes;
use vlsm_tests::fixture;

#[test]
fn mask_attributes_equal_medvlsm() {
    let path = fixture("prompts/attributes_reference.json");
    let reference: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 100);
    let mut mismatches = Vec::new();
    for case in cases {
        let png = base64::engine::general_purpose::STANDARD
            .decode(case["png"].as_str().unwrap())
            .unwrap();
        let grey = decode_image(&png).unwrap().to_luma8();
        let (w, h) = grey.dimensions();
        let a = mask_attributes(grey.as_raw(), w as usize, h as usize);
        let expected = (
            case["count"].as_u64().unwrap() as usize,
            case["size"].as_str().unwrap(),
            case["location"].as_str().unwrap(),
        );
        if (a.count, a.size.as_str(), a.location.as_str()) != expected {
            mismatches.push(format!(
                "{}: ours {a:?}, medvlsm {expected:?}",
                case["name"]
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}
