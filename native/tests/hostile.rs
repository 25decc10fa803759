//! Hostile input end to end: decompression bombs on every command that decodes images,
//! servers that never stop, never answer, drip, redirect to `file:` or in a loop, and
//! checkpoints that ask for the impossible. Each run is under a 4 GiB address-space limit;
//! each must end with one `error:` line and exit 1, within its timeout, under 1 GiB of
//! resident memory, leaving no partial file in a cache.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn hostile(name: &str) -> PathBuf {
    fixture("hostile").join(name)
}

/// Runs `vlsm` under a 4 GiB address-space limit; returns its output, its peak resident
/// memory in MiB and its wall time.
// The child is reaped by `wait4` below, which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn vlsm_bounded(args: &[&str], envs: &[(&str, &str)]) -> (Output, u64, Duration) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlsm"));
    cmd.args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("HF_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: 4 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("vlsm runs");
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    // wait4 gives this child's own peak RSS (getrusage(RUSAGE_CHILDREN) would mix in the
    // children of tests running in parallel).
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = child.id() as libc::pid_t;
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let elapsed = started.elapsed();
    let output = Output {
        status: std::os::unix::process::ExitStatusExt::from_raw(status),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    (output, usage.ru_maxrss as u64 / 1024, elapsed)
}

/// The run failed cleanly (one `error:` line naming `needle`, exit 1), stayed under 1 GiB
/// and finished within `seconds`.
fn assert_bounded_error(run: &(Output, u64, Duration), needle: &str, seconds: u64) {
    let (out, rss_mib, elapsed) = run;
    // `reproduce` says which file it is downloading before the error.
    let mut out = out.clone();
    out.stderr = stderr(&out)
        .lines()
        .filter(|l| !l.starts_with("downloading "))
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    let out = &out;
    assert_clean_error(out, needle);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    assert!(
        *rss_mib < 1024,
        "peak memory {rss_mib} MiB: {}",
        stderr(out)
    );
    assert!(
        elapsed.as_secs() < seconds,
        "took {elapsed:?}: {}",
        stderr(out)
    );
}

/// `vlsm segment IMAGE --weights W --prompt "a polyp" --out OUT EXTRA…`, bounded.
fn segment_bounded(
    image: &Path,
    weights: &Path,
    out: &Path,
    extra: &[&str],
) -> (Output, u64, Duration) {
    let mut args = vec![
        "segment",
        image.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--prompt",
        "a polyp",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    vlsm_bounded(&args, &[])
}

const BOMBS: [&str; 6] = [
    "bomb_30000x30000_1bit.png",
    "bomb_rgba16_header.png",
    "over_budget_8001x8000.png",
    "bomb_30000x30000.tiff",
    "bomb_30000x30000_rle8.bmp",
    "bomb_30000x30000.jpg",
];

#[test]
fn segment_and_share_refuse_every_bomb_from_its_header() {
    let tmp = tempfile::tempdir().unwrap();
    let weights = fixture("clipseg_simple");
    for bomb in BOMBS {
        let image = hostile(bomb);
        let run = segment_bounded(&image, &weights, &tmp.path().join("out"), &[]);
        assert_bounded_error(&run, "over the limit", 30);
        assert!(
            !tmp.path().join("out").exists()
                || std::fs::read_dir(tmp.path().join("out"))
                    .unwrap()
                    .next()
                    .is_none(),
            "{bomb}: something was written"
        );
        let run = vlsm_bounded(
            &[
                "share",
                image.to_str().unwrap(),
                "--prompt",
                "a polyp",
                "--weights-url",
                "https://example.org/m/",
                "--weights",
                weights.to_str().unwrap(),
            ],
            &[],
        );
        assert_bounded_error(&run, "over the limit", 30);
    }
    // --max-pixels raises (or lowers) the budget, within bounds.
    let small = fixture("images/rgb_150x100.png");
    let run = segment_bounded(
        &small,
        &weights,
        &tmp.path().join("out"),
        &["--max-pixels", "10000"],
    );
    assert_bounded_error(&run, "over the limit of 10000", 30);
    let out = vlsm(
        &["segment", "x.png", "-p", "polyp", "--max-pixels", "0"],
        &[],
    );
    assert_clean_error(&out, "--max-pixels");
}

/// A share link for `image` (one prompt) with weights at `weights_url`.
fn link(image: vlsm::share::ImageSource, image_sha256: String, weights_url: &str) -> String {
    vlsm::share::ShareState {
        weights_url: weights_url.into(),
        weights_sha256: None,
        model: None,
        prompts: vec!["a polyp".into()],
        threshold: 0.5,
        view: vlsm::share::ViewSettings {
            opacity: 0.5,
            selected: 0,
        },
        image,
        image_sha256,
        masks: Vec::new(),
        margin: vlsm::mask_check::BORDERLINE_MARGIN,
        clinical: None,
    }
    .to_link("http://127.0.0.1:8080/")
    .unwrap()
}

#[test]
fn a_link_carrying_a_bomb_is_refused() {
    let png = std::fs::read(hostile("bomb_rgba16_header.png")).unwrap();
    let name = "x.png".to_string();
    let link = link(
        vlsm::share::ImageSource::Embedded { name, png },
        "00".repeat(32),
        "https://example.org/m/",
    );
    let weights = fixture("clipseg_simple");
    let run = vlsm_bounded(
        &["reproduce", &link, "--weights", weights.to_str().unwrap()],
        &[],
    );
    assert_bounded_error(&run, "over the limit", 30);
}

/// How a hostile server answers every request.
#[derive(Clone, Copy)]
enum Behaviour {
    /// 200, no Content-Length, zeros until the client hangs up.
    Endless,
    /// 200 announcing 100 GB.
    HugeContentLength,
    /// Reads the request and never answers.
    Silent,
    /// 200 announcing 100 bytes, then one byte every two seconds.
    Drip,
    /// 302 to `file:///etc/passwd`.
    RedirectToFile,
    /// 302 from `/a…` to `/b…` and back.
    RedirectLoop,
}

fn serve(behaviour: Behaviour) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = answer(stream, behaviour);
            });
        }
    });
    format!("http://{addr}")
}

