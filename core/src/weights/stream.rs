//! A safetensors file read as it arrives (the page's download), split into one buffer per
//! tensor, so the whole file is never held at once; the model then takes each tensor's
//! buffer as it loads it (see `Bytes::Streamed`), so the file's bytes and the model's f32
//! copy of them are not both in memory at the end of a load.

use std::cell::RefCell;
use std::collections::BTreeMap;

use super::{Bytes, DType, Entry, Weights, float_dtype};
use crate::error::{Error, Result};

/// The largest header accepted, as for files (a real one is a few hundred kilobytes).
pub(super) const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of the file, in the order of its bytes.
struct Slot {
    name: String,
    /// `None` for tensors of a non-float type: their bytes are skipped.
    dtype: Option<DType>,
    /// The type's name, for the error message if a module asks for a non-float tensor.
    dtype_name: String,
    shape: Vec<usize>,
    len: usize,
    /// How many of its bytes have arrived.
    filled: usize,
    buffer: Streamed,
}

/// A streamed tensor's bytes. f32 ones go straight into f32 storage on little-endian
/// targets (safetensors' byte order), so loading hands them to the model without a copy.
pub(super) enum Streamed {
    F32(Vec<f32>),
    Raw(Vec<u8>),
}

impl Streamed {
    fn for_dtype(dtype: Option<DType>) -> Self {
        if dtype == Some(DType::F32) && cfg!(target_endian = "little") {
            Streamed::F32(Vec::new())
        } else {
            Streamed::Raw(Vec::new())
        }
    }

    /// Room for `len` bytes, or `None` when there is not enough memory.
    fn reserve(&mut self, len: usize) -> Option<()> {
        match self {
            Streamed::F32(v) => v.try_reserve_exact(len.div_ceil(4)).ok(),
            Streamed::Raw(v) => v.try_reserve_exact(len).ok(),
        }
    }

    /// Writes `chunk` at byte offset `at` (the bytes before it already written).
    fn write(&mut self, at: usize, chunk: &[u8]) {
        match self {
            Streamed::F32(v) => {
                let end = at + chunk.len();
                if v.len() * 4 < end {
                    v.resize(end.div_ceil(4), 0.0);
                }
                bytemuck::cast_slice_mut::<f32, u8>(v)[at..end].copy_from_slice(chunk);
            }
            Streamed::Raw(v) => v.extend_from_slice(chunk),
        }
    }
}

/// Takes a safetensors file chunk by chunk ([`Self::push`]) and gives its [`Weights`] once
/// every byte its header describes has arrived ([`Self::finish`]).
pub struct SafetensorsStream {
    source: String,
    /// The whole file's length, when the sender announced it: checked against the header
    /// as soon as it is read, and then tensors get their exact size up front.
    expected_len: Option<u64>,
    /// The 8-byte length and the JSON header, until the header is complete.
    head: Vec<u8>,
    /// After the header: the tensors in the order of their bytes, and the next one to fill.
    slots: Vec<Slot>,
    next: usize,
    header_parsed: bool,
    /// The tensors' bytes the header describes, and how many of them have arrived.
    data_len: u64,
    data_received: u64,
    entries: BTreeMap<String, Entry<'static>>,
    non_float: BTreeMap<String, String>,
    /// Bytes taken so far, header included.
    received: u64,
    /// How many bytes of each element type the file stores (for display).
    bytes_by_type: BTreeMap<String, u64>,
}

impl SafetensorsStream {
    /// `source` names the file in error messages; `expected_len` is its announced length.
    pub fn new(source: &str, expected_len: Option<u64>) -> Self {
        Self {
            source: source.to_string(),
            expected_len,
            head: Vec::new(),
            slots: Vec::new(),
            next: 0,
            header_parsed: false,
            data_len: 0,
            data_received: 0,
            entries: BTreeMap::new(),
            non_float: BTreeMap::new(),
            received: 0,
            bytes_by_type: BTreeMap::new(),
        }
    }

