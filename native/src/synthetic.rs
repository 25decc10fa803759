//! `vlsm synthetic ROOT`: a small synthetic dataset in medvlsm's layout (bright ellipses on a
//! textured background), to try `vlsm train` and `vlsm bench` without real data.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::json;

#[derive(clap::Args)]
pub struct SyntheticArgs {
    /// Written: ROOT/ellipses/{images,masks,anns/{train,val,test}.json}.
    root: PathBuf,
    #[arg(long, default_value_t = 64)]
    train: usize,
    #[arg(long, default_value_t = 16)]
    val: usize,
    #[arg(long, default_value_t = 16)]
    test: usize,
    /// Image side in pixels.
    #[arg(long, default_value_t = 96)]
    size: u32,
}

pub fn run(args: SyntheticArgs) -> Result<()> {
    if !(16..=2048).contains(&args.size) {
        bail!("--size {}: use 16 to 2048 pixels", args.size);
    }
    let dir = args.root.join("ellipses");
    for sub in ["images", "masks", "anns"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let mut seed = 0u64;
    for (split, count) in [
        ("train", args.train),
        ("val", args.val),
        ("test", args.test),
    ] {
        let mut entries = Vec::new();
        for _ in 0..count {
            seed += 1;
            let (image, mask) = vlsm::synthetic::ellipse_sample(seed, args.size);
            let name = format!("{split}_{seed:05}.png");
            crate::segment::write_atomic(
                &dir.join("images").join(&name),
                &vlsm::render::encode_png(&image)?,
            )?;
            crate::segment::write_atomic(
                &dir.join("masks").join(&name),
                &vlsm::render::encode_png(&mask)?,
            )?;
            entries.push(json!({
                "img_name": name, "mask_name": name,
                "prompts": {"p0": "", "p1": "bright ellipse", "p2": ["bright ellipse", "light oval blob"]},
            }));
        }
        crate::segment::write_atomic(
            &dir.join("anns").join(format!("{split}.json")),
            &serde_json::to_vec_pretty(&entries)?,
        )?;
    }
    println!("{}", dir.display());
    Ok(())
}
