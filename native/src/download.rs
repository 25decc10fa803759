//! Every download vlsm makes (hub files, a share link's weights and image): http(s) only,
//! with a size cap per file, connect and read timeouts, a minimum rate, and redirects
//! followed by hand (at most five, never to another scheme, never in a loop). A body is
//! written to a temporary file and renamed into place only when complete, so an
//! interrupted or refused download never becomes a cache entry.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A body must arrive at this rate on average once the timeout's grace period is over.
const MIN_RATE: u64 = 64 << 10;

/// The longest wait for any byte once connected, and the grace period before the minimum
/// rate applies: 30 s, or `VLSM_HTTP_TIMEOUT` seconds (1–3600).
fn timeout() -> Duration {
    let secs = std::env::var("VLSM_HTTP_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// What a completed download's first (pre-redirect) response said about itself: the hub
/// sends its commit and the file's ETag there.
pub struct Fetched {
    pub headers: Vec<(String, String)>,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// GETs `url` into `sink`, at most `cap` bytes. `Ok(None)` on 404. `on_progress(done,
/// total)` is called as the body arrives.
pub fn get(
    url: &str,
    cap: u64,
    sink: &mut impl Write,
    mut on_progress: impl FnMut(u64, Option<u64>),
) -> Result<Option<Fetched>> {
    let timeout = timeout();
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT.min(timeout))
        .timeout_read(timeout)
        .timeout_write(timeout)
        .redirects(0)
        .build();
    let mut current = parse_http_url(url)?;
    let mut seen = HashSet::new();
    let mut first_headers = None;
    let response = loop {
        if !seen.insert(current.to_string()) {
            bail!("{url}: redirect loop at {current}");
        }
        let response = match agent.request_url("GET", &current).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) => return Ok(None),
            Err(ureq::Error::Status(code, r)) => {
                bail!("{current}: HTTP {code} {}", r.status_text())
            }
            // The transport error names the URL itself.
            Err(ureq::Error::Transport(t)) => return Err(t.into()),
        };
        if first_headers.is_none() {
            first_headers = Some(
                response
                    .headers_names()
                    .into_iter()
                    .filter_map(|n| Some((n.clone(), response.header(&n)?.to_string())))
                    .collect::<Vec<_>>(),
            );
        }
        if !(300..400).contains(&response.status()) {
            break response;
        }
        if seen.len() > MAX_REDIRECTS {
            bail!("{url}: more than {MAX_REDIRECTS} redirects");
        }
        let location = response
            .header("location")
            .with_context(|| format!("{current}: redirect without a Location"))?;
        let next = current
            .join(location)
            .with_context(|| format!("{current}: bad redirect Location `{location}`"))?;
        if !matches!(next.scheme(), "http" | "https") {
            bail!(
                "{current}: refuses a redirect to a {}: URL (only http and https are followed)",
                next.scheme()
            );
        }
        current = next;
    };
    let announced = response
        .header("content-length")
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .with_context(|| format!("{current}: bad Content-Length `{v}`"))
        })
        .transpose()?;
    if let Some(n) = announced
        && n > cap
    {
        bail!(
            "{current}: {} is larger than the {} allowed for this file",
            human(n),
            human(cap)
        );
    }
    let started = Instant::now();
    let mut reader = response.into_reader().take(cap + 1);
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .with_context(|| format!("downloading {current} (after {})", human(done)))?;
        if n == 0 {
            break;
        }
        done += n as u64;
        if done > cap {
            bail!(
                "{current}: more than the {} allowed for this file",
                human(cap)
            );
        }
        if announced.is_some_and(|a| done > a) {
            bail!("{current}: the body is longer than its Content-Length");
        }
        let elapsed = started.elapsed();
        if elapsed > timeout && done < MIN_RATE * elapsed.as_secs() {
            bail!(
                "{current}: too slow ({} in {} s; at least {}/s is needed)",
                human(done),
                elapsed.as_secs(),
                human(MIN_RATE)
            );
        }
        sink.write_all(&buf[..n])
            .with_context(|| format!("writing {current}"))?;
        on_progress(done, announced);
    }
    if let Some(a) = announced
        && done != a
    {
        bail!("{current}: the connection closed after {done} of {a} bytes (truncated download)");
    }
    Ok(Some(Fetched {
        headers: first_headers.unwrap_or_default(),
    }))
}

/// `url` parsed, refused unless it is http(s).
pub fn parse_http_url(url: &str) -> Result<url::Url> {
    let parsed = url::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        bail!("`{url}`: only http and https URLs are fetched");
    }
    Ok(parsed)
}

/// GETs `url` into memory (at most `cap` bytes); `Ok(None)` on 404.
pub fn get_bytes(url: &str, cap: u64) -> Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    Ok(get(url, cap, &mut bytes, |_, _| {})?.map(|_| bytes))
}

/// GETs `url` into the file `path` through a temporary name beside it (renamed only once
/// complete), showing a progress bar for large files. `Ok(None)` on 404.
pub fn get_file(url: &str, cap: u64, path: &Path) -> Result<Option<Fetched>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let tmp = temporary(path);
    let mut out = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
    let bar = indicatif::ProgressBar::hidden();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let got = get(url, cap, &mut out, |done, total| {
        if bar.is_hidden() && done > (1 << 20) {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(name.clone());
        }
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
    })
    .and_then(|got| {
        out.sync_all().with_context(|| tmp.display().to_string())?;
        Ok(got)
    });
    bar.finish_and_clear();
    drop(out);
    match got {
        Ok(Some(fetched)) => {
            std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
            Ok(Some(fetched))
        }
        other => {
            let _ = std::fs::remove_file(&tmp);
            other
        }
    }
}

/// `.NAME.partPID` beside `path`: never mistaken for the file itself.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.part{}", std::process::id()))
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} bytes"),
    }
}
