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

/// How a model's logits in bf16 or from int8 weights compare with its f32 logits on one
/// image and some prompts.
#[derive(Debug)]
pub struct Agreement {
    /// Largest |Δlogit| over every prompt and pixel.
    pub max_abs: f32,
    /// That over the largest |logit| in f32.
    pub relative: f32,
    /// Share of model-resolution mask pixels (at `threshold`) that agree.
    pub mask_agreement: f64,
}

/// Runs `seg` in f32 and again with its block linears in bf16 (on a clone) and compares;
/// asserts the bf16 linears were really in use (the logits differ, the q projection of the
/// first layer found is stored in bf16). `None` on a CPU without AVX-512 BF16.
pub fn bf16_agreement(
    seg: &vlsm::Segmenter,
    image: &image::RgbImage,
    prompts: &[&str],
    threshold: f32,
) -> Option<Agreement> {
    if !vlsm::gemm_bf16::available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return None;
    }
    let bf16 = vlsm::Segmenter::new(seg.model.clone(), seg.pipeline.clone(), &seg.device)
        .with_precision(vlsm::Precision::Bf16)
        .unwrap();
    let a = agreement(seg, &bf16, image, prompts, threshold);
    assert!(
        a.max_abs > 0.0,
        "bf16 logits equal f32's: the bf16 path did not run"
    );
    Some(a)
}

/// `other`'s logits against `reference`'s on one image and some prompts.
pub fn agreement(
    reference: &vlsm::Segmenter,
    other: &vlsm::Segmenter,
    image: &image::RgbImage,
    prompts: &[&str],
    threshold: f32,
) -> Agreement {
    let run = |s: &vlsm::Segmenter| s.decode(&s.encode_image(image).unwrap(), prompts).unwrap();
    let (want, got) = (run(reference), run(other));
    let (mut max_abs, mut largest, mut agree, mut total) = (0f32, 0f32, 0usize, 0usize);
    for (a, b) in want.iter().zip(&got) {
        max_abs = max_abs.max(max_abs_diff(&a.values, &b.values));
        largest = a.values.iter().fold(largest, |m, v| m.max(v.abs()));
        let (ma, mb) = (a.mask(threshold), b.mask(threshold));
        agree += ma.iter().zip(&mb).filter(|(x, y)| x == y).count();
        total += ma.len();
    }
    Agreement {
        max_abs,
        relative: max_abs / largest,
        mask_agreement: agree as f64 / total as f64,
    }
}

/// A copy of a model folder whose `model.safetensors` stores its weights in int8 (what `vlsm
/// convert --int8` writes); every other file is copied as it is.
pub fn int8_copy(folder: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if path.is_file() && name != "model.safetensors" {
            std::fs::copy(&path, out.path().join(name)).unwrap();
        }
    }
    let weights =
        vlsm::weights::Weights::from_safetensors_file(&folder.join("model.safetensors")).unwrap();
    let tensors: Vec<_> = weights
        .keys()
        .map(|key| {
            let shape = weights.shape(key).unwrap().to_vec();
            let values = weights.read_f32(key, &shape).unwrap();
            (key.to_string(), shape, values)
        })
        .collect();
    let bytes = vlsm::weights::write_safetensors(&tensors, vlsm::weights::Storage::Int8).unwrap();
    std::fs::write(out.path().join("model.safetensors"), bytes).unwrap();
    out
}

/// A float64 `.npy` (little endian, C order), as numpy saves it: its shape and values.
pub fn read_npy_f64(path: &Path) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("an ASCII header");
    assert!(
        header.contains("'descr': '<f8'") && header.contains("'fortran_order': False"),
        "{}: not little-endian float64 in C order",
        path.display()
    );
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .expect("a shape");
    let shape = shape_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().expect("a dimension"))
        .collect();
    let values = bytes[10 + header_len..]
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    (shape, values)
}

/// A model folder holding a `model.safetensors`, loaded as the page loads it: the weights
/// arrive in chunks of `chunk` bytes into a [`vlsm::weights::SafetensorsStream`] (never held
/// whole), the other files from the folder.
pub fn load_streamed(dir: &Path, chunk: usize) -> vlsm::Segmenter {
    let files = vlsm::files::DirFiles::read(dir).unwrap();
    let pipeline = vlsm::Pipeline::from_files(&files.model_files()).unwrap();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let mut stream =
        vlsm::weights::SafetensorsStream::new("model.safetensors", Some(bytes.len() as u64));
    for part in bytes.chunks(chunk) {
        stream.push(part).unwrap();
    }
    let weights = stream.finish().unwrap();
    vlsm::Segmenter::from_weights(pipeline, &weights, &vlsm::burn::tensor::Device::flex()).unwrap()
}
