//! Messages between the page (UI thread) and the model worker. Control data is JSON; image
//! bytes and logits travel beside it as transferred `ArrayBuffer`s (no copies).

use serde::{Deserialize, Serialize};

/// Which device the worker runs the model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    /// WebGPU when the browser offers an adapter, else the CPU.
    Auto,
    WebGpu,
    Cpu,
}

impl Backend {
    pub fn label(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::WebGpu => "WebGPU",
            Backend::Cpu => "CPU",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Backend::Auto),
            "webgpu" | "WebGPU" => Some(Backend::WebGpu),
            "cpu" | "CPU" => Some(Backend::Cpu),
            _ => None,
        }
    }
}

/// Page → worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Fetch (or take from Cache Storage) the model below `url` and load it.
    Load { url: String, backend: Backend },
    /// Encode the image (the first buffer) once and decode every prompt.
    Segment { prompts: Vec<String> },
}

/// Worker → page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The worker's wasm is running.
    Ready,
    /// Downloading or reading a file.
    Progress {
        file: String,
        done: u64,
        total: Option<u64>,
        bytes_per_s: f64,
        from_cache: bool,
    },
    /// What the worker is doing now, in words.
    Status {
        text: String,
    },
    Loaded {
        /// The backend actually used, and why when it differs from the one asked for.
        backend: Backend,
        device: String,
        note: Option<String>,
        weights_sha256: String,
        weights_bytes: u64,
        dtype: String,
        from_cache: bool,
        download_ms: f64,
        load_ms: f64,
        /// The worker's wasm memory once the model is built: its high-water mark, since
        /// wasm memory never shrinks.
        wasm_memory_bytes: u64,
        input_size: usize,
        /// The model family (`clipseg`, `biomedclipseg`, `biomedclipseg-d`).
        model: String,
    },
    /// One logits buffer per prompt follows, `size`×`size` f32 each.
    Segmented {
        width: u32,
        height: u32,
        size: usize,
        encode_ms: f64,
        decode_ms: f64,
        truncated: Vec<bool>,
    },
    Error {
        message: String,
    },
    /// The worker hit a bug and must be restarted (the page does so).
    Crashed {
        message: String,
    },
}

impl ToWorker {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("messages serialise")
    }
    pub fn from_json(s: &str) -> Result<Self, String> {
        serde_json::from_str(s).map_err(|e| format!("bad message to the worker: {e}"))
    }
}

impl FromWorker {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("messages serialise")
    }
    pub fn from_json(s: &str) -> Result<Self, String> {
        serde_json::from_str(s).map_err(|e| format!("bad message from the worker: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = ToWorker::Load {
            url: "http://127.0.0.1/x".into(),
            backend: Backend::Cpu,
        };
        assert_eq!(ToWorker::from_json(&m.to_json()).unwrap(), m);
        let m = FromWorker::Segmented {
            width: 3,
            height: 4,
            size: 64,
            encode_ms: 1.5,
            decode_ms: 2.0,
            truncated: vec![false, true],
        };
        assert_eq!(FromWorker::from_json(&m.to_json()).unwrap(), m);
        assert!(FromWorker::from_json("{\"Nope\":1}").is_err());
        assert_eq!(Backend::parse("cpu"), Some(Backend::Cpu));
        assert_eq!(Backend::parse("x"), None);
    }
}
