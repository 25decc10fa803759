//! The model worker. It owns the network and the model: fetches a Hugging Face-layout
//! folder (Cache Storage first), loads it on WebGPU or the CPU, and segments images.
//! It is started from a `blob:` URL (see `app`), so the page's Content-Security-Policy
//! applies to its requests too.

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{ArrayBuffer, Float32Array, Uint8Array};
use sha2::{Digest, Sha256};
use vlsm::burn::tensor::Device;
use vlsm::weights::SafetensorsStream;
use vlsm::{ModelFiles, Segmenter};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};
use web_sys::{Cache, DedicatedWorkerGlobalScope, MessageEvent, Response};

use crate::js::{
    CacheCopy, STALL_MS, content_length, describe, fetch_within, now_ms, pack, read_body,
    read_body_chunks, unpack, within,
};
use crate::protocol::{Backend, FromWorker, ToWorker};

/// Cache Storage bucket for model files; bump the suffix if the entry format changes.
const CACHE_NAME: &str = "vlsm-models-v1";

struct Loaded {
    segmenter: Rc<Segmenter>,
}

thread_local! {
    static MODEL: RefCell<Option<Loaded>> = const { RefCell::new(None) };
    static BUSY: RefCell<bool> = const { RefCell::new(false) };
    static WEBGPU: RefCell<Option<Result<Device, String>>> = const { RefCell::new(None) };
}

fn scope() -> DedicatedWorkerGlobalScope {
    js_sys::global().unchecked_into()
}

fn post(message: FromWorker, buffers: Vec<ArrayBuffer>) {
    let (msg, transfer) = pack(&message.to_json(), buffers);
    // Posting only fails for non-transferable values; ours are plain buffers.
    let _ = scope().post_message_with_transfer(&msg, &transfer);
}

fn status(text: impl Into<String>) {
    post(FromWorker::Status { text: text.into() }, Vec::new());
}

/// Entry point: listen for requests, announce readiness.
pub fn start() {
    std::panic::set_hook(Box::new(|info| {
        post(
            FromWorker::Crashed {
                message: format!("the model worker crashed: {info}"),
            },
            Vec::new(),
        );
    }));
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(|event: MessageEvent| {
        spawn_local(handle(event.data()));
    });
    scope().set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    on_message.forget();
    post(FromWorker::Ready, Vec::new());
}

async fn handle(data: JsValue) {
    let busy = BUSY.with(|b| std::mem::replace(&mut *b.borrow_mut(), true));
    if busy {
        post(
            FromWorker::Error {
                message: "the model is busy; wait for the current step to finish".into(),
            },
            Vec::new(),
        );
        return;
    }
    let result = match unpack(&data)
        .and_then(|(json, buffers)| Ok((ToWorker::from_json(&json)?, buffers)))
    {
        Ok((ToWorker::Load { url, backend }, _)) => load(&url, backend).await,
        Ok((ToWorker::Segment { prompts }, buffers)) => match buffers.first() {
            Some(image) => segment(prompts, Uint8Array::new(image).to_vec()).await,
            None => Err("no image was sent".into()),
        },
        Err(e) => Err(e),
    };
    BUSY.with(|b| *b.borrow_mut() = false);
    if let Err(message) = result {
        post(FromWorker::Error { message }, Vec::new());
    }
}

/// One model file, from Cache Storage or the network.
struct Fetched {
    /// The file's bytes; empty for the weights, which went into `weights` as they arrived.
    bytes: Vec<u8>,
    /// The weights file, split into its tensors (see [`SafetensorsStream`]).
    weights: Option<SafetensorsStream>,
    /// The file's length in bytes.
    len: u64,
    from_cache: bool,
    sha256: Option<String>,
}

/// What reading one response gave, or why it stopped.
enum Read {
    Done(Fetched),
    /// The transfer failed (retrying may help).
    Failed(String),
    /// The bytes are not a safetensors file (retrying will not help).
    Invalid(String),
}

