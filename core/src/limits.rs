//! Size caps for every file vlsm downloads, natively and in the page: a server's answer
//! beyond these is refused (by its Content-Length before reading, else as it arrives).

/// `config.json`, `preprocessor_config.json` and the other small JSON files.
pub const MAX_JSON_BYTES: u64 = 1 << 20;
/// `tokenizer.json`, `vocab.json`, `merges.txt` (CLIP's are 2–4 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 32 << 20;
/// A weights file (CLIPSeg's is 0.6 GB in float32).
pub const MAX_WEIGHTS_BYTES: u64 = 8 << 30;
/// A weights file in the page: its wasm heap is 4 GiB at most, and loading holds the file
/// and the model together.
pub const MAX_PAGE_WEIGHTS_BYTES: u64 = 2 << 30;
/// An image fetched from a URL.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// The cap for a model folder's file, by its name.
pub fn download_cap(file: &str) -> u64 {
    match file {
        "model.safetensors" | "pytorch_model.bin" => MAX_WEIGHTS_BYTES,
        "tokenizer.json" | "vocab.json" | "merges.txt" => MAX_TOKENIZER_BYTES,
        _ => MAX_JSON_BYTES,
    }
}
