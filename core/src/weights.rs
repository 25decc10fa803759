//! Checkpoint tensors by their Hugging Face names: safetensors (from bytes or a file) and,
//! natively, PyTorch `.bin` files. Modules ask for a tensor by key and shape; a missing key or
//! a shape mismatch is an error naming the key and both shapes, and keys nobody asked for are
//! reported by [`Weights::check_unused`].

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};

mod stream;
pub use stream::SafetensorsStream;

/// Where a Lightning checkpoint keeps the model's tensors (pytorch-reader flattens nested
/// dicts with dots).
#[cfg(feature = "pytorch")]
const LIGHTNING_STATE_DICT: &str = "state_dict.";

/// Element types a checkpoint may store weights in: floats, or int8 with a float scale per
/// index of the first dimension in `<key>_scale` (what `vlsm convert --int8` writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I8,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::I8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// Where a tensor's bytes live until a module asks for them.
enum Bytes<'a> {
    /// Little-endian bytes inside a safetensors buffer.
    Borrowed(&'a [u8]),
    /// A `.bin` tensor, read (native-endian) on demand.
    #[cfg(feature = "pytorch")]
    Lazy(pytorch_reader::Tensor),
    /// Little-endian bytes at an offset of the weights' safetensors file, read on demand.
    #[cfg(feature = "std")]
    InFile { offset: u64, len: usize },
    /// Little-endian bytes received by a [`SafetensorsStream`], given up to the module that
    /// reads them (`None` afterwards), so loading frees the file as the model grows.
    Streamed(RefCell<Option<stream::Streamed>>),
}

struct Entry<'a> {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Bytes<'a>,
}

/// A checkpoint's tensors, keyed by their names in the file.
pub struct Weights<'a> {
    entries: BTreeMap<String, Entry<'a>>,
    /// Tensors of a non-float type (`position_ids`, …), by name: their type, to name it if a
    /// module asks for one.
    non_float: BTreeMap<String, String>,
    /// The safetensors file [`Bytes::InFile`] entries are read from.
    #[cfg(feature = "std")]
    file: Option<RefCell<std::fs::File>>,
    /// Set for [`Weights::random`]: every requested tensor is made up from this seed.
    random_seed: Option<u64>,
    /// With `random_seed`: PyTorch's default initialisation instead of test values.
    fresh: bool,
    used: RefCell<BTreeSet<String>>,
    /// What the checkpoint is called in error messages.
    source: String,
    /// Read for bf16 inference: transformer layers store their attention and MLP linears in
    /// bf16 as they load ([`crate::model::layers::in_load_precision`]).
    bf16_block_linears: bool,
}