/// Reads a response's body: the weights into a [`SafetensorsStream`] tensor by tensor
/// (`stream`; errors name the file by `url`), anything else into bytes; hashing it when
/// `hash`, and writing it to the cache's `copy` when given. `progress` gets each chunk's
/// running total.
async fn read_file(
    response: &Response,
    url: &str,
    cap: u64,
    copy: Option<&CacheCopy>,
    stream: bool,
    hash: bool,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Read {
    let total = content_length(response);
    let mut hasher = hash.then(Sha256::new);
    let mut weights = stream.then(|| SafetensorsStream::new(url, total));
    let mut invalid = None;
    let mut bytes = Vec::new();
    let read = match weights.as_mut() {
        Some(weights) => {
            read_body_chunks(response, total, cap, copy, |chunk, done| {
                if let Some(h) = hasher.as_mut() {
                    h.update(chunk);
                }
                progress(done, total);
                weights.push(chunk).map_err(|e| {
                    invalid = Some(e.to_string());
                    "not a safetensors file".to_string()
                })
            })
            .await
        }
        None => read_body(response, total, cap, copy, |chunk, done| {
            if let Some(h) = hasher.as_mut() {
                h.update(chunk);
            }
            progress(done, total);
        })
        .await
        .map(|b| {
            bytes = b;
            bytes.len() as u64
        }),
    };
    if let Some(why) = invalid {
        return Read::Invalid(why);
    }
    let len = match read {
        Ok(len) => len,
        Err(e) => return Read::Failed(e),
    };
    if let Some(t) = total
        && t != len
    {
        return Read::Failed(format!("it stopped after {len} of {t} bytes"));
    }
    Read::Done(Fetched {
        bytes,
        weights,
        len,
        from_cache: false,
        sha256: hasher.map(|h| vlsm::share::hex(&h.finalize())),
    })
}

async fn open_cache() -> Option<Cache> {
    let storage = scope().caches().ok()?;
    JsFuture::from(storage.open(CACHE_NAME))
        .await
        .ok()?
        .dyn_into()
        .ok()
}

fn sha_key(url: &str) -> String {
    format!("{url}?vlsm-sha256")
}

/// Marks an optional file the server does not have, so a later offline visit knows.
fn absent_key(url: &str) -> String {
    format!("{url}?vlsm-absent")
}

async fn cached(cache: &Cache, url: &str) -> Option<Response> {
    let hit = JsFuture::from(cache.match_with_str(url)).await.ok()?;
    hit.dyn_into::<Response>().ok()
}

/// Fetches `url`; `Ok(None)` when the server says 404 and the file is optional. The
/// weights (`weights`: hashed, and split into tensors as they arrive, so the page never
/// holds the whole file) or any other file into bytes. A fresh download goes into Cache
/// Storage only when it arrived whole (the cache's copy is written as the body is read: if
/// the read fails, the copy is abandoned, `put` fails and stores nothing).
async fn fetch_file(
    cache: Option<&Cache>,
    url: &str,
    name: &str,
    optional: bool,
    weights: bool,
) -> Result<Option<Fetched>, String> {
    // Caps by file (the page's heap is at most 4 GiB: weights are capped lower than natively).
    let cap = vlsm::limits::download_cap(name).min(vlsm::limits::MAX_PAGE_WEIGHTS_BYTES);
    let started = now_ms();
    let mut last_post = 0.0;
    let mut progress = |done: u64, total: Option<u64>, from_cache: bool| {
        let t = now_ms();
        if t - last_post > 100.0 || Some(done) == total {
            last_post = t;
            let secs = ((t - started) / 1000.0).max(1e-3);
            post(
                FromWorker::Progress {
                    file: name.into(),
                    done,
                    total,
                    bytes_per_s: done as f64 / secs,
                    from_cache,
                },
                Vec::new(),
            );
        }
    };
    if optional
        && let Some(cache) = cache
        && cached(cache, &absent_key(url)).await.is_some()
    {
        return Ok(None);
    }
    if let Some(cache) = cache
        && let Some(response) = cached(cache, url).await
    {
        // Only the weights are hashed.
        let stored = match weights {
            true => cached(cache, &sha_key(url)).await,
            false => None,
        };
        let stored_sha = match stored {
            Some(r) => JsFuture::from(r.text().map_err(|e| describe(&e))?)
                .await
                .ok()
                .and_then(|v| v.as_string())
                .filter(|s| s.len() == 64),
            None => None,
        };
        // The hash stored with the entry, when there is one, spares hashing it again.
        let hash = weights && stored_sha.is_none();
        match read_file(&response, url, cap, None, weights, hash, |done, total| {
            progress(done, total, true)
        })
        .await
        {
            Read::Done(mut fetched) => {
                fetched.from_cache = true;
                if weights && fetched.sha256.is_none() {
                    fetched.sha256 = stored_sha;
                }
                return Ok(Some(fetched));
            }
            Read::Invalid(why) => return Err(why),
            // A damaged entry: forget it and download again.
            Read::Failed(_) => {
                let _ = JsFuture::from(cache.delete_with_str(url)).await;
            }
        }
    }
    let response: Response = fetch_within(scope().fetch_with_str(url), url).await?;
    if response.status() == 404 && optional {
        if let Some(cache) = cache
            && let Ok(marker) = Response::new_with_opt_str(Some("absent"))
        {
            let _ = JsFuture::from(cache.put_with_str(&absent_key(url), &marker)).await;
        }
        return Ok(None);
    }
    if !response.ok() {
        return Err(format!(
            "{url}: HTTP {} {}",
            response.status(),
            response.status_text()
        ));
    }
    // The cache takes a copy as the body is read when the server announced a length within
    // the cap. A body without a length is stored from the bytes once read and checked (so
    // such weights are held whole once, then split).
    let copy = match (cache, content_length(&response)) {
        (Some(cache), Some(total)) if total <= cap => CacheCopy::new(total)
            .ok()
            .map(|(copy, response)| (copy, cache.put_with_str(url, &response))),
        _ => None,
    };
    // On failure, abandon the cache's copy and wait (boundedly) for its `put` to fail, then
    // make sure no entry is left behind.
    let forget = async |copy: Option<(CacheCopy, js_sys::Promise)>| {
        if let Some((copy, put)) = copy {
            copy.abort();
            let _ = within(put, STALL_MS).await;
        }
        if let Some(cache) = cache {
            let _ = JsFuture::from(cache.delete_with_str(url)).await;
        }
    };
    let stream = weights && (copy.is_some() || cache.is_none());
    let read = read_file(
        &response,
        url,
        cap,
        copy.as_ref().map(|(c, _)| c),
        stream,
        weights,
        |done, total| progress(done, total, false),
    )
    .await;
    let mut fetched = match read {
        Read::Done(fetched) => fetched,
        Read::Invalid(why) => {
            forget(copy).await;
            return Err(why);
        }
        Read::Failed(e) => {
            forget(copy).await;
            return Err(format!(
                "downloading {name} failed: {e}; press Retry to try again"
            ));
        }
    };
    let stored = match (cache, copy) {
        (Some(_), Some((copy, put))) => {
            copy.close().await;
            Some(put)
        }
        (Some(cache), None) => {
            let array = js_sys::Uint8Array::from(fetched.bytes.as_slice());
            Response::new_with_opt_buffer_source(Some(&array))
                .ok()
                .map(|r| cache.put_with_str(url, &r))
        }
        (None, _) => None,
    };
    if let (Some(cache), Some(put)) = (cache, stored) {
        // Storing can fail (quota, private mode): the model still loads, only not offline.
        if JsFuture::from(put).await.is_ok()
            && let Some(sha) = &fetched.sha256
            && let Ok(r) = Response::new_with_opt_str(Some(sha))
        {
            let _ = JsFuture::from(cache.put_with_str(&sha_key(url), &r)).await;
        }
    }
    if weights && fetched.weights.is_none() {
        // Read whole for the cache's sake: split it now, then let the bytes go.
        let mut split = SafetensorsStream::new(url, Some(fetched.len));
        split
            .push(&std::mem::take(&mut fetched.bytes))
            .map_err(|e| e.to_string())?;
        fetched.weights = Some(split);
    }
    Ok(Some(fetched))
}

async fn webgpu() -> Result<Device, String> {
    if let Some(known) = WEBGPU.with(|w| w.borrow().clone()) {
        return known;
    }
    let has_gpu = js_sys::Reflect::has(&scope().navigator(), &"gpu".into()).unwrap_or(false);
    let result = if !has_gpu {
        Err("this browser offers no WebGPU (navigator.gpu is missing)".to_string())
    } else {
        Device::wgpu_options()
            .graphics_api(vlsm::burn::tensor::wgpu::WgpuBackend::WebGpu)
            .init_async()
            .await
            .map_err(|e| {
                let e = e.to_string();
                if e.contains("No suitable graphics adapter") || e.contains("No adapter") {
                    "this browser offers no WebGPU adapter".to_string()
                } else {
                    format!("WebGPU could not start: {e}")
                }
            })
    };
    WEBGPU.with(|w| *w.borrow_mut() = Some(result.clone()));
    result
}

/// The device for a choice, the backend actually used and, if it differs, why.
async fn device_for(choice: Backend) -> (Device, Backend, Option<String>) {
    match choice {
        Backend::Cpu => (Device::flex(), Backend::Cpu, None),
        Backend::WebGpu | Backend::Auto => match webgpu().await {
            Ok(device) => (device, Backend::WebGpu, None),
            Err(why) => (
                Device::flex(),
                Backend::Cpu,
                Some(format!("{why}: running on the CPU")),
            ),
        },
    }
}

async fn load(url: &str, backend: Backend) -> Result<(), String> {
    let base = url.trim_end_matches('/');
    let file = |name: &str| vlsm::share::file_url(base, name);
    let cache = open_cache().await;
    let started = now_ms();
    status("fetching config.json");
    let config = fetch_file(
        cache.as_ref(),
        &file("config.json"),
        "config.json",
        false,
        false,
    )
    .await?
    .ok_or("config.json is missing")?;
    // Fail fast on a wrong URL before downloading hundreds of megabytes.
    let config_error = |e: vlsm::Error| format!("{}: {e}", file("config.json"));
    let arch = vlsm::ModelConfig::arch_of_json(&config.bytes).map_err(config_error)?;
    match arch {
        vlsm::Arch::ClipSeg => {
            vlsm::ClipSegConfig::from_json(&config.bytes).map_err(config_error)?;
        }
        vlsm::Arch::Cris => {
            vlsm::model::cris::CrisConfig::from_json(&config.bytes).map_err(config_error)?;
        }
        _ => {
            vlsm::model::biomedclipseg::BiomedClipSegConfig::from_vlsm_json(&config.bytes)
                .map_err(config_error)?;
        }
    }
    // BiomedCLIPSeg folders carry BERT's vocab.txt; CLIPSeg and CRIS ones CLIP's BPE files.
    let names: &[&str] = if arch.is_biomedclip() {
        &["vocab.txt", "tokenizer_config.json"]
    } else {
        &[
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]
    };
    let mut optional = Vec::new();
    for &name in names {
        status(format!("fetching {name}"));
        optional.push((
            name,
            fetch_file(cache.as_ref(), &file(name), name, true, false).await?,
        ));
    }
    let optional_file = |name: &str| {
        optional
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, f)| f.as_ref())
            .map(|f| f.bytes.as_slice())
    };
    let (mut vocab, mut merges) = (None, None);
    if !arch.is_biomedclip() && optional_file("tokenizer.json").is_none() {
        vocab = fetch_file(
            cache.as_ref(),
            &file("vocab.json"),
            "vocab.json",
            true,
            false,
        )
        .await?;
        merges = fetch_file(
            cache.as_ref(),
            &file("merges.txt"),
            "merges.txt",
            true,
            false,
        )
        .await?;
    }
    status("fetching model.safetensors");
    let weights = fetch_file(
        cache.as_ref(),
        &file("model.safetensors"),
        "model.safetensors",
        true,
        true,
    )
    .await?
    .ok_or_else(|| {
        format!(
            "no model.safetensors at {base} (PyTorch .bin checkpoints cannot be read in the \
             browser: convert once with `vlsm convert DIR OUT`)"
        )
    })?;
    let download_ms = now_ms() - started;
    let all_cached = config.from_cache && weights.from_cache;
    fn bytes_of(f: &Option<Fetched>) -> Option<&[u8]> {
        f.as_ref().map(|f| f.bytes.as_slice())
    }
    let files = ModelFiles {
        config_json: &config.bytes,
        // The weights came as a stream instead: see below.
        safetensors: &[],
        preprocessor_config_json: optional_file("preprocessor_config.json"),
        tokenizer_json: optional_file("tokenizer.json"),
        tokenizer_config_json: optional_file("tokenizer_config.json"),
        special_tokens_map_json: optional_file("special_tokens_map.json"),
        vocab_json: bytes_of(&vocab),
        vocab_txt: optional_file("vocab.txt"),
        merges_txt: bytes_of(&merges),
    };
    let pipeline = vlsm::Pipeline::from_files(&files).map_err(|e| e.to_string())?;
    let stream = weights
        .weights
        .ok_or("model.safetensors was not read as weights")?;
    let dtype = stream.main_dtype().unwrap_or_else(|| "?".into());
    let tensors = stream.finish().map_err(|e| e.to_string())?;
    let (device, used, note) = device_for(backend).await;
    status(format!("loading the model on {}", used.label()));
    // Drop the previous model first: two full-size models may not fit.
    MODEL.with(|m| *m.borrow_mut() = None);
    let load_started = now_ms();
    // Each tensor's bytes are freed as the model takes them.
    let segmenter =
        Segmenter::from_weights(pipeline, &tensors, &device).map_err(|e| e.to_string())?;
    drop(tensors);
    let input_size = segmenter.input_size();
    let load_ms = now_ms() - load_started;
    let weights_bytes = weights.len;
    let weights_sha256 = weights.sha256.clone().unwrap_or_default();
    MODEL.with(|m| {
        *m.borrow_mut() = Some(Loaded {
            segmenter: Rc::new(segmenter),
        })
    });
    post(
        FromWorker::Loaded {
            backend: used,
            device: match used {
                Backend::WebGpu => "WebGPU (burn wgpu)".into(),
                _ => "CPU (burn flex, wasm SIMD128, one thread)".into(),
            },
            note,
            weights_sha256,
            weights_bytes,
            dtype,
            from_cache: all_cached,
            download_ms,
            load_ms,
            wasm_memory_bytes: wasm_memory_bytes(),
            input_size,
            model: arch.name().to_string(),
        },
        Vec::new(),
    );
    Ok(())
}

