//! Which model a command runs, from its `--model` / `--weights` / `--arch` options: a model
//! folder (a Hugging Face CLIPSeg checkpoint, vlsm's BiomedCLIPSeg folder, or a CRIS
//! checkpoint beside its `config.json`), BiomedCLIPSeg(-D) assembled from the hub
//! repositories medvlsm reads plus a decoder checkpoint, or a CRIS checkpoint file alone
//! (the study's config, CIDAS's tokenizer). Hub ids resolve through the mirror, the cache,
//! then the network.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use vlsm::burn::tensor::Device;
use vlsm::files::{BiomedSources, CrisSources};
use vlsm::model::Arch;
use vlsm::model::biomedclipseg::config::DEFAULT_BERT_REPO;
use vlsm::model::layers::NamedTensor;
use vlsm::{ModelConfig, Segmenter};

use crate::hub::{self, Repo};

pub const BIOMEDCLIP_REPO: &str = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224";

/// `--arch`: the model family, when the files do not say (or to insist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchArg {
    Clipseg,
    Biomedclipseg,
    #[value(name = "biomedclipseg-d")]
    BiomedclipsegD,
    Cris,
}

impl From<ArchArg> for Arch {
    fn from(a: ArchArg) -> Self {
        match a {
            ArchArg::Clipseg => Arch::ClipSeg,
            ArchArg::Biomedclipseg => Arch::BiomedClipSeg,
            ArchArg::BiomedclipsegD => Arch::BiomedClipSegD,
            ArchArg::Cris => Arch::Cris,
        }
    }
}

/// How a command names its model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face model id (mirror, cache, then hub) [default: CIDAS/clipseg-rd64-refined,
    /// or microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 for the BiomedCLIPSeg
    /// archs].
    #[arg(long, value_name = "HF_ID")]
    pub model: Option<String>,
    /// A model folder (Hugging Face CLIPSeg, vlsm's BiomedCLIPSeg or CRIS folder, a CRIS
    /// checkpoint beside its config.json), a BiomedCLIP repository folder, a BiomedCLIPSeg
    /// decoder checkpoint (medvlsm's best.ckpt, its safetensors, a CLIPSeg checkpoint's
    /// decoder.*), or a CRIS checkpoint (cris.pt, medvlsm's best.ckpt).
    #[arg(long, value_name = "PATH")]
    pub weights: Option<PathBuf>,
    /// The model family [default: from the files].
    #[arg(long, value_enum)]
    pub arch: Option<ArchArg>,
}

impl ModelArgs {
    pub fn resolve(&self) -> Result<ModelSource> {
        ModelSource::resolve(
            self.model.as_deref(),
            self.weights.as_deref(),
            self.arch.map(Arch::from),
        )
    }
}

/// A model as the user named it.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A folder `Segmenter::from_dir` loads (CLIPSeg checkpoint or vlsm BiomedCLIPSeg folder).
    Dir(PathBuf),
    Biomed(BiomedSources),
    /// A CRIS checkpoint file alone.
    Cris(CrisSources),
}