impl<'a> Weights<'a> {
    /// Reads the header of a safetensors buffer; tensor bytes stay borrowed until used. The
    /// `safetensors` crate validates it: offsets contiguous from 0, not overlapping, in
    /// bounds, each tensor's byte length its shape's (in checked arithmetic).
    pub fn from_safetensors(bytes: &'a [u8], source: &str) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Weights(format!("{source}: not a valid safetensors file ({e})")))?;
        let mut entries = BTreeMap::new();
        let mut non_float = BTreeMap::new();
        for (name, view) in st.tensors() {
            let Some(dtype) = float_dtype(view.dtype()) else {
                non_float.insert(name, format!("{:?}", view.dtype()));
                continue;
            };
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape: view.shape().to_vec(),
                    bytes: Bytes::Borrowed(view.data()),
                },
            );
        }
        let mut weights = Self::new(entries, source);
        weights.non_float = non_float;
        Ok(weights)
    }

    /// Opens a PyTorch `torch.save` checkpoint (`pytorch_model.bin`); tensors are read lazily.
    #[cfg(feature = "pytorch")]
    pub fn from_pytorch_file(path: &std::path::Path) -> Result<Weights<'static>> {
        let source = path.display().to_string();
        crate::pickle_guard::check_checkpoint(path)?;
        let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| {
            Error::Weights(format!("{source}: not a readable PyTorch checkpoint ({e})"))
        })?;
        let mut entries = BTreeMap::new();
        let mut non_float = BTreeMap::new();
        for (name, tensor) in reader.into_tensors() {
            let dtype = match tensor.dtype() {
                pytorch_reader::DType::F32 => DType::F32,
                pytorch_reader::DType::F16 => DType::F16,
                pytorch_reader::DType::BF16 => DType::BF16,
                pytorch_reader::DType::F64 => DType::F64,
                other => {
                    non_float.insert(name, format!("{other:?}"));
                    continue;
                }
            };
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape: tensor.shape().to_vec(),
                    bytes: Bytes::Lazy(tensor),
                },
            );
        }
        // A training checkpoint (Lightning's `best.ckpt`) holds the weights under
        // `state_dict`, beside optimizer state and hyper-parameters: keep `state_dict` only.
        if entries.keys().any(|k| k.starts_with(LIGHTNING_STATE_DICT)) {
            fn strip<V>(map: BTreeMap<String, V>) -> BTreeMap<String, V> {
                map.into_iter()
                    .filter_map(|(k, v)| {
                        k.strip_prefix(LIGHTNING_STATE_DICT)
                            .map(|rest| (rest.to_string(), v))
                    })
                    .collect()
            }
            entries = strip(entries);
            non_float = strip(non_float);
        }
        let mut weights = Weights::new(entries, &source);
        weights.non_float = non_float;
        Ok(weights)
    }

    /// Opens a safetensors file and reads its header; each tensor is read from the file when
    /// a module asks for it, so loading never holds the whole file in memory, and tensors
    /// nobody asks for are never read.
    #[cfg(feature = "std")]
    pub fn from_safetensors_file(path: &std::path::Path) -> Result<Weights<'static>> {
        use std::io::Read;
        let source = path.display().to_string();
        let invalid =
            |why: String| Error::Weights(format!("{source}: not a valid safetensors file ({why})"));
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|_| invalid("shorter than its header".into()))?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > stream::MAX_HEADER_BYTES || 8 + header_len > file_len {
            return Err(invalid(format!(
                "header length {header_len} does not fit the file"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| invalid(e.to_string()))?;
        // The reference crate's own validation of the header (see `from_safetensors`).
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| invalid(format!("header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = metadata.data_len() as u64;
        if data_start + data_len != file_len {
            return Err(invalid(format!(
                "the header describes {data_len} bytes of tensors, the file holds {} (truncated or padded?)",
                file_len.saturating_sub(data_start)
            )));
        }
        let mut entries = BTreeMap::new();
        let mut non_float = BTreeMap::new();
        for (name, info) in metadata.tensors() {
            let Some(dtype) = float_dtype(info.dtype) else {
                non_float.insert(name, format!("{:?}", info.dtype));
                continue;
            };
            let (begin, end) = info.data_offsets;
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape: info.shape.clone(),
                    bytes: Bytes::InFile {
                        offset: data_start + begin as u64,
                        len: end - begin,
                    },
                },
            );
        }
        let mut weights = Weights::new(entries, &source);
        weights.non_float = non_float;
        weights.file = Some(RefCell::new(file));
        Ok(weights)
    }

    fn new(entries: BTreeMap<String, Entry<'a>>, source: &str) -> Self {
        Self {
            entries,
            non_float: BTreeMap::new(),
            #[cfg(feature = "std")]
            file: None,
            random_seed: None,
            fresh: false,
            used: RefCell::new(BTreeSet::new()),
            source: source.to_string(),
            bf16_block_linears: false,
        }
    }

    /// Whether transformer layers loaded from here store their attention and MLP linears in
    /// bf16 (see [`crate::Precision::Bf16`]); off unless set.
    pub fn bf16_block_linears(&self) -> bool {
        self.bf16_block_linears
    }

    pub fn set_bf16_block_linears(&mut self, on: bool) {
        self.bf16_block_linears = on;
    }

    /// A stand-in checkpoint that answers every request with deterministic random values of
    /// the requested shape (norm weights near 1, everything else small). For speed
    /// measurements, where weight values do not matter; never for results.
    /// Freshly initialised weights as PyTorch's modules start (see [`fresh_values`]): what
    /// BiomedCLIPSeg's decoder is before training.
    pub fn fresh(seed: u64) -> Weights<'static> {
        let mut w = Self::random(seed);
        w.fresh = true;
        w
    }

    pub fn random(seed: u64) -> Weights<'static> {
        let mut w = Weights::new(BTreeMap::new(), "random weights");
        w.random_seed = Some(seed);
        w
    }

    /// What the checkpoint is called in error messages (its path).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether some float tensor's key starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.entries
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    /// All weight names in the checkpoint (float or int8; an int8 tensor's scales are read
    /// with it, so they are not listed).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries
            .keys()
            .map(String::as_str)
            .filter(|k| !self.is_int8_scale(k))
    }

    /// The stored shape of `key`, if present.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The stored element type of `key`, if present.
    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.entries.get(key).map(|e| e.dtype)
    }

    /// The tensor `key` as f32 values, checked against `shape`.
    pub fn read_f32(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(seed) = self.random_seed {
            return Ok(if self.fresh {
                fresh_values(seed, key, shape)
            } else {
                random_values(seed, key, shape)
            });
        }
        let entry = self.entries.get(key).ok_or_else(|| match self.non_float.get(key) {
            Some(dtype) => Error::Weights(format!(
                "{}: weight `{key}` is stored as {dtype}, not as a float type (F32, F16, BF16, F64)",
                self.source
            )),
            None => Error::Weights(format!(
                "{}: missing weight `{key}` (expected shape {shape:?})",
                self.source
            )),
        })?;
        if entry.shape != shape {
            return Err(Error::Weights(format!(
                "{}: weight `{key}` has shape {:?} in the checkpoint, but the config needs {shape:?}",
                self.source, entry.shape
            )));
        }
        self.used.borrow_mut().insert(key.to_string());
        if entry.dtype == DType::I8 {
            return self.dequantize(key, shape);
        }
        let n: usize = shape.iter().product();
        let bad_len = |got: usize| {
            Error::Weights(format!(
                "{}: weight `{key}` holds {got} bytes, {} expected",
                self.source,
                n * entry.dtype.size()
            ))
        };
        // Streamed f32 values are already what the model needs: hand them over.
        if let Bytes::Streamed(cell) = &entry.bytes {
            let mut slot = cell.borrow_mut();
            match slot.take() {
                Some(stream::Streamed::F32(values)) if values.len() == n => return Ok(values),
                other => *slot = other,
            }
        }
        let (bytes, little) = self.bytes_of(key, entry)?;
        if bytes.len() != n * entry.dtype.size() {
            return Err(bad_len(bytes.len()));
        }
        Ok(to_f32(&bytes, entry.dtype, little))
    }

    /// A tensor's stored bytes, and whether they are little-endian (else native).
    fn bytes_of<'b>(&'b self, key: &str, entry: &'b Entry<'a>) -> Result<(Cow<'b, [u8]>, bool)> {
        match &entry.bytes {
            Bytes::Borrowed(b) => Ok((Cow::Borrowed(*b), true)),
            Bytes::Streamed(cell) => match cell.borrow_mut().take() {
                Some(stream::Streamed::Raw(b)) => Ok((Cow::Owned(b), true)),
                Some(stream::Streamed::F32(v)) => Ok((
                    Cow::Owned(bytemuck::cast_slice(&v).to_vec()),
                    cfg!(target_endian = "little"),
                )),
                None => Err(Error::Weights(format!(
                    "{}: weight `{key}` was read twice from a streamed download (its bytes \
                     are freed once loaded)",
                    self.source
                ))),
            },
            #[cfg(feature = "pytorch")]
            Bytes::Lazy(t) => {
                let b = t.read().map_err(|e| {
                    Error::Weights(format!("{}: reading `{key}`: {e}", self.source))
                })?;
                Ok((Cow::Owned(b), cfg!(target_endian = "little")))
            }
            #[cfg(feature = "std")]
            Bytes::InFile { offset, len } => {
                use std::io::{Read, Seek, SeekFrom};
                let mut file = self
                    .file
                    .as_ref()
                    .expect("InFile entries come with their file")
                    .borrow_mut();
                let mut b = vec![0u8; *len];
                file.seek(SeekFrom::Start(*offset))
                    .and_then(|_| file.read_exact(&mut b))
                    .map_err(|e| {
                        Error::Weights(format!("{}: reading `{key}`: {e}", self.source))
                    })?;
                Ok((Cow::Owned(b), true))
            }
        }
    }

    /// An int8 tensor (its shape checked) as f32: each value times the scale of its index
    /// in the first dimension, read from `<key>_scale` (finite, one per index).
    fn dequantize(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let entry = &self.entries[key];
        let rows = shape.first().copied().unwrap_or(1);
        let scale_key = format!("{key}_scale");
        if !self.entries.contains_key(&scale_key) {
            return Err(Error::Weights(format!(
                "{}: weight `{key}` is int8 without its scales `{scale_key}`",
                self.source
            )));
        }
        let scales = self.read_f32(&scale_key, &[rows])?;
        if let Some(bad) = scales.iter().find(|s| !s.is_finite()) {
            return Err(Error::Weights(format!(
                "{}: `{scale_key}` holds {bad}, not a finite scale",
                self.source
            )));
        }
        let n: usize = shape.iter().product();
        let (bytes, _) = self.bytes_of(key, entry)?;
        if bytes.len() != n {
            return Err(Error::Weights(format!(
                "{}: weight `{key}` holds {} bytes, {n} expected",
                self.source,
                bytes.len()
            )));
        }
        let per_row = n / rows.max(1);
        let mut out = Vec::with_capacity(n);
        for (row, scale) in bytes.chunks(per_row.max(1)).zip(&scales) {
            out.extend(row.iter().map(|&q| f32::from(q as i8) * scale));
        }
        Ok(out)
    }

    /// Whether `key` is the scales of an int8 tensor (read with it, not on its own).
    pub fn is_int8_scale(&self, key: &str) -> bool {
        key.strip_suffix("_scale")
            .is_some_and(|base| self.dtype(base) == Some(DType::I8))
    }

    /// The tensor `key` on `device`, checked against `shape`.
    pub fn tensor<const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Tensor<D>> {
        let values = self.read_f32(key, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// A parameter (see [`Self::tensor`]).
    pub fn param<const D: usize>(
        &self,
        key: &str,
        shape: [usize; D],
        device: &Device,
    ) -> Result<Param<Tensor<D>>> {
        Ok(Param::from_tensor(self.tensor(key, shape, device)?))
    }

    /// A PyTorch `nn.Linear` weight (`[out, in]`) transposed to burn's `[in, out]`.
    pub fn linear_weight(
        &self,
        key: &str,
        d_in: usize,
        d_out: usize,
        device: &Device,
    ) -> Result<Param<Tensor<2>>> {
        let w = self.read_f32(key, &[d_out, d_in])?;
        let t = transpose(&w, d_out, d_in);
        Ok(Param::from_tensor(Tensor::from_data(
            TensorData::new(t, [d_in, d_out]),
            device,
        )))
    }

    /// Fails if the checkpoint holds a tensor that no module read and that `ignorable` does
    /// not excuse: such a key means the checkpoint and the config disagree.
    pub fn check_unused(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let used = self.used.borrow();
        let unused: Vec<&str> = self
            .entries
            .keys()
            .filter(|k| !used.contains(*k) && !ignorable(k))
            .map(String::as_str)
            .collect();
        match unused.as_slice() {
            [] => Ok(()),
            [first, ..] => Err(Error::Weights(format!(
                "{}: unexpected weight `{first}` with shape {:?}{} — the checkpoint does not match its config",
                self.source,
                self.entries[*first].shape,
                if unused.len() > 1 {
                    format!(" (and {} more)", unused.len() - 1)
                } else {
                    String::new()
                }
            ))),
        }
    }
}

/// The types weights are read from; `None` for other integer and boolean tensors.
fn float_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    match dtype {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F64 => Some(DType::F64),
        safetensors::Dtype::I8 => Some(DType::I8),
        _ => None,
    }
}

