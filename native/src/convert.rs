//! `vlsm convert DIR OUT [--fp16]`: a Hugging Face CLIPSeg directory with its weights
//! rewritten as `model.safetensors` (HF key names and layouts kept), for the browser and for
//! anyone who cannot read PyTorch pickles.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use vlsm::files::DirFiles;
use vlsm::weights::write_safetensors;

use crate::segment::write_atomic;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Hugging Face model directory (model.safetensors or pytorch_model.bin).
    dir: PathBuf,
    /// Output directory (created).
    out: PathBuf,
    /// Store weights as float16 (half the size; logits change slightly).
    #[arg(long)]
    fp16: bool,
}

pub fn run(args: ConvertArgs) -> Result<()> {
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
    let bytes = write_safetensors(&tensors, args.fp16)?;
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
        if args.fp16 { "float16" } else { "float32" },
        target.display()
    );
    Ok(())
}
