//! `--model HF_ID`: fetch a checkpoint from the Hugging Face hub into the local cache
//! (`HF_HOME`, default `~/.cache/huggingface`), with progress bars. `HF_ENDPOINT` points it
//! at a mirror (the tests use a server on 127.0.0.1).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use hf_hub::api::sync::{ApiBuilder, ApiError};

pub const DEFAULT_MODEL: &str = "CIDAS/clipseg-rd64-refined";

/// Tokenizer and preprocessing files a checkpoint may have; any may be missing.
const OPTIONAL: [&str; 6] = [
    "preprocessor_config.json",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn is_not_found(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(err) if matches!(**err, ureq::Error::Status(404, _)))
}

fn is_unreachable(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(err) if matches!(**err, ureq::Error::Transport(_)))
}

/// Downloads (or finds in the cache) the model's files; returns the snapshot directory.
pub fn fetch(model_id: &str) -> Result<PathBuf> {
    if model_id.trim().is_empty() || model_id.contains("..") || model_id.starts_with('/') {
        bail!("`{model_id}` is not a Hugging Face model id (expected OWNER/NAME)");
    }
    let builder = ApiBuilder::from_env().with_progress(true).with_retries(0);
    let api = builder
        .build()
        .context("cannot set up the Hugging Face hub client")?;
    let repo = api.model(model_id.to_string());
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let explain = |file: &str, e: ApiError| -> anyhow::Error {
        if is_unreachable(&e) {
            anyhow!(
                "cannot reach the Hugging Face hub at {endpoint} to fetch `{model_id}` ({e}); \
                 offline? pass a local model directory with --weights DIR"
            )
        } else if is_not_found(&e) {
            anyhow!(
                "`{model_id}` has no {file} on the Hugging Face hub at {endpoint} (unknown model id?)"
            )
        } else {
            anyhow!("fetching {file} of `{model_id}` from {endpoint}: {e}")
        }
    };
    // Whether an earlier run cached this model: then an unreachable hub is no error for the
    // optional files the hub may simply not have.
    let cache = hf_hub::Cache::from_env().repo(hf_hub::Repo::model(model_id.to_string()));
    let cached = cache.get("config.json").is_some();
    let config = repo
        .get("config.json")
        .map_err(|e| explain("config.json", e))?;
    let weights = match repo.get("model.safetensors") {
        Ok(path) => path,
        Err(e) if is_not_found(&e) => repo
            .get("pytorch_model.bin")
            .map_err(|e| explain("model.safetensors or pytorch_model.bin", e))?,
        Err(e) => return Err(explain("model.safetensors", e)),
    };
    for file in OPTIONAL {
        match repo.get(file) {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) if cached && is_unreachable(&e) => {}
            Err(e) => return Err(explain(file, e)),
        }
    }
    let dir = config
        .parent()
        .context("hub cache path has no parent")?
        .to_path_buf();
    anyhow::ensure!(
        weights.parent() == Some(dir.as_path()),
        "hub cache files are not in one snapshot"
    );
    Ok(dir)
}