/// The transpose of a row-major `rows`×`cols` matrix, in cache-sized tiles (a naive
/// transpose of the 2.4M-element weights strides through memory and dominated loading).
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut t = vec![0f32; m.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    t[c * rows + r] = m[r * cols + c];
                }
            }
        }
    }
    t
}

/// PyTorch's default initialisation, deterministic from `seed`: LayerNorm scale 1 and shift
/// 0, other biases 0, weights uniform in ±1/√fan_in (`kaiming_uniform_(a=√5)`), fan_in
/// being `shape[1]` times the kernel size, as `torch.nn.init` computes it.
fn fresh_values(seed: u64, key: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let norm = key.contains("norm");
    if key.ends_with(".bias") || (norm && !key.ends_with(".weight")) {
        return vec![0.0; n];
    }
    if norm {
        return vec![1.0; n];
    }
    let fan_in = shape.get(1).copied().unwrap_or(1) * shape.iter().skip(2).product::<usize>();
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    random_values(seed, key, shape)
        .into_iter()
        .map(|v| v * 20.0 * bound)
        .collect()
}

fn random_values(seed: u64, key: &str, shape: &[usize]) -> Vec<f32> {
    // splitmix64 over (seed, key): deterministic per tensor.
    let mut state = key.bytes().fold(seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    });
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let is_norm_scale = key.contains("norm") && key.ends_with(".weight");
    let n: usize = shape.iter().product();
    (0..n)
        .map(|_| {
            if is_norm_scale {
                1.0 + 0.1 * next()
            } else {
                0.1 * next()
            }
        })
        .collect()
}

