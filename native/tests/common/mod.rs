//! Helpers for the CLI tests: running the binary, fixture paths, a stand-in for the
//! Hugging Face hub on 127.0.0.1.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// `../shared/<path>` beside the checkout (the project's shared fixtures).
pub fn shared(path: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(path);
    assert!(
        p.exists(),
        "{} is missing (the shared/ folder)",
        p.display()
    );
    p
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `vlsm train` on the synthetic `ellipses` dataset under `root`, from `model`, into `run`.
pub fn train_args(model: &Path, root: &Path, run: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--weights",
        s(model),
        "--data",
        s(root),
        "--datasets",
        "ellipses",
        "--out",
        s(run),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

pub fn train(model: &Path, root: &Path, run: &Path, extra: &[&str]) -> Output {
    let args = train_args(model, root, run, extra);
    vlsm(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
}

pub fn vlsm(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlsm"));
    cmd.args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("HF_ENDPOINT");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("the vlsm binary runs")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The fingerprints `vlsm reproduce` prints (second tab-separated column), after checking
/// that it succeeded.
pub fn reproduced_fingerprints(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "{}", stderr(out));
    stdout(out)
        .lines()
        .map(|l| {
            l.split('\t')
                .nth(1)
                .expect("index\tfingerprint\t…")
                .to_string()
        })
        .collect()
}

/// The command failed with exactly one `error: …` line on stderr, and no panic.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("error: "), "not an error line: {err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "error does not mention `{needle}`: {err}"
    );
}

/// Reads a float32 `.npy` written by `vlsm segment --save-logits`.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape_text = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data = bytes[10 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (shape, data)
}

/// Reads one f32 or f64 tensor from a safetensors file, as f32.
pub fn reference(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        other => panic!("{name}: {other:?}, not a float tensor"),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copies a fixture model directory (symlinks resolved) so a test can damage it.
pub fn copy_model(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "reference.safetensors" {
            continue;
        }
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    dst
}

/// Serves `repos` (repo id → model directory) the way the Hugging Face hub answers
/// `GET /{repo}/resolve/main/{file}` (ETag, X-Repo-Commit, Range requests), on 127.0.0.1.
/// Runs until the test process exits. Returns the endpoint URL.
pub fn serve_hub(repos: Vec<(String, PathBuf)>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let repos = repos.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, &repos);
            });
        }
    });
    format!("http://{addr}")
}

fn answer(mut stream: TcpStream, repos: &[(String, PathBuf)]) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap_or((v.trim(), ""));
            range = Some((a.parse::<usize>().unwrap_or(0), b.parse::<usize>().ok()));
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let file = repos.iter().find_map(|(repo, dir)| {
        let name = path.strip_prefix(&format!("/{repo}/resolve/main/"))?;
        let p = dir.join(name);
        (!name.contains("..") && p.is_file()).then_some(p)
    });
    let Some(file) = file else {
        let body = b"Entry not found";
        write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        return stream.write_all(body);
    };
    let mut bytes = Vec::new();
    std::fs::File::open(&file)?.read_to_end(&mut bytes)?;
    let etag = format!(
        "{:x}",
        bytes
            .iter()
            .fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64)
                .wrapping_mul(0x100000001b3))
    );
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let (status, start, end) = match range {
        Some((a, b)) => (
            "206 Partial Content",
            a.min(bytes.len()),
            b.map_or(bytes.len(), |b| (b + 1).min(bytes.len())),
        ),
        None => ("200 OK", 0, bytes.len()),
    };
    let body = &bytes[start..end];
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nETag: \"{etag}\"\r\nX-Repo-Commit: {commit}\r\nConnection: close\r\n\r\n",
        body.len(),
        end.saturating_sub(1),
        bytes.len()
    )?;
    stream.write_all(body)
}

/// `vlsm synthetic ROOT` with 64 training, 16 validation and 8 test images.
pub fn synthetic(root: &Path) {
    let out = vlsm(
        &[
            "synthetic",
            root.to_str().unwrap(),
            "--train",
            "64",
            "--val",
            "16",
            "--test",
            "8",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The trainer's best of a run's validation Dice values, in epoch order: a Dice counts only
/// when it beats the best so far by more than 1e-4 (Lightning's min_delta), so a later epoch
/// that tops it by less is not the exported one.
pub fn trainers_best(val_dice: impl IntoIterator<Item = f64>) -> f64 {
    val_dice.into_iter().fold(
        f64::NEG_INFINITY,
        |best, d| if d > best + 1e-4 { d } else { best },
    )
}

/// A resumed run left the same files as the uninterrupted one: `metrics.csv` and `files`,
/// byte for byte.
pub fn assert_same_run(whole: &Path, resumed: &Path, files: &[&str]) {
    assert_eq!(
        std::fs::read_to_string(whole.join("metrics.csv")).unwrap(),
        std::fs::read_to_string(resumed.join("metrics.csv")).unwrap(),
        "metrics.csv: the resumed run differs from the uninterrupted one"
    );
    for file in files {
        assert!(
            std::fs::read(whole.join(file)).unwrap() == std::fs::read(resumed.join(file)).unwrap(),
            "{file}: the resumed run differs from the uninterrupted one"
        );
    }
}

/// A dataset `ROOT/ctvol` of the NIfTI fixture volume (`images/vol.nii.gz`) and a label
/// volume over its grid (`masks/vol.nii.gz`: 1 where the value is above 600); its folder.
pub fn volume_dataset(root: &Path) -> PathBuf {
    let dir = root.join("ctvol");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("masks")).unwrap();
    let volume_path = fixture("nifti").join("volume.nii.gz");
    std::fs::copy(&volume_path, dir.join("images/vol.nii.gz")).unwrap();
    let volume = vlsm::nifti::read(&std::fs::read(&volume_path).unwrap()).unwrap();
    let labels: Vec<u8> = volume.values.iter().map(|&v| u8::from(v > 600.0)).collect();
    std::fs::write(
        dir.join("masks/vol.nii.gz"),
        volume.label_file(&labels, true).unwrap(),
    )
    .unwrap();
    dir
}
