//! Wall and CPU time of a phase, and peak memory, for `--timings`.

use std::time::Instant;

/// CPU seconds (user + system) this process has used so far.
pub fn cpu_seconds() -> f64 {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
        // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
        let usage = unsafe {
            if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
                return 0.0;
            }
            usage.assume_init()
        };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(usage.ru_utime) + secs(usage.ru_stime)
    }
    #[cfg(not(unix))]
    {
        0.0
    }
}

/// Peak resident memory of this process, in MiB (Linux: VmHWM).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Accumulates named phases; prints a table to stderr when enabled.
pub struct Timings {
    enabled: bool,
    rows: Vec<(String, f64, f64)>,
}

impl Timings {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            rows: Vec::new(),
        }
    }

    pub fn measure<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> T {
        let (wall, cpu) = (Instant::now(), cpu_seconds());
        let out = f();
        let row = (
            name.to_string(),
            wall.elapsed().as_secs_f64(),
            cpu_seconds() - cpu,
        );
        match self.rows.iter_mut().find(|r| r.0 == name) {
            Some(r) => {
                r.1 += row.1;
                r.2 += row.2;
            }
            None => self.rows.push(row),
        }
        out
    }

    pub fn report(&self) {
        if !self.enabled {
            return;
        }
        eprintln!("timings: {:<16} {:>10} {:>10}", "phase", "wall s", "cpu s");
        for (name, wall, cpu) in &self.rows {
            eprintln!("timings: {name:<16} {wall:>10.3} {cpu:>10.3}");
        }
        if let Some(peak) = peak_rss_mib() {
            eprintln!("timings: peak RSS {peak:.0} MiB");
        }
    }
}