impl ModelSource {
    /// Resolves the options. `weights`: a model folder, a BiomedCLIP repo folder, or a
    /// decoder checkpoint file (`best.ckpt`, …); `model`: a hub id; `arch`: the family.
    pub fn resolve(
        model: Option<&str>,
        weights: Option<&Path>,
        arch: Option<Arch>,
    ) -> Result<Self> {
        let source = match weights {
            Some(path) if path.is_dir() && model.is_some() => bail!(
                "--model and --weights {} both name the model: give one (--model goes with --weights only for a decoder checkpoint file)",
                path.display()
            ),
            Some(path) if path.is_dir() => {
                if path.join("config.json").is_file() {
                    Self::Dir(path.to_path_buf())
                } else if path.join("open_clip_config.json").is_file() {
                    Self::Biomed(biomed(
                        arch.unwrap_or(Arch::BiomedClipSeg),
                        path.to_path_buf(),
                        None,
                    )?)
                } else {
                    bail!(
                        "{}: neither a model folder (config.json) nor a BiomedCLIP repository (open_clip_config.json)",
                        path.display()
                    );
                }
            }
            Some(file) if file.is_file() && is_cris_file(file)? => {
                if let Some(a) = arch.filter(|&a| a != Arch::Cris) {
                    bail!("--arch {a}: {} is a CRIS checkpoint", file.display());
                }
                if model.is_some() {
                    bail!(
                        "--model names a hub model, but {} is a whole CRIS checkpoint: give one",
                        file.display()
                    );
                }
                Self::Cris(cris_sources(file)?)
            }
            Some(file) if file.is_file() => {
                let arch = match arch {
                    Some(Arch::ClipSeg) => bail!(
                        "{}: a checkpoint file alone is a BiomedCLIPSeg decoder; a CLIPSeg model is a folder (--weights DIR)",
                        file.display()
                    ),
                    Some(Arch::Cris) => bail!(
                        "--arch cris: {} holds no CRIS model (no backbone.visual.* tensors)",
                        file.display()
                    ),
                    Some(a) => a,
                    None => Arch::BiomedClipSeg,
                };
                let repo = Repo::open(model.unwrap_or(BIOMEDCLIP_REPO))?;
                let dir = biomedclip_dir(&repo, Some(file))?;
                Self::Biomed(biomed(arch, dir, Some(file.to_path_buf()))?)
            }
            Some(missing) => bail!("{}: no such file or folder", missing.display()),
            None if arch == Some(Arch::Cris) => bail!(
                "--arch cris: CRIS has no Hugging Face checkpoint; pass --weights cris.pt, \
                 medvlsm's best.ckpt, or a CRIS folder"
            ),
            None => {
                let id = model.unwrap_or(match arch {
                    Some(a) if a.is_biomedclip() => BIOMEDCLIP_REPO,
                    _ => hub::DEFAULT_MODEL,
                });
                let repo = Repo::open(id)?;
                let biomedclip = match arch {
                    Some(a) => a.is_biomedclip(),
                    None => {
                        repo.file("config.json")?.is_none()
                            && repo.file("open_clip_config.json")?.is_some()
                    }
                };
                if biomedclip {
                    let dir = biomedclip_dir(&repo, None)?;
                    Self::Biomed(biomed(arch.unwrap_or(Arch::BiomedClipSeg), dir, None)?)
                } else {
                    Self::Dir(hub::fetch(id)?)
                }
            }
        };
        if let (Some(wanted), Self::Dir(dir)) = (arch, &source) {
            let json = std::fs::read(dir.join("config.json"))
                .with_context(|| format!("{}/config.json", dir.display()))?;
            let found = ModelConfig::arch_of_json(&json)?;
            // A -D folder is BiomedCLIPSeg too once fine-tuned; only the family must agree.
            if found.is_biomedclip() != wanted.is_biomedclip()
                || (found == Arch::Cris) != (wanted == Arch::Cris)
            {
                bail!(
                    "--arch {wanted}: {}/config.json is a {} model",
                    dir.display(),
                    found.display_name()
                );
            }
        }
        Ok(source)
    }

    /// CRIS's sources: a checkpoint file alone, or a CRIS folder (its checkpoint, tokenizer
    /// and config.json); `None` for other families.
    pub fn cris_sources(&self) -> Result<Option<CrisSources>> {
        Ok(match self {
            Self::Cris(s) => Some(s.clone()),
            Self::Dir(dir) => {
                let files = vlsm::files::DirFiles::read(dir)?;
                let arch = ModelConfig::arch_of_json(files.model_files().config_json)?;
                (arch == Arch::Cris).then(|| CrisSources {
                    checkpoint: files.weights_file().to_path_buf(),
                    tokenizer: dir.clone(),
                    config: Some(dir.join("config.json")),
                })
            }
            Self::Biomed(_) => None,
        })
    }