/// Converts raw float bytes to f32 (`little`: the bytes are little-endian, else native).
fn to_f32(bytes: &[u8], dtype: DType, little: bool) -> Vec<f32> {
    let arr2 = |c: &[u8]| [c[0], c[1]];
    let u16_of = |c: &[u8]| {
        if little {
            u16::from_le_bytes(arr2(c))
        } else {
            u16::from_ne_bytes(arr2(c))
        }
    };
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| {
                let a = [c[0], c[1], c[2], c[3]];
                if little {
                    f32::from_le_bytes(a)
                } else {
                    f32::from_ne_bytes(a)
                }
            })
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|c| {
                let a: [u8; 8] = c.try_into().expect("chunks of 8");
                (if little {
                    f64::from_le_bytes(a)
                } else {
                    f64::from_ne_bytes(a)
                }) as f32
            })
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16_of(c)).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16_of(c)).to_f32())
            .collect(),
        // Unscaled: `Weights::dequantize` applies the scales.
        DType::I8 => bytes.iter().map(|&q| f32::from(q as i8)).collect(),
    }
}

/// How `write_safetensors` stores f32 tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    F32,
    /// float16: half the size.
    F16,
    /// Weights (`*.weight` with two or more dimensions: linears, convolutions, embeddings)
    /// as symmetric int8 with one f32 scale per index of the first dimension (a linear's
    /// or convolution's output channel, an embedding's row) in `<key>_scale`: a quarter of
    /// the size. Biases, norms and other small tensors stay f32.
    Int8,
}

