//! `--model HF_ID`: fetch a checkpoint from the Hugging Face hub into the Hugging Face cache
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, default `~/.cache/huggingface/hub`), in the layout
//! `huggingface_hub` itself uses (`models--OWNER--NAME/{blobs,snapshots,refs}`), so Python
//! and vlsm share downloads. `HF_ENDPOINT` points it at a mirror (the tests use a server on
//! 127.0.0.1). Every file goes through [`crate::download`]: capped, timed, http(s) only.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use sha2::Digest;

use crate::download;

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

/// The cache folder of one model repository.
struct RepoCache {
    root: PathBuf,
}

impl RepoCache {
    fn new(model_id: &str) -> Result<Self> {
        let hub = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
            })
            .context("no Hugging Face cache directory: set HF_HOME or pass --weights DIR")?;
        Ok(Self {
            root: hub.join(format!("models--{}", model_id.replace('/', "--"))),
        })
    }

    fn commit(&self) -> Option<String> {
        let c = std::fs::read_to_string(self.root.join("refs/main")).ok()?;
        let c = c.trim();
        is_hex_name(c).then(|| c.to_string())
    }

    /// A file of the cached `main` snapshot.
    fn get(&self, file: &str) -> Option<PathBuf> {
        let path = self.root.join("snapshots").join(self.commit()?).join(file);
        path.is_file().then_some(path)
    }
}

/// Commit hashes and ETags name files in the cache: only hex (and a few safe characters)
/// may, so a server cannot make vlsm write outside it.
fn is_hex_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Downloads (or finds in the cache) the model's files; returns the snapshot directory.
pub fn fetch(model_id: &str) -> Result<PathBuf> {
    let valid = model_id.split('/').count() == 2
        && model_id.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if !valid {
        bail!("`{model_id}` is not a Hugging Face model id (expected OWNER/NAME)");
    }
    let cache = RepoCache::new(model_id)?;
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let endpoint = endpoint.trim_end_matches('/').to_string();
    let cached = cache.get("config.json").is_some();
    let unreachable = |e: &anyhow::Error| {
        e.chain()
            .any(|c| c.downcast_ref::<ureq::Transport>().is_some())
    };
    let get = |file: &str| -> Result<Option<PathBuf>> {
        if let Some(path) = cache.get(file) {
            return Ok(Some(path));
        }
        download_into_cache(&cache, &endpoint, model_id, file).map_err(|e| {
            if unreachable(&e) {
                anyhow!(
                    "cannot reach the Hugging Face hub at {endpoint} to fetch `{model_id}` ({e:#}); \
                     offline? pass a local model directory with --weights DIR"
                )
            } else {
                e.context(format!("fetching {file} of `{model_id}` from {endpoint}"))
            }
        })
    };
    let config = get("config.json")?.with_context(|| {
        format!("`{model_id}` has no config.json on the Hugging Face hub at {endpoint} (unknown model id?)")
    })?;
    let weights = match get("model.safetensors")? {
        Some(path) => path,
        None => get("pytorch_model.bin")?.with_context(|| {
            format!("`{model_id}` has no model.safetensors or pytorch_model.bin at {endpoint}")
        })?,
    };
    for file in OPTIONAL {
        match get(file) {
            Ok(_) => {}
            // An earlier run cached this model: an unreachable hub is no error for the
            // optional files the hub may simply not have.
            Err(_) if cached => {}
            Err(e) => return Err(e),
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

/// Downloads one file of `main` into the cache: the blob under its ETag, the snapshot
/// entry as a link to it, `refs/main` set to the commit the hub names.
fn download_into_cache(
    cache: &RepoCache,
    endpoint: &str,
    model_id: &str,
    file: &str,
) -> Result<Option<PathBuf>> {
    let url = format!("{endpoint}/{model_id}/resolve/main/{file}");
    let blobs = cache.root.join("blobs");
    let incoming = blobs.join(format!("incoming-{}-{file}", std::process::id()));
    let Some(fetched) = download::get_file(&url, vlsm::limits::download_cap(file), &incoming)?
    else {
        return Ok(None);
    };
    let result = (|| -> Result<PathBuf> {
        // The hub sends the LFS file's sha256 as X-Linked-Etag, a git blob id as ETag.
        let etag = fetched
            .header("x-linked-etag")
            .or_else(|| fetched.header("etag"))
            .map(|e| {
                e.trim()
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .to_string()
            })
            .filter(|e| is_hex_name(e));
        let etag = match etag {
            Some(e) => e,
            None => crate::share::hash_file(&incoming)?,
        };
        let commit = fetched
            .header("x-repo-commit")
            .map(|c| c.trim().to_string())
            .filter(|c| is_hex_name(c))
            .or_else(|| cache.commit())
            .unwrap_or_else(|| {
                // A plain file server has no commits: name the snapshot after the URL.
                let digest = sha2::Sha256::digest(format!("{endpoint}/{model_id}").as_bytes());
                vlsm::share::hex(&digest)[..40].to_string()
            });
        let blob = blobs.join(&etag);
        std::fs::rename(&incoming, &blob).with_context(|| blob.display().to_string())?;
        let snapshot = cache.root.join("snapshots").join(&commit);
        std::fs::create_dir_all(&snapshot).with_context(|| snapshot.display().to_string())?;
        let pointer = snapshot.join(file);
        let _ = std::fs::remove_file(&pointer);
        link_or_copy(&blob, &pointer)?;
        let refs = cache.root.join("refs");
        std::fs::create_dir_all(&refs).with_context(|| refs.display().to_string())?;
        std::fs::write(refs.join("main"), &commit).with_context(|| refs.display().to_string())?;
        Ok(pointer)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&incoming);
    }
    result.map(Some)
}

/// The snapshot entry: a relative symlink to the blob as `huggingface_hub` makes it, or a
/// copy where links are not possible.
fn link_or_copy(blob: &Path, pointer: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let name = blob.file_name().context("blob has a name")?;
        let target = Path::new("../../blobs").join(name);
        if std::os::unix::fs::symlink(&target, pointer).is_ok() {
            return Ok(());
        }
    }
    std::fs::copy(blob, pointer).with_context(|| pointer.display().to_string())?;
    Ok(())
}
