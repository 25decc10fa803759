//! vlsm's metrics against MONAI's on the cases of `tools/metrics_reference.py`
//! (tests/fixtures/metrics/monai_reference.json): Dice, IoU, HD95, Hausdorff and NSD at three
//! tolerances, including the empty-mask conventions.

use serde_json::Value;
use vlsm::metrics::{Boundary, Overlap};
use vlsm_tests::fixture;

fn mask(rows: &Value) -> (usize, usize, Vec<u8>) {
    let rows: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let bytes = rows
        .iter()
        .flat_map(|r| r.bytes().map(|b| u8::from(b == b'1')))
        .collect();
    (rows[0].len(), rows.len(), bytes)
}

fn number(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "nan" => f64::NAN,
        Value::String(s) if s == "inf" => f64::INFINITY,
        v => v.as_f64().unwrap(),
    }
}

fn same(name: &str, what: &str, ours: f64, monai: f64) {
    // MONAI computes distances and quantiles in float32.
    let ok = ours == monai
        || (ours.is_nan() && monai.is_nan())
        || (ours - monai).abs() <= 1e-5 * monai.abs().max(1.0);
    assert!(ok, "{name}: {what} is {ours}, MONAI gives {monai}");
}

#[test]
fn metrics_equal_monai() {
    let path = fixture("metrics/monai_reference.json");
    let reference: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let tolerances: Vec<f64> = reference["tolerances"]
        .as_array()
        .unwrap()
        .iter()
        .map(number)
        .collect();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 18);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (w, h, pred) = mask(&case["prediction"]);
        let (_, _, truth) = mask(&case["truth"]);
        let overlap = Overlap::of(&pred, &truth).unwrap();
        same(name, "dice", overlap.dice(), number(&case["dice"]));
        same(name, "iou", overlap.iou(), number(&case["iou"]));
        for (tolerance, nsd) in tolerances.iter().zip(case["nsd"].as_array().unwrap()) {
            let b = Boundary::of(&pred, &truth, w, h, *tolerance).unwrap();
            same(name, "hd95", b.hd95, number(&case["hd95"]));
            same(name, "hd", b.hd, number(&case["hd"]));
            same(name, &format!("nsd@{tolerance}"), b.nsd, number(nsd));
        }
    }
}
