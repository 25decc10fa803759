//! `vlsm convert [SOURCE] OUT [--fp16 | --int8]`: a model as one folder of safetensors weights, for
//! the browser and for anyone who cannot read PyTorch pickles. A Hugging Face CLIPSeg
//! directory keeps its HF key names and layouts; BiomedCLIPSeg(-D) (from its hub repos and
//! a decoder checkpoint, see `--weights`/`--arch`) becomes vlsm's BiomedCLIPSeg folder.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use vlsm::files::DirFiles;
use vlsm::weights::{Storage, write_safetensors};

use crate::model_source::{ModelArgs, ModelSource};
use crate::segment::write_atomic;

struct DirArgs {
    dir: PathBuf,
    out: PathBuf,
    storage: Storage,
}

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// [SOURCE] OUT: the model (a Hugging Face model directory, or what --weights takes;
    /// or give the model with --model/--weights/--arch) and the output directory (created).
    #[arg(required = true, num_args = 1..=2, value_name = "PATH")]
    paths: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Store weights as float16 (half the size; logits change slightly).
    #[arg(long)]
    fp16: bool,
    /// Store weights (linears, convolutions, embeddings) as int8 with a float32 scale per
    /// output channel: a quarter of the size, a smaller download for the browser page. The
    /// model still runs in f32 (the weights are widened as they load); logits change by
    /// about 1 % of their range.
    #[arg(long, conflicts_with = "fp16")]
    int8: bool,
}

pub fn run(mut args: ConvertArgs) -> Result<()> {
    let out = args.paths.pop().expect("one path at least");
    if let Some(source) = args.paths.pop() {
        if args.model.weights.is_some() {
            bail!("give the model either as SOURCE or with --weights, not both");
        }
        args.model.weights = Some(source);
    }
    let storage = if args.int8 {
        Storage::Int8
    } else {
        Storage::f16_if(args.fp16)
    };
    let source = args.model.resolve()?;
    let not_empty = |out: &std::path::Path| {
        out.exists()
            && out
                .read_dir()
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
    };
    if let Some(s) = source.cris_sources()? {
        if not_empty(&out) {
            bail!("{}: exists and is not empty", out.display());
        }
        s.load(&vlsm::burn::tensor::Device::flex())
            .with_context(|| format!("loading {}", s.checkpoint.display()))?;
        s.write_folder(&out, storage)?;
        println!("CRIS ({}) → {}", storage.name(), out.display());
        return Ok(());
    }
    if let ModelSource::Biomed(s) = &source {
        if not_empty(&out) {
            bail!("{}: exists and is not empty", out.display());
        }
        // Loading first: a model that cannot run is not worth writing.
        s.load(&vlsm::burn::tensor::Device::flex())?;
        s.write_folder(&out, storage, None)?;
        println!(
            "{} ({}) → {}",
            s.arch.display_name(),
            storage.name(),
            out.display()
        );
        return Ok(());
    }
    let ModelSource::Dir(dir) = source else {
        unreachable!("CRIS and BiomedCLIPSeg are handled above")
    };
    let args = DirArgs { dir, out, storage };
    let files = DirFiles::read(&args.dir)?;
    // Parse the config and tokenizer first: a directory we cannot use is not worth copying.
    vlsm::Pipeline::from_files(&files.model_files())?;
    let weights = files.weights()?;
    let mut tensors = Vec::new();
    for key in weights.keys() {
        let shape = weights.shape(key).expect("listed key").to_vec();
        let values = weights.read_f32(key, &shape)?;
        tensors.push((key.to_string(), shape, values));
    }
    if tensors.is_empty() {
        bail!(
            "{}: the checkpoint holds no float tensors",
            args.dir.display()
        );
    }
    let bytes = write_safetensors(&tensors, args.storage)?;
    if args.out.canonicalize().ok() == args.dir.canonicalize().ok() {
        bail!("OUT must differ from DIR");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    for (name, content) in files.side_files() {
        write_atomic(&args.out.join(name), content)?;
    }
    let target = args.out.join("model.safetensors");
    write_atomic(&target, &bytes)?;
    println!(
        "{} tensors, {:.1} MB ({}) → {}",
        tensors.len(),
        bytes.len() as f64 / 1e6,
        args.storage.name(),
        target.display()
    );
    Ok(())
}
