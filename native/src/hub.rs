//! `--model HF_ID`: fetch a checkpoint from the Hugging Face hub into the Hugging Face cache
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, default `~/.cache/huggingface/hub`), in the layout
//! `huggingface_hub` itself uses (`models--OWNER--NAME/{blobs,snapshots,refs}`), so Python
//! and vlsm share downloads. `HF_ENDPOINT` points it at a mirror (the tests use a server on
//! 127.0.0.1). Every file goes through [`crate::download`]: capped, timed, http(s) only.
//! A local mirror folder (`--hub-mirror`) comes before both.

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

/// Where a hub repository's files come from, in order: a local mirror folder
/// (`--hub-mirror ROOT` / `VLSM_HUB_MIRROR`: `ROOT/<org>/<name>/`, what an air-gapped site
/// keeps), the Hugging Face cache, the network (`HF_ENDPOINT`, default huggingface.co).
pub struct Repo {
    id: String,
    mirror: Option<PathBuf>,
    cache: RepoCache,
    endpoint: String,
}

/// The mirror root's environment variable (`--hub-mirror` wins over it).
pub const MIRROR_VAR: &str = "VLSM_HUB_MIRROR";

static MIRROR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// `--hub-mirror ROOT`, for every command of this process.
pub fn set_mirror(root: PathBuf) {
    let _ = MIRROR.set(root);
}

fn mirror_root() -> Option<PathBuf> {
    MIRROR.get().cloned().or_else(|| {
        std::env::var_os(MIRROR_VAR)
            .filter(|root| !root.is_empty())
            .map(PathBuf::from)
    })
}

pub fn check_id(model_id: &str) -> Result<()> {
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
    Ok(())
}

impl Repo {
    pub fn open(model_id: &str) -> Result<Self> {
        check_id(model_id)?;
        let mirror = mirror_root()
            .map(|root| root.join(model_id))
            .filter(|dir| dir.is_dir());
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        Ok(Self {
            id: model_id.to_string(),
            cache: RepoCache::new(model_id)?,
            mirror,
            endpoint: endpoint.trim_end_matches('/').to_string(),
        })
    }

    /// One file of the repository, or `None` when the repository has no such file.
    pub fn file(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(dir) = &self.mirror {
            // A mirrored repository is authoritative: no download behind its back.
            let path = dir.join(file);
            return Ok(path.is_file().then_some(path));
        }
        if let Some(path) = self.cache.get(file) {
            return Ok(Some(path));
        }
        let (endpoint, model_id) = (&self.endpoint, &self.id);
        download_into_cache(&self.cache, endpoint, model_id, file).map_err(|e| {
            let unreachable = e
                .chain()
                .any(|c| c.downcast_ref::<ureq::Transport>().is_some());
            if unreachable {
                anyhow!(
                    "cannot reach the Hugging Face hub at {endpoint} to fetch `{model_id}` ({e:#}); \
                     offline? pass a local model directory with --weights DIR, or a mirror with \
                     --hub-mirror ROOT (ROOT/{model_id}/)"
                )
            } else {
                e.context(format!("fetching {file} of `{model_id}` from {endpoint}"))
            }
        })
    }

    /// The first of `files` the repository has, or an error naming what is missing.
    pub fn one_of(&self, files: &[&str], why: &str) -> Result<PathBuf> {
        // Whatever is cached wins before the network is asked for an alternative.
        if self.mirror.is_none()
            && let Some(path) = files.iter().find_map(|f| self.cache.get(f))
        {
            return Ok(path);
        }
        for file in files {
            if let Some(path) = self.file(file)? {
                return Ok(path);
            }
        }
        bail!(
            "`{}` has no {} ({why}){}",
            self.id,
            files.join(" or "),
            match &self.mirror {
                Some(dir) => format!(" in the mirror {}", dir.display()),
                None => format!(" at {}", self.endpoint),
            }
        )
    }

    /// Optional files (tokenizer, preprocessing): fetched when present; an unreachable hub
    /// is no error once the repository's main file is cached.
    pub fn optional(&self, files: &[&str]) -> Result<()> {
        for file in files {
            match self.file(file) {
                Ok(_) => {}
                Err(_) if self.mirror.is_none() && self.cache.commit().is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The folder holding the repository's files (mirror folder or cache snapshot).
    pub fn dir_of(path: &Path) -> Result<PathBuf> {
        Ok(path
            .parent()
            .context("hub file path has no parent")?
            .to_path_buf())
    }
}

/// Downloads (or finds in the mirror or cache) a CLIPSeg checkpoint's files; returns the
/// folder holding them.
pub fn fetch(model_id: &str) -> Result<PathBuf> {
    let repo = Repo::open(model_id)?;
    let config = repo.one_of(&["config.json"], "unknown model id?")?;
    let weights = repo.one_of(&["model.safetensors", "pytorch_model.bin"], "the weights")?;
    repo.optional(&OPTIONAL)?;
    let dir = Repo::dir_of(&config)?;
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
