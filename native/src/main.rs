//! `vlsm`: the command-line shell over the `vlsm` library.

mod backend;
mod bench;
mod convert;
mod download;
mod hub;
mod model_source;
mod plot;
mod prompts;
mod report;
mod segment;
mod share;
mod synthetic;
mod timing;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vlsm",
    version,
    about = "Text-prompted medical image segmentation with vision-language segmentation models",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Largest image accepted, in pixels (width × height), for every command; larger
    /// ones are refused from their header before decoding. At most 900000000.
    #[arg(long, global = true, value_name = "N", default_value_t = vlsm::preprocess::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// A local mirror of Hugging Face repositories, laid out ROOT/<org>/<name>/ (what an
    /// air-gapped site keeps): hub ids resolve there first, then in the Hugging Face cache,
    /// then on the network [env: VLSM_HUB_MIRROR].
    #[arg(long, global = true, value_name = "ROOT")]
    hub_mirror: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Segment images with text prompts; writes mask and overlay PNGs.
    Segment(segment::SegmentArgs),
    /// Rewrite a Hugging Face CLIPSeg directory with safetensors weights (for the browser).
    Convert(convert::ConvertArgs),
    /// Print a link to the browser page that reproduces a result (image, prompts, weights).
    Share(share::ShareArgs),
    /// Recompute a share link natively; prints each mask's fingerprint.
    Reproduce(share::ReproduceArgs),
    /// Evaluate models on medvlsm-layout datasets across prompts (resumable, shardable);
    /// `vlsm bench merge` combines shards.
    Bench(bench::BenchArgs),
    /// Tables (markdown, JSON) and Dice-vs-prompt plots (PNG, SVG) from bench results.
    Report(report::ReportArgs),
    /// Write medvlsm-style P0–P9 annotations (anns/<split>.json) for your own images and
    /// masks: size, count and location measured from each mask as medvlsm does.
    Prompts(prompts::PromptsArgs),
    /// Fine-tune CLIPSeg's decoder on medvlsm-layout data (the study's recipe); exports a
    /// Hugging Face model directory.
    Train(train::TrainArgs),
    /// Write a small synthetic dataset (bright ellipses) in medvlsm's layout, to try
    /// training and benchmarking without real data.
    Synthetic(synthetic::SyntheticArgs),
}

/// The text a panic was raised with (`panic!("…")` carries a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown")
}

/// Keeps freed tensor buffers in the process instead of giving them back to the system.
/// glibc's defaults map every buffer above 128 KiB (up to 32 MiB once it adapts) afresh and
/// unmap it when freed, so each op's output (activations of 1–30 MB) is page-faulted in
/// and zeroed again: a fifth of a training step's time. Peak memory is unchanged (freed
/// buffers are reused), but the process keeps up to its peak until it exits.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread runs.
    unsafe {
        // 32 MiB is the largest mmap threshold glibc accepts on 64-bit systems.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    // A panic is a bug, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = panic_message(info.payload());
        eprintln!(
            "error: internal error (please report): {}",
            msg.lines().next().unwrap_or("")
        );
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // `vlsm` alone: the command list, as a usage error.
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            // clap's message starts `error: …` and may continue on the next lines (the names
            // of missing arguments) before a blank line, then a suggestion (`tip: …`) and
            // usage hints: one line of the message and its tips.
            let text = e.render().to_string();
            let mut message = vec![
                text.lines()
                    .take_while(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" "),
            ];
            message.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| l.starts_with("tip:"))
                    .map(|l| l.trim_start_matches("tip:").trim().to_string()),
            );
            eprintln!("{}", message.join("; "));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = vlsm::preprocess::set_max_pixels(cli.max_pixels) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(root) = cli.hub_mirror {
        if !root.is_dir() {
            eprintln!("error: --hub-mirror {}: not a folder", root.display());
            return ExitCode::from(2);
        }
        hub::set_mirror(root);
    }
    let result = match cli.command {
        Command::Segment(args) => segment::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Share(args) => share::share(args),
        Command::Reproduce(args) => share::reproduce(args),
        Command::Bench(args) => bench::run(args),
        Command::Report(args) => report::run(args),
        Command::Prompts(args) => prompts::run(args),
        Command::Train(args) => train::run(args),
        Command::Synthetic(args) => synthetic::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
