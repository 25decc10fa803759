//! `vlsm bench merge SHARD_DIR... --out DIR`: one results folder from the folders of
//! `--shard K/N` runs.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Result, bail};

use super::results::{self, RESULTS, Row, RunConfig};
use super::shard_of;

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The shards' `--out` folders (each with bench.json and results.csv).
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// The merged folder (results.csv and bench.json).
    #[arg(long)]
    out: PathBuf,
    /// Merge even if some shard has not finished, or its folder is missing (its rows stay
    /// missing; the merged run is marked unfinished).
    #[arg(long)]
    partial: bool,
}

pub fn run(args: MergeArgs) -> Result<()> {
    let mut configs = Vec::new();
    for dir in &args.shards {
        if args.partial && !dir.exists() {
            eprintln!(
                "warning: {} does not exist; merging without it (--partial)",
                dir.display()
            );
            continue;
        }
        let Some(config) = RunConfig::read(dir)? else {
            bail!(
                "{} has no bench.json: not a vlsm bench folder",
                dir.display()
            );
        };
        let Some([k, n]) = config.shard else {
            bail!(
                "{} is not a shard (it was run without --shard)",
                dir.display()
            );
        };
        configs.push((dir, config, k, n));
    }
    let Some((first_dir, first, _, n)) = configs.first() else {
        bail!("none of the shard folders exists");
    };
    for (dir, config, _, _) in &configs[1..] {
        let diffs = first.differences(config, true);
        if !diffs.is_empty() {
            bail!(
                "{} and {} were run with different options ({}): refusing to merge",
                first_dir.display(),
                dir.display(),
                diffs.join("; ")
            );
        }
    }
    let mut by_index: HashMap<usize, &PathBuf> = HashMap::new();
    for (dir, _, k, _) in &configs {
        if let Some(other) = by_index.insert(*k, dir) {
            bail!(
                "{} and {} are both shard {k}/{n}",
                other.display(),
                dir.display()
            );
        }
    }
    let missing: Vec<String> = (1..=*n)
        .filter(|k| !by_index.contains_key(k))
        .map(|k| format!("{k}/{n}"))
        .collect();
    if !missing.is_empty() && !args.partial {
        bail!(
            "shard {} missing: pass every shard's folder (or merge with --partial)",
            missing.join(", ")
        );
    }
    if !missing.is_empty() {
        eprintln!(
            "warning: shard {} missing; its rows stay missing (--partial)",
            missing.join(", ")
        );
    }
    for (dir, config, k, _) in &configs {
        if !config.finished && !args.partial {
            bail!(
                "shard {k}/{n} in {} has not finished: rerun its command to resume it (or merge with --partial)",
                dir.display()
            );
        }
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut origin: HashMap<results::RowKey, usize> = HashMap::new();
    for (dir, _, k, _) in &configs {
        let path = dir.join(RESULTS);
        let shard_rows = if path.exists() {
            results::read(&path, false)?
        } else {
            Vec::new()
        };
        for row in shard_rows {
            let belongs = shard_of(&row.dataset, &row.split, row.entry, *n);
            if belongs != *k {
                bail!(
                    "{} holds a row of shard {belongs}/{n} ({} {} entry {:?}): not made by this vlsm's sharding",
                    path.display(),
                    row.dataset,
                    row.split,
                    row.entry
                );
            }
            if let Some(other) = origin.insert(row.key(), *k) {
                bail!(
                    "the row ({} {} {} entry {:?} {} member {}) is in shard {other} and shard {k}",
                    row.model,
                    row.dataset,
                    row.split,
                    row.entry,
                    row.prompt_id,
                    row.member
                );
            }
            rows.push(row);
        }
    }
    // The order an unsharded run writes: models, datasets as configured, then entries.
    let model_order = |m: &str| first.models.iter().position(|x| x.name == m);
    let dataset_order = |d: &str| first.datasets.iter().position(|x| x == d);
    rows.sort_by_key(|r| {
        (
            model_order(&r.model),
            dataset_order(&r.dataset),
            split_order(&r.dataset, &first.split, &r.split),
            r.entry,
            vlsm::dataset::prompt_number(&r.prompt_id),
            r.prompt_id.clone(),
            r.member,
        )
    });
    std::fs::create_dir_all(&args.out)?;
    if args.out.join(RESULTS).exists() {
        bail!(
            "{} already has a results.csv: merge into a new folder",
            args.out.display()
        );
    }
    results::write_all(&args.out.join(RESULTS), &rows)?;
    let mut merged = first.clone();
    merged.shard = None;
    merged.finished = missing.is_empty() && configs.iter().all(|(_, c, _, _)| c.finished);
    merged.write(&args.out)?;
    eprintln!(
        "merged {} shards: {} rows in {}",
        configs.len(),
        rows.len(),
        args.out.join(RESULTS).display()
    );
    Ok(())
}

/// Position of a split among those read for `--split` (test before train for CVC-300 & co.).
fn split_order(dataset: &str, requested: &str, split: &str) -> usize {
    vlsm::dataset::splits_for(dataset, requested)
        .iter()
        .position(|s| s == split)
        .unwrap_or(usize::MAX)
}