fn answer(mut stream: TcpStream, behaviour: Behaviour) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    match behaviour {
        Behaviour::Endless => {
            stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")?;
            let zeros = vec![0u8; 1 << 16];
            loop {
                stream.write_all(&zeros)?;
            }
        }
        Behaviour::HugeContentLength => {
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n")?;
            let zeros = vec![0u8; 1 << 16];
            loop {
                stream.write_all(&zeros)?;
            }
        }
        Behaviour::Silent => {
            std::thread::sleep(Duration::from_secs(120));
            Ok(())
        }
        Behaviour::Drip => {
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")?;
            for _ in 0..100 {
                stream.write_all(b"{")?;
                std::thread::sleep(Duration::from_secs(2));
            }
            Ok(())
        }
        Behaviour::RedirectToFile => write!(
            stream,
            "HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\n\r\n"
        ),
        Behaviour::RedirectLoop => {
            let next = match path.strip_prefix("/a") {
                Some(rest) => format!("/b{rest}"),
                None => format!("/a{}", path.strip_prefix("/b").unwrap_or(&path)),
            };
            write!(
                stream,
                "HTTP/1.1 302 Found\r\nLocation: {next}\r\nContent-Length: 0\r\n\r\n"
            )
        }
    }
}

/// Total bytes of the regular files under `dir`, and whether any is a finished model file.
fn cache_contents(dir: &Path) -> (u64, Vec<String>) {
    let mut total = 0;
    let mut names = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else {
                total += meta.len();
                names.push(p.display().to_string());
            }
        }
    }
    (total, names)
}

fn segment_from_hub(endpoint: &str, hf_home: &Path) -> (Output, u64, Duration) {
    let image = fixture("images/rgb_53x37.png");
    vlsm_bounded(
        &[
            "segment",
            image.to_str().unwrap(),
            "--model",
            "org/model",
            "--prompt",
            "a polyp",
            "--out",
            hf_home.join("out").to_str().unwrap(),
        ],
        &[
            ("HF_ENDPOINT", endpoint),
            ("HF_HOME", hf_home.to_str().unwrap()),
            ("VLSM_HTTP_TIMEOUT", "2"),
        ],
    )
}