    /// The model family, from the files (a folder's `config.json`).
    pub fn arch(&self) -> Result<Arch> {
        Ok(match self {
            Self::Dir(dir) => {
                let json = std::fs::read(dir.join("config.json"))
                    .with_context(|| format!("{}/config.json", dir.display()))?;
                ModelConfig::arch_of_json(&json)?
            }
            Self::Biomed(s) => s.arch,
            Self::Cris(_) => Arch::Cris,
        })
    }

    pub fn load(&self, device: &Device) -> Result<Segmenter> {
        self.load_in(device, vlsm::Precision::F32)
    }

    /// The model, a folder's transformer layers stored in `precision` as they load (other
    /// sources load in f32; `segment::with_precision` converts them after).
    pub fn load_in(&self, device: &Device, precision: vlsm::Precision) -> Result<Segmenter> {
        Ok(match self {
            Self::Dir(dir) => Segmenter::from_dir_in(dir, device, precision)
                .with_context(|| format!("loading {}", dir.display()))?,
            Self::Biomed(s) => s.load(device)?,
            Self::Cris(s) => s.load(device)?,
        })
    }

    /// The model a training run starts from: BiomedCLIPSeg without a decoder gets one
    /// initialised at random from `seed`, as the study starts it.
    pub fn load_for_training(&self, device: &Device, seed: u64, full: bool) -> Result<Segmenter> {
        match self {
            Self::Biomed(s) if s.arch == Arch::BiomedClipSeg && s.decoder.is_none() => {
                if full {
                    bail!(
                        "--full: BiomedCLIPSeg trains its decoder on frozen towers, as in the study"
                    );
                }
                eprintln!(
                    "BiomedCLIPSeg: the decoder starts at random from seed {seed}, as in the study"
                );
                Ok(s.load_fresh_decoder(device, seed)?)
            }
            _ => self.load(device),
        }
    }

    /// What config files and logs call it.
    pub fn describe(&self) -> String {
        match self {
            Self::Dir(dir) => dir.display().to_string(),
            Self::Biomed(s) => match &s.decoder {
                Some(d) => format!("{} ({})", d.display(), s.arch),
                None => format!("{} ({})", s.biomedclip.display(), s.arch),
            },
            Self::Cris(s) => format!("{} (cris)", s.checkpoint.display()),
        }
    }

    /// Writes the model with its decoder replaced by `trained` (HF names; for CRIS every
    /// tensor, medvlsm's names) as a folder every vlsm command and the page load.
    pub fn export(&self, trained: Vec<NamedTensor>, out: &Path, fp16: bool) -> Result<()> {
        if let Some(s) = self.cris_sources()? {
            // A CRIS export holds every tensor: the folder is the trained model.
            s.write_trained(out, &trained, fp16)?;
            return Ok(());
        }
        match self {
            Self::Dir(dir) => {
                let json = std::fs::read(dir.join("config.json"))
                    .with_context(|| format!("{}/config.json", dir.display()))?;
                vlsm::train::export_model(dir, trained, out, fp16)?;
                if ModelConfig::arch_of_json(&json)?.is_biomedclip() {
                    // A trained decoder makes any BiomedCLIPSeg folder plain BiomedCLIPSeg.
                    let mut config: serde_json::Value = serde_json::from_slice(&json)?;
                    config["model_type"] = Arch::BiomedClipSeg.name().into();
                    vlsm::files::write_synced(
                        &out.join("config.json"),
                        &serde_json::to_vec_pretty(&config)?,
                    )?;
                }
            }
            Self::Biomed(s) => {
                s.write_folder(out, vlsm::weights::Storage::f16_if(fp16), Some(trained))?
            }
            Self::Cris(_) => unreachable!("written above"),
        }
        Ok(())
    }
}

