//! Shared helpers for vlsm's cross-crate tests: where fixtures live, reading reference
//! tensors, comparing floats.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use vlsm::burn::tensor::Tensor;

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `tests/fixtures/<name>`, committed with the repository.
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// `../shared/<path>` beside the checkout; tests that need it fail loudly without it.
pub fn shared(path: &str) -> PathBuf {
    let p = repo_root().join("../shared").join(path);
    assert!(
        p.exists(),
        "{} is missing: these tests need the project's shared/ folder beside the checkout",
        p.display()
    );
    p
}

/// A reference tensor file: name → (shape, f32, f64, i64 or u8 values as f64).
pub struct Reference {
    pub tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Reference {
    pub fn read(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::U8 => data.iter().map(|&b| b as f64).collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Self { tensors }
    }

    pub fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has no `{name}`"))
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        self.get(name).1.iter().map(|&v| v as f32).collect()
    }

    pub fn i64_rows(&self, name: &str) -> Vec<Vec<i64>> {
        let (shape, values) = self.get(name);
        values
            .chunks(shape[1])
            .map(|r| r.iter().map(|&v| v as i64).collect())
            .collect()
    }
}

/// Largest |a − b|; panics if the lengths differ.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A tensor's values on the host.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 tensor")
}

/// Asserts `actual` is within `tol` of `expected`, saying which tensor failed and by how much.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], tol: f32) {
    let d = max_abs_diff(actual, expected);
    assert!(d <= tol, "{what}: max |Δ| = {d:e} > {tol:e}");
}