fn reproduce_from_url(weights_url: &str, cache: &Path) -> (Output, u64, Duration) {
    let png = std::fs::read(fixture("images/rgb_53x37.png")).unwrap();
    let rgb = vlsm::preprocess::decode_rgb(&png).unwrap();
    let embedded = vlsm::share::ImageSource::Embedded {
        name: "x.png".into(),
        png: vlsm::share::embeddable_png(&rgb).unwrap().unwrap(),
    };
    let link = link(embedded, vlsm::share::pixels_sha256(&rgb), weights_url);
    vlsm_bounded(
        &["reproduce", &link],
        &[
            ("VLSM_CACHE", cache.to_str().unwrap()),
            ("VLSM_HTTP_TIMEOUT", "2"),
        ],
    )
}

#[test]
fn hostile_servers_are_cut_off_and_leave_no_cache_entry() {
    for (behaviour, needle, seconds) in [
        (Behaviour::Endless, "more than the 1.0 MiB allowed", 30),
        (
            Behaviour::HugeContentLength,
            "larger than the 1.0 MiB allowed",
            30,
        ),
        (Behaviour::Silent, "timed out", 30),
        (Behaviour::Drip, "too slow", 30),
        (
            Behaviour::RedirectToFile,
            "refuses a redirect to a file: URL",
            30,
        ),
        (Behaviour::RedirectLoop, "redirect loop", 30),
    ] {
        let endpoint = serve(behaviour);
        let tmp = tempfile::tempdir().unwrap();
        let run = segment_from_hub(&endpoint, tmp.path());
        assert_bounded_error(&run, needle, seconds);
        let (bytes, files) = cache_contents(tmp.path());
        assert!(files.is_empty(), "{needle}: left {files:?} ({bytes} bytes)");

        let cache = tmp.path().join("vlsm-cache");
        let run = reproduce_from_url(&format!("{endpoint}/models/m/"), &cache);
        assert_bounded_error(&run, needle, seconds);
        let (bytes, files) = cache_contents(&cache);
        assert!(files.is_empty(), "{needle}: left {files:?} ({bytes} bytes)");
    }
}

#[test]
fn an_image_url_redirecting_to_a_file_or_without_end_is_refused() {
    let weights = fixture("clipseg_simple");
    for (behaviour, needle) in [
        (
            Behaviour::RedirectToFile,
            "refuses a redirect to a file: URL",
        ),
        (Behaviour::Endless, "more than the 256.0 MiB allowed"),
    ] {
        let endpoint = serve(behaviour);
        let source = vlsm::share::ImageSource::Url {
            name: "x.png".into(),
            url: format!("{endpoint}/x.png"),
        };
        let link = link(source, "00".repeat(32), "https://example.org/m/");
        let run = vlsm_bounded(
            &["reproduce", &link, "--weights", weights.to_str().unwrap()],
            &[("VLSM_HTTP_TIMEOUT", "5")],
        );
        assert_bounded_error(&run, needle, 60);
    }
}

#[test]
fn a_checkpoint_asking_for_an_impossible_input_size_is_refused_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_model("clipseg_simple", tmp.path());
    std::fs::write(
        model.join("preprocessor_config.json"),
        r#"{"size": 999999984, "do_resize": true}"#,
    )
    .unwrap();
    let image = fixture("images/rgb_53x37.png");
    let run = segment_bounded(&image, &model, &tmp.path().join("out"), &[]);
    assert_bounded_error(&run, "too large", 30);
    let model = copy_model("clipseg_simple_bin", tmp.path());
    std::fs::copy(
        hostile("evil_os_system.bin"),
        model.join("pytorch_model.bin"),
    )
    .unwrap();
    let run = segment_bounded(&image, &model, &tmp.path().join("out"), &[]);
    assert_bounded_error(&run, "refuses pickle global posix.system", 30);
}
