//! A Hugging Face model directory on disk (native only).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::segmenter::ModelFiles;
use crate::weights::Weights;

/// The files of a model directory, read into memory (`.bin` weights stay on disk).
pub struct DirFiles {
    config_json: Vec<u8>,
    /// The checkpoint: the first of [`WEIGHT_FILES`] present.
    weights_file: PathBuf,
    optional: [(String, Option<Vec<u8>>); 7],
}

/// The checkpoint file names a model folder may hold, in order of preference:
/// Hugging Face's, then CRIS's as medvlsm writes them (`cris.pt`, a Lightning `best.ckpt`).
pub const WEIGHT_FILES: [&str; 4] = [
    "model.safetensors",
    "pytorch_model.bin",
    "cris.pt",
    "best.ckpt",
];

const OPTIONAL: [&str; 7] = [
    "preprocessor_config.json",
    "tokenizer.json",
    "vocab.json",
    // BERT's WordPiece vocabulary (BiomedCLIPSeg folders).
    "vocab.txt",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The largest config or tokenizer file read: all of them are read whole into memory.
fn max_side_file_bytes(name: &str) -> u64 {
    match name {
        "tokenizer.json" | "vocab.json" | "vocab.txt" | "merges.txt" => 64 << 20,
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
        let weights_file = WEIGHT_FILES
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                Error::Input(format!(
                    "{}: no weights ({})",
                    dir.display(),
                    WEIGHT_FILES.join(", ")
                ))
            })?;
        let optional = OPTIONAL.map(|name| (name.to_string(), None));
        let mut files = Self {
            config_json,
            weights_file,
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
            vocab_txt: self.optional("vocab.txt"),
            merges_txt: self.optional("merges.txt"),
            tokenizer_config_json: self.optional("tokenizer_config.json"),
            special_tokens_map_json: self.optional("special_tokens_map.json"),
        }
    }

    /// The checkpoint file (see [`WEIGHT_FILES`]).
    pub fn weights_file(&self) -> &Path {
        &self.weights_file
    }

    /// The checkpoint's tensors (safetensors read tensor by tensor, pickles through the
    /// allow-list).
    pub fn weights(&self) -> Result<Weights<'_>> {
        if self.weights_file.ends_with("model.safetensors") {
            return Weights::from_safetensors_file(&self.weights_file);
        }
        #[cfg(feature = "pytorch")]
        return Weights::from_pytorch_file(&self.weights_file);
        #[cfg(not(feature = "pytorch"))]
        Err(Error::Input(format!(
            "{}: a PyTorch pickle, and this build cannot read it (feature `pytorch`)",
            self.weights_file.display()
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

/// BiomedCLIPSeg(-D) from the files medvlsm reads, each in its own folder (a hub repo, or
/// its mirror or cache snapshot): BiomedCLIP (`open_clip_config.json`, and the towers in
/// `open_clip_pytorch_model.bin` unless the decoder checkpoint carries them), its BERT repo
/// (`config.json`; `vocab.txt` + `tokenizer_config.json` from the tokenizer repo), CIDAS's
/// CLIPSeg repo (`config.json`: the decoder's sizes; its weights are `-D`'s decoder), and a
/// decoder checkpoint: medvlsm's Lightning `best.ckpt` (or its safetensors), vlsm's own
/// `model.safetensors`, or any CLIPSeg checkpoint's `decoder.*`.
#[derive(Debug, Clone)]
pub struct BiomedSources {
    pub arch: crate::model::Arch,
    pub biomedclip: PathBuf,
    pub bert: PathBuf,
    pub bert_tokenizer: PathBuf,
    pub cidas: PathBuf,
    pub decoder: Option<PathBuf>,
}

/// A weight file, its key prefix for one part.
struct Part {
    file: PathBuf,
    prefix: String,
}

impl BiomedSources {
    /// The checkpoint files the model is built from (what share links and benchmark rows
    /// hash), towers first.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        let (towers, decoder) = self.parts()?;
        let mut files = vec![towers.file];
        if decoder.file != files[0] {
            files.push(decoder.file);
        }
        Ok(files)
    }

    fn read_json(dir: &Path, name: &str) -> Result<(Vec<u8>, String)> {
        let path = dir.join(name);
        let shown = path.display().to_string();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > max_side_file_bytes(name) => Err(Error::Input(format!(
                "{shown}: {} bytes, more than a {name} may have",
                meta.len()
            ))),
            Ok(_) => Ok((
                std::fs::read(&path).map_err(|e| Error::io(&path, e))?,
                shown,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::Input(format!("{}: no {name}", dir.display())))
            }
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// The three configs and the tokenizer files.
    fn pipeline(&self) -> Result<crate::segmenter::Pipeline> {
        use crate::model::biomedclipseg::BiomedClipSegConfig;
        let (open_clip, oc_name) = Self::read_json(&self.biomedclip, "open_clip_config.json")?;
        let (bert, bert_name) = Self::read_json(&self.bert, "config.json")?;
        let (decoder, dec_name) = Self::read_json(&self.cidas, "config.json")?;
        let config = BiomedClipSegConfig::from_parts(
            self.arch,
            &open_clip,
            &bert,
            &decoder,
            [&oc_name, &bert_name, &dec_name],
        )?;
        let (vocab, _) = Self::read_json(&self.bert_tokenizer, "vocab.txt").map_err(|_| {
            Error::Input(format!(
                "{}: no vocab.txt (BiomedCLIP's BERT tokenizer is read from its BERT repository)",
                self.bert_tokenizer.display()
            ))
        })?;
        let tokenizer_config = Self::read_json(&self.bert_tokenizer, "tokenizer_config.json")
            .ok()
            .map(|(b, _)| b);
        crate::segmenter::Pipeline::biomedclipseg(config, &vocab, tokenizer_config.as_deref())
    }

    /// Where the towers and the decoder are read from.
    fn parts(&self) -> Result<(Part, Part)> {
        let decoder = match (&self.decoder, self.arch) {
            (Some(file), _) => file.clone(),
            (None, crate::model::Arch::BiomedClipSegD) => {
                ["model.safetensors", "pytorch_model.bin"]
                    .map(|n| self.cidas.join(n))
                    .into_iter()
                    .find(|p| p.is_file())
                    .ok_or_else(|| {
                        Error::Input(format!(
                            "{}: no model.safetensors or pytorch_model.bin (BiomedCLIPSeg-D takes CIDAS's decoder from it)",
                            self.cidas.display()
                        ))
                    })?
            }
            (None, _) => {
                return Err(Error::Input(
                    "BiomedCLIPSeg has no trained decoder (the study starts it random): pass a \
                     fine-tuned one (--weights best.ckpt or a `vlsm train` export), train one \
                     with `vlsm train`, or use --arch biomedclipseg-d for CIDAS's decoder"
                        .into(),
                ));
            }
        };
        let w = open_weights(&decoder)?;
        let decoder_prefix = ["net.decoder", "decoder"]
            .into_iter()
            .find(|p| w.contains(&format!("{p}.film_mul.weight")))
            .ok_or_else(|| {
                Error::Weights(format!(
                    "{}: holds no CLIPSeg decoder (no decoder.film_mul.weight or net.decoder.film_mul.weight){}",
                    decoder.display(),
                    if w.has_prefix("neck.") || w.has_prefix("net.neck.") {
                        " — it is a CRIS checkpoint"
                    } else {
                        ""
                    }
                ))
            })?;
        let towers = ["net.biomedclip.", ""]
            .into_iter()
            .find(|p| w.contains(&format!("{p}visual.trunk.cls_token")));
        let towers = match towers {
            Some(prefix) => Part {
                file: decoder.clone(),
                prefix: prefix.into(),
            },
            None => self.towers_only()?,
        };
        Ok((
            towers,
            Part {
                file: decoder,
                prefix: decoder_prefix.into(),
            },
        ))
    }

    /// Loads the model.
    pub fn load(&self, device: &burn::tensor::Device) -> Result<crate::Segmenter> {
        self.load_with(device, None)
    }

    /// Loads the towers with a decoder initialised at random from `seed`, as the study
    /// starts BiomedCLIPSeg's training.
    pub fn load_fresh_decoder(
        &self,
        device: &burn::tensor::Device,
        seed: u64,
    ) -> Result<crate::Segmenter> {
        self.load_with(device, Some(seed))
    }

    fn load_with(
        &self,
        device: &burn::tensor::Device,
        fresh_decoder: Option<u64>,
    ) -> Result<crate::Segmenter> {
        use crate::model::biomedclipseg::BiomedWeights;
        use crate::model::{BiomedClipSeg, Model};
        let pipeline = self.pipeline()?;
        let crate::segmenter::ModelConfig::BiomedClipSeg(cfg) = &pipeline.config else {
            unreachable!("a BiomedCLIPSeg pipeline");
        };
        let (towers, decoder) = match fresh_decoder {
            None => self.parts()?,
            Some(_) => (
                self.towers_only()?,
                Part {
                    file: PathBuf::new(),
                    prefix: "decoder".into(),
                },
            ),
        };
        let tw = open_weights(&towers.file)?;
        let separate = match fresh_decoder {
            Some(seed) => Some(Weights::fresh(seed)),
            None => (decoder.file != towers.file)
                .then(|| open_weights(&decoder.file))
                .transpose()?,
        };
        let dw = separate.as_ref().unwrap_or(&tw);
        let model = BiomedClipSeg::load(
            cfg,
            &BiomedWeights {
                towers: &tw,
                towers_prefix: &towers.prefix,
                decoder: dw,
                decoder_prefix: &decoder.prefix,
            },
            device,
        )?;
        let tower_key = |key: &str| {
            key.strip_prefix(towers.prefix.as_str())
                .is_some_and(|k| BiomedClipSeg::unused_tower_key(cfg, k))
        };
        tw.check_unused(tower_key)?;
        if let Some(dw) = &separate {
            // A CLIPSeg checkpoint: only its decoder is used.
            dw.check_unused(|key| {
                key.starts_with("clip.") || key.ends_with("position_ids") || tower_key(key)
            })?;
        }
        Ok(crate::Segmenter::new(
            Model::BiomedClipSeg(model),
            pipeline,
            device,
        ))
    }

    /// Writes vlsm's BiomedCLIPSeg folder (what the browser loads, and what `--weights DIR`
    /// reads back): `config.json` holding the three configs, the BERT tokenizer files, and one
    /// `model.safetensors` with the towers under the hub's keys and the decoder under
    /// `decoder.` — `trained` decoder tensors (HF names) replacing the source's.
    pub fn write_folder(
        &self,
        out: &Path,
        storage: crate::weights::Storage,
        trained: Option<Vec<crate::model::layers::NamedTensor>>,
    ) -> Result<()> {
        use crate::model::BiomedClipSeg;
        let pipeline = self.pipeline()?;
        let crate::segmenter::ModelConfig::BiomedClipSeg(cfg) = &pipeline.config else {
            unreachable!("a BiomedCLIPSeg pipeline");
        };
        let mut cfg = cfg.clone();
        if trained.is_some() {
            cfg.arch = crate::model::Arch::BiomedClipSeg;
        }
        let (towers, decoder) = match self.parts() {
            Ok((towers, decoder)) => (towers, Some(decoder)),
            // Trained from a fresh decoder: no decoder file, the hub's towers.
            Err(_) if trained.is_some() && self.decoder.is_none() => (self.towers_only()?, None),
            Err(e) => return Err(e),
        };
        let tw = open_weights(&towers.file)?;
        let mut tensors = Vec::new();
        for key in tw.keys() {
            let Some(name) = key.strip_prefix(towers.prefix.as_str()) else {
                continue;
            };
            if name.starts_with("decoder.")
                || name.starts_with("net.")
                || BiomedClipSeg::unused_tower_key(&cfg, name)
            {
                continue;
            }
            let shape = tw.shape(key).expect("listed key").to_vec();
            tensors.push((name.to_string(), shape.clone(), tw.read_f32(key, &shape)?));
        }
        match trained {
            Some(trained) => tensors.extend(trained),
            None => {
                let decoder = decoder.expect("a decoder part without trained tensors");
                let dw = open_weights(&decoder.file)?;
                let prefix = format!("{}.", decoder.prefix);
                for key in dw.keys() {
                    if let Some(rest) = key.strip_prefix(prefix.as_str()) {
                        let shape = dw.shape(key).expect("listed key").to_vec();
                        tensors.push((
                            format!("decoder.{rest}"),
                            shape.clone(),
                            dw.read_f32(key, &shape)?,
                        ));
                    }
                }
            }
        }
        let bytes = crate::weights::write_safetensors(&tensors, storage)?;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        write_synced(&out.join("config.json"), &cfg.to_vlsm_json())?;
        for name in ["vocab.txt", "tokenizer_config.json"] {
            if let Ok((bytes, _)) = Self::read_json(&self.bert_tokenizer, name) {
                write_synced(&out.join(name), &bytes)?;
            }
        }
        write_synced(&out.join("model.safetensors"), &bytes)
    }

    /// The towers alone, from the BiomedCLIP repo.
    fn towers_only(&self) -> Result<Part> {
        Ok(Part {
            file: ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"]
                .map(|n| self.biomedclip.join(n))
                .into_iter()
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    Error::Input(format!(
                        "{}: no open_clip_pytorch_model.bin (BiomedCLIP's towers)",
                        self.biomedclip.display()
                    ))
                })?,
            prefix: String::new(),
        })
    }
}

/// CRIS from a checkpoint file (medvlsm's `cris.pt`, its Lightning `best.ckpt`, their
/// fp16 variants or vlsm's safetensors export) with the CLIP tokenizer files of `tokenizer`
/// (CIDAS/clipseg-rd64-refined's, as medvlsm's `tokenizer_type: clipseg`) and a config:
/// `config` (a `config.json` with medvlsm's argument names), else the study's
/// `configs/model/cris.yaml`.
#[derive(Debug, Clone)]
pub struct CrisSources {
    pub checkpoint: PathBuf,
    pub tokenizer: PathBuf,
    pub config: Option<PathBuf>,
}

/// The CLIP tokenizer's files, as a folder holds them.
const CLIP_TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Whether a checkpoint holds CRIS (`backbone.visual.*`, under `net.` in a Lightning one).
pub fn is_cris_checkpoint(w: &Weights) -> bool {
    w.has_prefix("backbone.visual.") || w.has_prefix("net.backbone.visual.")
}

impl CrisSources {
    fn config(&self) -> Result<crate::model::cris::CrisConfig> {
        use crate::model::cris::CrisConfig;
        match &self.config {
            None => Ok(CrisConfig::default()),
            Some(path) => {
                let (json, shown) = BiomedSources::read_json(
                    path.parent().unwrap_or(Path::new(".")),
                    &path
                        .file_name()
                        .map_or("config.json".into(), |n| n.to_string_lossy().to_string()),
                )?;
                CrisConfig::from_json(&json).map_err(|e| Error::Config(format!("{shown}: {e}")))
            }
        }
    }

    fn tokenizer_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let mut out = Vec::new();
        for name in CLIP_TOKENIZER_FILES {
            if let Ok((bytes, _)) = BiomedSources::read_json(&self.tokenizer, name) {
                out.push((name, bytes));
            }
        }
        Ok(out)
    }

    pub fn pipeline(&self) -> Result<crate::segmenter::Pipeline> {
        let side = self.tokenizer_files()?;
        let get = |name: &str| {
            side.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| b.as_slice())
        };
        let files = ModelFiles {
            tokenizer_json: get("tokenizer.json"),
            vocab_json: get("vocab.json"),
            merges_txt: get("merges.txt"),
            tokenizer_config_json: get("tokenizer_config.json"),
            special_tokens_map_json: get("special_tokens_map.json"),
            ..ModelFiles::default()
        };
        crate::segmenter::Pipeline::cris(self.config()?, &files)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", self.tokenizer.display())))
    }

    pub fn load(&self, device: &burn::tensor::Device) -> Result<crate::Segmenter> {
        let pipeline = self.pipeline()?;
        let weights = open_weights(&self.checkpoint)?;
        crate::Segmenter::from_weights(pipeline, &weights, device).map_err(|e| match e {
            Error::Weights(m) if self.config.is_none() && is_cris_checkpoint(&weights) => {
                Error::Weights(format!(
                    "{m} — the study's CRIS config (configs/model/cris.yaml) does not fit this \
                     checkpoint: put a config.json with its arguments (word_len, fpn_in, \
                     fpn_out, vis_dim, word_dim, num_layers, num_head, dim_ffn, img_size) \
                     beside it and pass the folder"
                ))
            }
            e => e,
        })
    }

    /// Writes vlsm's CRIS folder with `tensors` (medvlsm's keys, as
    /// [`crate::model::Cris::export`] gives them) instead of the checkpoint's.
    pub fn write_trained(
        &self,
        out: &Path,
        tensors: &[crate::model::layers::NamedTensor],
        fp16: bool,
    ) -> Result<()> {
        let bytes =
            crate::weights::write_safetensors(tensors, crate::weights::Storage::f16_if(fp16))?;
        self.write_with(out, &bytes)
    }

    fn write_with(&self, out: &Path, safetensors: &[u8]) -> Result<()> {
        let cfg = self.config()?;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        write_synced(&out.join("config.json"), cfg.to_json().as_bytes())?;
        for (name, bytes) in self.tokenizer_files()? {
            write_synced(&out.join(name), &bytes)?;
        }
        write_synced(&out.join("model.safetensors"), safetensors)
    }

    /// Writes vlsm's CRIS folder: `model.safetensors` (medvlsm's keys, no `net.` prefix,
    /// stored as `storage` says), `config.json` and the CLIP tokenizer files.
    pub fn write_folder(&self, out: &Path, storage: crate::weights::Storage) -> Result<()> {
        if storage == crate::weights::Storage::Int8 {
            // As for bf16: its deep, BatchNorm'd ResNet amplifies the rounding (measured on
            // the fixture: logits off by a third of their range, masks 94 % alike).
            return Err(Error::Input(
                "int8 weights are not offered for CRIS (they moved its logits by a third of \
                 their range): use float32 or --fp16"
                    .into(),
            ));
        }
        let w = open_weights(&self.checkpoint)?;
        let prefix = crate::model::Cris::prefix_of(&w);
        let mut tensors = Vec::new();
        for key in w.keys() {
            let Some(name) = key.strip_prefix(prefix) else {
                continue;
            };
            if crate::model::Cris::unused_key("", name) {
                continue;
            }
            let shape = w.shape(key).expect("listed key").to_vec();
            tensors.push((name.to_string(), shape.clone(), w.read_f32(key, &shape)?));
        }
        let bytes = crate::weights::write_safetensors(&tensors, storage)?;
        self.write_with(out, &bytes)
    }
}

/// A checkpoint file by its format: safetensors, else a PyTorch pickle (`.bin`, `.pt`,
/// `.ckpt`).
pub fn open_weights(path: &Path) -> Result<Weights<'static>> {
    let mut head = [0u8; 9];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| Error::io(path, e))?;
    // safetensors starts with a u64 header length and `{`.
    if n == 9 && head[8] == b'{' {
        return Weights::from_safetensors_file(path);
    }
    #[cfg(feature = "pytorch")]
    {
        Weights::from_pytorch_file(path)
    }
    #[cfg(not(feature = "pytorch"))]
    Err(Error::Input(format!(
        "{}: not safetensors, and this build cannot read PyTorch checkpoints (feature `pytorch`)",
        path.display()
    )))
}

/// Writes a file through a temporary name, synced, then renamed into place.
pub fn write_synced(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