/// The BiomedCLIP repository folder: `open_clip_config.json`, plus the towers unless the
/// decoder checkpoint carries its own (a medvlsm `best.ckpt` does).
fn biomedclip_dir(repo: &Repo, decoder: Option<&Path>) -> Result<PathBuf> {
    let config = repo.one_of(&["open_clip_config.json"], "not a BiomedCLIP repository?")?;
    let towers_inside = match decoder {
        Some(file) => {
            let w = vlsm::files::open_weights(file)?;
            w.contains("net.biomedclip.visual.trunk.cls_token")
                || w.contains("visual.trunk.cls_token")
        }
        None => false,
    };
    if !towers_inside {
        repo.one_of(
            &["open_clip_pytorch_model.bin", "open_clip_model.safetensors"],
            "BiomedCLIP's towers",
        )?;
    }
    Repo::dir_of(&config)
}

/// BiomedCLIPSeg's sources around the BiomedCLIP folder `dir`: its BERT repository (from
/// `hf_model_name`), CIDAS's decoder config (and weights for `-D`).
fn biomed(arch: Arch, dir: PathBuf, decoder: Option<PathBuf>) -> Result<BiomedSources> {
    let json = std::fs::read(dir.join("open_clip_config.json"))
        .with_context(|| format!("{}/open_clip_config.json", dir.display()))?;
    let open_clip: vlsm::model::biomedclipseg::OpenClipConfig = serde_json::from_slice(&json)
        .with_context(|| format!("{}/open_clip_config.json", dir.display()))?;
    let text = &open_clip.model_cfg.text_cfg;
    let bert_id = text.hf_model_name.as_deref().unwrap_or(DEFAULT_BERT_REPO);
    let tokenizer_id = text.hf_tokenizer_name.as_deref().unwrap_or(bert_id);
    let bert = Repo::open(bert_id)?;
    let bert_dir = Repo::dir_of(&bert.one_of(&["config.json"], "the BERT config")?)?;
    let tokenizer = Repo::open(tokenizer_id)?;
    let tokenizer_dir = Repo::dir_of(&tokenizer.one_of(&["vocab.txt"], "the BERT tokenizer")?)?;
    tokenizer.optional(&["tokenizer_config.json"])?;
    let cidas = Repo::open(hub::DEFAULT_MODEL)?;
    let cidas_dir = Repo::dir_of(&cidas.one_of(&["config.json"], "the decoder config")?)?;
    if arch == Arch::BiomedClipSegD && decoder.is_none() {
        cidas.one_of(
            &["model.safetensors", "pytorch_model.bin"],
            "CIDAS's decoder",
        )?;
    }
    Ok(BiomedSources {
        arch,
        biomedclip: dir,
        bert: bert_dir,
        bert_tokenizer: tokenizer_dir,
        cidas: cidas_dir,
        decoder,
    })
}

/// Whether a checkpoint file holds a whole CRIS model (read through the pickle allow-list).
fn is_cris_file(file: &Path) -> Result<bool> {
    let w = vlsm::files::open_weights(file)?;
    Ok(vlsm::files::is_cris_checkpoint(&w))
}

/// A CRIS checkpoint file with CIDAS's CLIP tokenizer (medvlsm's `tokenizer_type: clipseg`)
/// and, when one lies beside it, its `config.json`; else the study's config.
fn cris_sources(file: &Path) -> Result<CrisSources> {
    let beside = file.parent().map(|d| d.join("config.json"));
    let config = beside.filter(|p| {
        std::fs::read(p)
            .ok()
            .and_then(|j| ModelConfig::arch_of_json(&j).ok())
            == Some(Arch::Cris)
    });
    let cidas = Repo::open(hub::DEFAULT_MODEL)?;
    let tokenizer = Repo::dir_of(&cidas.one_of(
        &["tokenizer.json", "vocab.json"],
        "CLIP's tokenizer (CRIS tokenizes as CLIPSeg)",
    )?)?;
    cidas.optional(&[
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ])?;
    Ok(CrisSources {
        checkpoint: file.to_path_buf(),
        tokenizer,
        config,
    })
}
