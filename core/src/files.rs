//! A Hugging Face model directory on disk (native only).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::segmenter::ModelFiles;
use crate::weights::Weights;

/// The files of a model directory, read into memory (`.bin` weights stay on disk).
pub struct DirFiles {
    dir: PathBuf,
    config_json: Vec<u8>,
    /// `model.safetensors`, read tensor by tensor (see [`Weights::from_safetensors_file`]).
    safetensors: Option<PathBuf>,
    #[cfg_attr(not(feature = "pytorch"), allow(dead_code))]
    pytorch_bin: Option<PathBuf>,
    optional: [(String, Option<Vec<u8>>); 6],
}

const OPTIONAL: [&str; 6] = [
    "preprocessor_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The largest config or tokenizer file read: all of them are read whole into memory.
fn max_side_file_bytes(name: &str) -> u64 {
    match name {
        "tokenizer.json" | "vocab.json" | "merges.txt" => 64 << 20,
        _ => 16 << 20,
    }
}

impl DirFiles {
    pub fn read(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Input(format!(
                "{}: not a model directory",
                dir.display()
            )));
        }
        let read = |name: &str| -> Result<Option<Vec<u8>>> {
            let path = dir.join(name);
            let cap = max_side_file_bytes(name);
            match std::fs::metadata(&path) {
                Ok(meta) if meta.len() > cap => Err(Error::Input(format!(
                    "{}: {} bytes, more than the {} MiB a {name} may have",
                    path.display(),
                    meta.len(),
                    cap >> 20
                ))),
                Ok(_) => std::fs::read(&path)
                    .map(Some)
                    .map_err(|e| Error::io(&path, e)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(&path, e)),
            }
        };
        let config_json = read("config.json")?.ok_or_else(|| {
            Error::Input(format!(
                "{}: no config.json — is this a Hugging Face model directory?",
                dir.display()
            ))
        })?;
        let st = dir.join("model.safetensors");
        let safetensors = st.is_file().then_some(st);
        let bin = dir.join("pytorch_model.bin");
        let pytorch_bin = (safetensors.is_none() && bin.is_file()).then_some(bin);
        if safetensors.is_none() && pytorch_bin.is_none() {
            return Err(Error::Input(format!(
                "{}: no weights (model.safetensors or pytorch_model.bin)",
                dir.display()
            )));
        }
        let optional = OPTIONAL.map(|name| (name.to_string(), None));
        let mut files = Self {
            dir: dir.to_path_buf(),
            config_json,
            safetensors,
            pytorch_bin,
            optional,
        };
        for slot in &mut files.optional {
            slot.1 = read(&slot.0)?;
        }
        Ok(files)
    }

    fn optional(&self, name: &str) -> Option<&[u8]> {
        self.optional
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, b)| b.as_deref())
    }

    pub fn model_files(&self) -> ModelFiles<'_> {
        ModelFiles {
            config_json: &self.config_json,
            // The weights are read from the file instead: see `weights`.
            safetensors: &[],
            preprocessor_config_json: self.optional("preprocessor_config.json"),
            tokenizer_json: self.optional("tokenizer.json"),
            vocab_json: self.optional("vocab.json"),
            merges_txt: self.optional("merges.txt"),
            tokenizer_config_json: self.optional("tokenizer_config.json"),
            special_tokens_map_json: self.optional("special_tokens_map.json"),
        }
    }

    /// The checkpoint's tensors: `model.safetensors` if present, else `pytorch_model.bin`.
    pub fn weights(&self) -> Result<Weights<'_>> {
        if let Some(path) = &self.safetensors {
            return Weights::from_safetensors_file(path);
        }
        #[cfg(feature = "pytorch")]
        if let Some(bin) = &self.pytorch_bin {
            return Weights::from_pytorch_file(bin);
        }
        Err(Error::Input(format!(
            "{}: only pytorch_model.bin here, and this build cannot read it (feature `pytorch`)",
            self.dir.display()
        )))
    }

    /// Names and bytes of the non-weight files present, for copying a directory.
    pub fn side_files(&self) -> Vec<(&str, &[u8])> {
        let mut out = vec![("config.json", self.config_json.as_slice())];
        out.extend(
            self.optional
                .iter()
                .filter_map(|(n, b)| Some((n.as_str(), b.as_deref()?))),
        );
        out
    }
}