impl Storage {
    /// float16 with `fp16`, else float32.
    pub fn f16_if(fp16: bool) -> Self {
        if fp16 { Storage::F16 } else { Storage::F32 }
    }

    pub fn name(self) -> &'static str {
        match self {
            Storage::F32 => "float32",
            Storage::F16 => "float16",
            Storage::Int8 => "int8 per channel",
        }
    }
}

/// A tensor stored as int8 under [`Storage::Int8`].
fn quantized(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight") && shape.len() >= 2 && shape.iter().product::<usize>() >= 256
}

/// Symmetric int8 per index of the first dimension: the values (as bytes) and the scales.
pub fn quantize_int8(values: &[f32], rows: usize) -> (Vec<u8>, Vec<f32>) {
    let per_row = values.len() / rows.max(1);
    let mut q = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(rows);
    for row in values.chunks(per_row.max(1)) {
        let largest = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = largest / 127.0;
        scales.push(scale);
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        q.extend(
            row.iter()
                .map(|v| ((v * inv).round().clamp(-127.0, 127.0) as i8) as u8),
        );
    }
    (q, scales)
}

/// Writes f32 tensors as a safetensors file, stored as `storage` says.
pub fn write_safetensors(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    storage: Storage,
) -> Result<Vec<u8>> {
    let f32_bytes = |values: &[f32]| {
        // Sized up front and filled element by element: a `flat_map(..).collect()` grows
        // byte by byte, which took seconds on a full-size model.
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes
    };
    let mut encoded: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, values) in tensors {
        match storage {
            Storage::F32 => encoded.push((
                name.clone(),
                safetensors::Dtype::F32,
                shape.clone(),
                f32_bytes(values),
            )),
            Storage::F16 => {
                let mut bytes = Vec::with_capacity(values.len() * 2);
                for v in values {
                    bytes.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
                encoded.push((name.clone(), safetensors::Dtype::F16, shape.clone(), bytes));
            }
            Storage::Int8 if quantized(name, shape) => {
                let (q, scales) = quantize_int8(values, shape[0]);
                encoded.push((name.clone(), safetensors::Dtype::I8, shape.clone(), q));
                let scale_bytes = f32_bytes(&scales);
                encoded.push((
                    format!("{name}_scale"),
                    safetensors::Dtype::F32,
                    vec![shape[0]],
                    scale_bytes,
                ));
            }
            Storage::Int8 => encoded.push((
                name.clone(),
                safetensors::Dtype::F32,
                shape.clone(),
                f32_bytes(values),
            )),
        }
    }
    let views = encoded
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Weights(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    if storage == Storage::Int8 {
        metadata.insert(
            "vlsm_quantization".to_string(),
            "int8 symmetric per index of dim 0; scales in <name>_scale".to_string(),
        );
    }
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Weights(format!("writing safetensors: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_weights_round_trip_within_half_a_step() {
        let weight: Vec<f32> = (0..24 * 40)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut weight_rows = weight.clone();
        weight_rows[40..80].fill(0.0); // an all-zero channel
        let bias: Vec<f32> = (0..24).map(|i| i as f32 * 0.1).collect();
        let tensors = vec![
            ("l.weight".to_string(), vec![24, 40], weight_rows.clone()),
            ("l.bias".to_string(), vec![24], bias.clone()),
        ];
        let bytes = write_safetensors(&tensors, Storage::Int8).unwrap();
        let w = Weights::from_safetensors(&bytes, "int8").unwrap();
        assert_eq!(w.keys().collect::<Vec<_>>(), ["l.bias", "l.weight"]);
        assert_eq!(w.dtype("l.weight"), Some(DType::I8));
        assert_eq!(w.read_f32("l.bias", &[24]).unwrap(), bias);
        let got = w.read_f32("l.weight", &[24, 40]).unwrap();
        for (row, (got, want)) in got.chunks(40).zip(weight_rows.chunks(40)).enumerate() {
            let step = want.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (g, v) in got.iter().zip(want) {
                assert!((g - v).abs() <= step * 0.5 + 1e-6, "row {row}: {g} vs {v}");
            }
        }
        assert_eq!(&got[40..80], &[0.0; 40]);
        w.check_unused(|_| false).unwrap();
        // A quarter of the float32 size, plus the scales.
        assert!(
            bytes.len() < 24 * 40 + 24 * 4 * 2 + 400,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn int8_weights_need_finite_scales_of_their_shape() {
        let int8 = |scale: Option<(Vec<usize>, Vec<f32>)>| {
            let q: Vec<u8> = vec![1; 6];
            let mut views = vec![(
                "a.weight".to_string(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::I8, vec![2, 3], &q)
                    .unwrap(),
            )];
            let scale_bytes: Vec<u8> = scale
                .as_ref()
                .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
                .unwrap_or_default();
            if let Some((shape, _)) = &scale {
                views.push((
                    "a.weight_scale".to_string(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        &scale_bytes,
                    )
                    .unwrap(),
                ));
            }
            let bytes = safetensors::serialize(views, None).unwrap();
            let w = Weights::from_safetensors(&bytes, "int8.safetensors").unwrap();
            w.read_f32("a.weight", &[2, 3]).map_err(|e| e.to_string())
        };
        assert_eq!(
            int8(Some((vec![2], vec![0.5, 2.0]))).unwrap(),
            [0.5, 0.5, 0.5, 2.0, 2.0, 2.0]
        );
        let e = int8(None).unwrap_err();
        assert!(
            e.contains("int8 without its scales `a.weight_scale`"),
            "{e}"
        );
        let e = int8(Some((vec![3], vec![1.0; 3]))).unwrap_err();
        assert!(e.contains("`a.weight_scale` has shape [3]"), "{e}");
        let e = int8(Some((vec![2], vec![1.0, f32::NAN]))).unwrap_err();
        assert!(e.contains("not a finite scale"), "{e}");
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        let m: Vec<f32> = (0..70 * 45).map(|i| i as f32).collect();
        let t = transpose(&m, 70, 45);
        for r in 0..70 {
            for c in 0..45 {
                assert_eq!(t[c * 70 + r], m[r * 45 + c]);
            }
        }
    }

    #[test]
    fn half_precision_bytes_convert_exactly() {
        let values = [1.5f32, -2.25, 0.0, 65504.0];
        let f16: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(to_f32(&f16, DType::F16, true), values);
        let bf16: Vec<u8> = values[..3]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(to_f32(&bf16, DType::BF16, true), values[..3]);
    }

    #[test]
    fn missing_and_mismatched_keys_are_named() {
        let bytes = write_safetensors(
            &[("a.weight".into(), vec![2, 3], vec![0.0; 6])],
            Storage::F32,
        )
        .unwrap();
        let w = Weights::from_safetensors(&bytes, "test").unwrap();
        let e = w.read_f32("b.weight", &[2, 3]).unwrap_err().to_string();
        assert!(e.contains("missing weight `b.weight`"), "{e}");
        let e = w.read_f32("a.weight", &[3, 2]).unwrap_err().to_string();
        assert!(
            e.contains("`a.weight` has shape [2, 3]") && e.contains("[3, 2]"),
            "{e}"
        );
        assert!(
            w.check_unused(|_| false)
                .unwrap_err()
                .to_string()
                .contains("unexpected weight `a.weight`")
        );
        w.read_f32("a.weight", &[2, 3]).unwrap();
        w.check_unused(|_| false).unwrap();
    }
}