    fn invalid(&self, why: impl std::fmt::Display) -> Error {
        Error::Weights(format!(
            "{}: not a valid safetensors file ({why})",
            self.source
        ))
    }

    /// Bytes taken so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The element type most of the file's bytes are stored in ("F32", "F16", "I8", …), once
    /// the header is read.
    pub fn main_dtype(&self) -> Option<String> {
        self.bytes_by_type
            .iter()
            .max_by_key(|(_, bytes)| **bytes)
            .map(|(dtype, _)| dtype.clone())
    }

    /// Takes the next bytes of the file. Fails on a header that is not safetensors', and on
    /// bytes past the end its header describes.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<()> {
        self.received += chunk.len() as u64;
        while !chunk.is_empty() {
            if !self.header_parsed {
                let wanted = match self.header_len()? {
                    None => 8,
                    Some(n) => 8 + n as usize,
                };
                let take = (wanted - self.head.len()).min(chunk.len());
                self.head.extend_from_slice(&chunk[..take]);
                chunk = &chunk[take..];
                if self.head.len() == 8 {
                    // Validates the length now, before its bytes are gathered.
                    self.header_len()?;
                } else if self.head.len() == wanted {
                    self.parse_header()?;
                }
                continue;
            }
            let Some(slot) = self.slots.get_mut(self.next) else {
                return Err(self.invalid("more bytes than its header describes"));
            };
            let take = (slot.len - slot.filled).min(chunk.len());
            if slot.dtype.is_some() {
                slot.buffer.write(slot.filled, &chunk[..take]);
            }
            slot.filled += take;
            self.data_received += take as u64;
            chunk = &chunk[take..];
            if slot.filled == slot.len {
                self.complete_next();
                self.start_next()?;
            }
        }
        Ok(())
    }

    /// The header's length, once its 8 bytes are in, checked against the limits.
    fn header_len(&self) -> Result<Option<u64>> {
        let Some(len_bytes) = self.head.get(..8) else {
            return Ok(None);
        };
        let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        if n > MAX_HEADER_BYTES || self.expected_len.is_some_and(|total| 8 + n > total) {
            return Err(self.invalid(format!("header length {n} does not fit the file")));
        }
        Ok(Some(n))
    }

    fn parse_header(&mut self) -> Result<()> {
        // The reference crate's own validation: offsets contiguous from 0, each tensor's
        // byte length its shape's (checked arithmetic). Its tensors come sorted by offset.
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&self.head[8..])
            .map_err(|e| self.invalid(format!("header: {e}")))?;
        let data_len = metadata.data_len() as u64;
        let header_end = self.head.len() as u64;
        if let Some(total) = self.expected_len
            && header_end + data_len != total
        {
            return Err(self.invalid(format!(
                "the header describes {data_len} bytes of tensors, the file holds {} (truncated or padded?)",
                total.saturating_sub(header_end)
            )));
        }
        let mut slots: Vec<(usize, Slot)> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (begin, end) = info.data_offsets;
                let dtype_name = format!("{:?}", info.dtype);
                *self.bytes_by_type.entry(dtype_name.clone()).or_default() += (end - begin) as u64;
                let dtype = float_dtype(info.dtype);
                let slot = Slot {
                    name,
                    dtype,
                    dtype_name,
                    shape: info.shape.clone(),
                    len: end - begin,
                    filled: 0,
                    buffer: Streamed::for_dtype(dtype),
                };
                (begin, slot)
            })
            .collect();
        // The crate validated the offsets as contiguous from 0, so sorting by them (empty
        // tensors first where two start together) gives the order of the bytes.
        slots.sort_by_key(|(begin, slot)| (*begin, slot.len));
        let slots = slots.into_iter().map(|(_, slot)| slot).collect();
        self.data_len = data_len;
        self.slots = slots;
        self.head = Vec::new();
        self.header_parsed = true;
        self.start_next()
    }

    /// Completes the tensors of no bytes that come next (they need nothing to arrive), then
    /// gives the next tensor its exact size when the file's length is known (and so
    /// validated against the header); otherwise it grows with the bytes that really come.
    fn start_next(&mut self) -> Result<()> {
        while self.slots.get(self.next).is_some_and(|s| s.len == 0) {
            self.complete_next();
        }
        if self.expected_len.is_none() {
            return Ok(());
        }
        let source = &self.source;
        if let Some(slot) = self.slots.get_mut(self.next)
            && slot.dtype.is_some()
        {
            slot.buffer.reserve(slot.len).ok_or_else(|| {
                Error::Weights(format!(
                    "{source}: not enough memory for weight `{}` ({} bytes)",
                    slot.name, slot.len
                ))
            })?;
        }
        Ok(())
    }

    fn complete_next(&mut self) {
        let slot = &mut self.slots[self.next];
        let name = std::mem::take(&mut slot.name);
        match slot.dtype {
            Some(dtype) => {
                self.entries.insert(
                    name,
                    Entry {
                        dtype,
                        shape: std::mem::take(&mut slot.shape),
                        bytes: Bytes::Streamed(RefCell::new(Some(std::mem::replace(
                            &mut slot.buffer,
                            Streamed::Raw(Vec::new()),
                        )))),
                    },
                );
            }
            None => {
                self.non_float
                    .insert(name, std::mem::take(&mut slot.dtype_name));
            }
        }
        self.next += 1;
    }

    /// The weights, once every byte the header describes has arrived. Each tensor's buffer
    /// is freed when a module reads it, so the weights load a model once.
    pub fn finish(self) -> Result<Weights<'static>> {
        if !self.header_parsed {
            return Err(self.invalid(format!("{} bytes, shorter than its header", self.received)));
        }
        if self.next < self.slots.len() {
            return Err(self.invalid(format!(
                "it stops {} bytes short of the {} its header describes (truncated?)",
                self.data_len - self.data_received,
                self.data_len
            )));
        }
        let mut weights = Weights::new(self.entries, &self.source);
        weights.non_float = self.non_float;
        Ok(weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, TensorView};

    /// A file with every kind of tensor: f32, f16, an empty one, int8 with its scales, and
    /// an integer tensor the models never read (listed out of byte order by name).
    fn file() -> Vec<u8> {
        let f32s: Vec<u8> = (0..24)
            .flat_map(|i| (i as f32 * 0.5 - 3.0).to_le_bytes())
            .collect();
        let f16s: Vec<u8> = (0..6)
            .flat_map(|i| half::f16::from_f32(i as f32 - 2.5).to_le_bytes())
            .collect();
        let i8s: Vec<u8> = vec![1, 255, 7, 128, 0, 3];
        let scales: Vec<u8> = [0.5f32, 0.25]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let ids: Vec<u8> = (0..5i64).flat_map(|i| i.to_le_bytes()).collect();
        let views = vec![
            (
                "z.weight",
                TensorView::new(Dtype::F32, vec![4, 6], &f32s).unwrap(),
            ),
            (
                "a.half",
                TensorView::new(Dtype::F16, vec![2, 3], &f16s).unwrap(),
            ),
            (
                "m.empty",
                TensorView::new(Dtype::F32, vec![0, 3], &[]).unwrap(),
            ),
            (
                "q.weight",
                TensorView::new(Dtype::I8, vec![2, 3], &i8s).unwrap(),
            ),
            (
                "q.weight_scale",
                TensorView::new(Dtype::F32, vec![2], &scales).unwrap(),
            ),
            (
                "position_ids",
                TensorView::new(Dtype::I64, vec![1, 5], &ids).unwrap(),
            ),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    const KEYS: [(&str, &[usize]); 4] = [
        ("z.weight", &[4, 6]),
        ("a.half", &[2, 3]),
        ("m.empty", &[0, 3]),
        ("q.weight", &[2, 3]),
    ];

    fn streamed(bytes: &[u8], chunk: usize, announce: bool) -> Result<Weights<'static>> {
        let mut stream =
            SafetensorsStream::new("model.safetensors", announce.then_some(bytes.len() as u64));
        for part in bytes.chunks(chunk) {
            stream.push(part)?;
        }
        assert_eq!(stream.received(), bytes.len() as u64);
        stream.finish()
    }

    #[test]
    fn chunks_of_any_size_give_the_files_tensors() {
        let bytes = file();
        let whole = Weights::from_safetensors(&bytes, "model.safetensors").unwrap();
        for chunk in [1, 3, 8, 9, 64, 4096] {
            for announce in [true, false] {
                let w = streamed(&bytes, chunk, announce).unwrap();
                for (key, shape) in KEYS {
                    assert_eq!(
                        w.read_f32(key, shape).unwrap(),
                        whole.read_f32(key, shape).unwrap()
                    );
                    assert_eq!(w.dtype(key), whole.dtype(key));
                }
                let e = w.read_f32("position_ids", &[1, 5]).unwrap_err().to_string();
                assert!(e.contains("stored as I64"), "{e}");
                // Every float tensor was read (the scales with their int8 tensor).
                w.check_unused(|_| false).unwrap();
            }
        }
    }

    #[test]
    fn a_tensor_is_freed_once_read() {
        let w = streamed(&file(), 100, true).unwrap();
        w.read_f32("z.weight", &[4, 6]).unwrap();
        let e = w.read_f32("z.weight", &[4, 6]).unwrap_err().to_string();
        assert!(e.contains("read twice") && e.contains("z.weight"), "{e}");
        // A refused read (wrong shape) does not take the bytes.
        assert!(w.read_f32("a.half", &[3, 2]).is_err());
        w.read_f32("a.half", &[2, 3]).unwrap();
    }

    #[test]
    fn the_main_dtype_is_where_most_bytes_are() {
        let bytes = file();
        let mut stream = SafetensorsStream::new("m", None);
        assert_eq!(stream.main_dtype(), None);
        stream.push(&bytes).unwrap();
        assert_eq!(stream.main_dtype().as_deref(), Some("F32"));
    }

    #[test]
    fn truncated_padded_and_foreign_files_are_refused() {
        let bytes = file();
        let err = |r: Result<Weights<'static>>| r.err().expect("refused").to_string();
        // Truncated in the data, in the header, in the length.
        for cut in [bytes.len() - 1, 20, 5] {
            let e = err(streamed(&bytes[..cut], 7, false));
            assert!(
                e.contains("model.safetensors: not a valid safetensors file"),
                "{e}"
            );
            assert!(
                e.contains("short") || e.contains("shorter than its header"),
                "{e}"
            );
        }
        // Announced with a length the header does not describe.
        let mut stream = SafetensorsStream::new("m", Some(bytes.len() as u64 + 4));
        let e = stream.push(&bytes).unwrap_err().to_string();
        assert!(e.contains("truncated or padded"), "{e}");
        // One byte too many.
        let mut padded = bytes.clone();
        padded.push(0);
        let e = err(streamed(&padded, 4096, false));
        assert!(e.contains("more bytes than its header describes"), "{e}");
        // A header length beyond the limit is refused from its 8 bytes alone.
        let mut stream = SafetensorsStream::new("m", None);
        let e = stream
            .push(&(MAX_HEADER_BYTES + 1).to_le_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("header length"), "{e}");
        // A header that is not safetensors' JSON (a PNG's bytes, say).
        let mut png = 12u64.to_le_bytes().to_vec();
        png.extend_from_slice(b"\x89PNG\r\n\x1a\n1234");
        let e = err(streamed(&png, 3, false));
        assert!(e.contains("header"), "{e}");
        // Offsets with a hole between tensors.
        let mut holed = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#.to_vec();
        let mut file = (holed.len() as u64).to_le_bytes().to_vec();
        file.append(&mut holed);
        file.extend_from_slice(&[0; 8]);
        let e = err(streamed(&file, 5, true));
        assert!(e.contains("header"), "{e}");
    }
}