/// The size of this worker's wasm memory (it only grows: the high-water mark of its heap).
fn wasm_memory_bytes() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return core::arch::wasm32::memory_size(0) as u64 * 65_536;
    #[cfg(not(target_arch = "wasm32"))]
    0
}

async fn segment(prompts: Vec<String>, image_bytes: Vec<u8>) -> Result<(), String> {
    let segmenter = MODEL
        .with(|m| m.borrow().as_ref().map(|l| l.segmenter.clone()))
        .ok_or("load a model first")?;
    crate::logic::check_prompts(&prompts)?;
    crate::logic::check_image_size(&image_bytes).map_err(|e| e.to_string())?;
    let image = vlsm::preprocess::decode_rgb(&image_bytes).map_err(|e| e.to_string())?;
    drop(image_bytes);
    status("encoding the image");
    let started = now_ms();
    let encoded = segmenter.encode_image(&image).map_err(|e| e.to_string())?;
    let encode_ms = now_ms() - started;
    status(format!("decoding {} prompts", prompts.len()));
    let started = now_ms();
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let embedded = segmenter.embed_prompts(&refs).map_err(|e| e.to_string())?;
    let logits = segmenter
        .decode_embedded_async(&encoded, &embedded)
        .await
        .map_err(|e| e.to_string())?;
    let decode_ms = now_ms() - started;
    let size = logits.first().map_or(0, |l| l.size);
    let buffers = logits
        .iter()
        .map(|l| Float32Array::from(l.values.as_slice()).buffer())
        .collect();
    post(
        FromWorker::Segmented {
            width: image.width(),
            height: image.height(),
            size,
            encode_ms,
            decode_ms,
            truncated: embedded
                .tokens
                .iter()
                .map(|t| t.len() == segmenter.pipeline.tokenizer.max_length())
                .collect(),
        },
        buffers,
    );
    Ok(())
}
