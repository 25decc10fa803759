//! Small bridges to browser APIs shared by the page and the worker.

use js_sys::{Array, ArrayBuffer, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

/// Milliseconds, for durations.
pub fn now_ms() -> f64 {
    js_sys::Date::now()
}

/// A JS error or rejection as one line of text.
pub fn describe(err: &JsValue) -> String {
    if let Some(e) = err.dyn_ref::<js_sys::Error>() {
        return String::from(e.message());
    }
    err.as_string().unwrap_or_else(|| format!("{err:?}"))
}

/// A message: `[json, buffer, buffer…]`, with the buffers transferred.
pub fn pack(json: &str, buffers: Vec<ArrayBuffer>) -> (Array, Array) {
    let message = Array::new();
    message.push(&JsValue::from_str(json));
    let transfer = Array::new();
    for b in buffers {
        message.push(&b);
        transfer.push(&b);
    }
    (message, transfer)
}

/// The JSON text and buffers of a packed message.
pub fn unpack(data: &JsValue) -> Result<(String, Vec<ArrayBuffer>), String> {
    let array: &Array = data
        .dyn_ref()
        .ok_or_else(|| "a message is not an array".to_string())?;
    let json = array
        .get(0)
        .as_string()
        .ok_or_else(|| "a message has no JSON part".to_string())?;
    let buffers = array
        .iter()
        .skip(1)
        .map(|v| {
            v.dyn_into::<ArrayBuffer>()
                .map_err(|_| "a message part is not an ArrayBuffer".to_string())
        })
        .collect::<Result<_, _>>()?;
    Ok((json, buffers))
}

/// Copies bytes into a fresh ArrayBuffer (to transfer to another thread).
pub fn to_buffer(bytes: &[u8]) -> ArrayBuffer {
    let array = Uint8Array::new_with_length(bytes.len() as u32);
    array.copy_from(bytes);
    array.buffer()
}

/// The Content-Length a response announces, if any.
pub fn content_length(response: &web_sys::Response) -> Option<u64> {
    response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse().ok())
}

/// How long a download may go without a byte before it is given up.
pub const STALL_MS: i32 = 30_000;

/// A promise resolving to `value` after `ms` (the page's or the worker's `setTimeout`).
fn delay(ms: i32, value: &JsValue) -> js_sys::Promise {
    let value = value.clone();
    js_sys::Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        if let Ok(set_timeout) = Reflect::get(&global, &"setTimeout".into())
            .and_then(|f| f.dyn_into::<js_sys::Function>())
        {
            let args = Array::of3(&resolve, &JsValue::from(ms), &value);
            let _ = set_timeout.apply(&global, &args);
        }
    })
}

/// Awaits `promise`; `Ok(None)` if `ms` pass first.
pub async fn within(promise: js_sys::Promise, ms: i32) -> Result<Option<JsValue>, JsValue> {
    let marker: JsValue = js_sys::Object::new().into();
    let race = js_sys::Promise::race(&Array::of2(&promise, &delay(ms, &marker)));
    let value = JsFuture::from(race).await?;
    Ok((!js_sys::Object::is(&value, &marker)).then_some(value))
}

/// `fetch(url)` on `global` (page or worker), given up after [`STALL_MS`] without an
/// answer.
pub async fn fetch_within(fetch: js_sys::Promise, url: &str) -> Result<web_sys::Response, String> {
    let answer = within(fetch, STALL_MS).await.map_err(|e| {
        format!(
            "could not fetch {url}: {} (network down, server unreachable, or the origin is \
             not allowed by the page's Content-Security-Policy)",
            describe(&e)
        )
    })?;
    answer
        .ok_or_else(|| format!("{url}: no answer in {} s", STALL_MS / 1000))?
        .dyn_into()
        .map_err(|_| format!("fetching {url} gave no response"))
}

/// A copy of a download for Cache Storage, written as the download is read and at the pace
/// the cache stores it. (A `Response.clone()` tee queues in memory whatever the cache has not
/// yet written: measured, most of a 603 MB file when the network is faster than the disk.)
pub struct CacheCopy {
    writer: web_sys::WritableStreamDefaultWriter,
}

impl CacheCopy {
    /// The copy's writer, and the response (announcing `len` bytes) to give `Cache.put`.
    pub fn new(len: u64) -> Result<(Self, web_sys::Response), JsValue> {
        let pipe = web_sys::TransformStream::new()?;
        let headers = web_sys::Headers::new()?;
        headers.set("content-length", &len.to_string())?;
        let init = web_sys::ResponseInit::new();
        init.set_headers(&headers);
        let response = web_sys::Response::new_with_opt_readable_stream_and_init(
            Some(&pipe.readable()),
            &init,
        )?;
        let writer = pipe.writable().get_writer()?;
        Ok((Self { writer }, response))
    }

    /// Writes a chunk, then waits (boundedly) until the cache has taken it.
    async fn write(&self, chunk: &Uint8Array) -> Result<(), String> {
        // Failures show in `ready`; awaiting the write's own promise too keeps its rejection
        // handled.
        let written = self.writer.write_with_chunk(chunk);
        wasm_bindgen_futures::spawn_local(async move {
            let _ = JsFuture::from(written).await;
        });
        match within(self.writer.ready(), STALL_MS).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("the browser cache stopped taking data".into()),
            Err(e) => Err(describe(&e)),
        }
    }

    /// Ends the copy: the cache's `put` then completes.
    pub async fn close(&self) {
        let _ = JsFuture::from(self.writer.close()).await;
    }

    /// Abandons the copy: the cache's `put` fails and stores nothing.
    pub fn abort(&self) {
        let aborted = self.writer.abort();
        wasm_bindgen_futures::spawn_local(async move {
            let _ = JsFuture::from(aborted).await;
        });
    }
}

/// Reads a response body chunk by chunk into one `Vec` (sized from Content-Length when
/// given), calling `on_chunk(chunk, done)` after each chunk. Refuses what
/// [`read_body_chunks`] refuses.
pub async fn read_body(
    response: &web_sys::Response,
    expected: Option<u64>,
    cap: u64,
    copy: Option<&CacheCopy>,
    mut on_chunk: impl FnMut(&[u8], u64),
) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    if let Some(n) = expected.filter(|&n| n <= cap) {
        bytes
            .try_reserve_exact(n as usize)
            .map_err(|_| format!("not enough memory for {n} bytes"))?;
    }
    read_body_chunks(response, expected, cap, copy, |chunk, done| {
        bytes
            .try_reserve(chunk.len())
            .map_err(|_| format!("not enough memory for {done} bytes"))?;
        bytes.extend_from_slice(chunk);
        on_chunk(chunk, done);
        Ok(())
    })
    .await?;
    Ok(bytes)
}

/// Reads a response body chunk by chunk, handing each to `on_chunk(chunk, done)` (which may
/// refuse it, ending the read with its error) and to `copy` when given, and returns the
/// body's length. Refuses a body over `cap` bytes (by its Content-Length before reading,
/// else once it gets there), one longer than its Content-Length, and one that stalls for
/// [`STALL_MS`]. If the cache stops taking the copy, the copy is abandoned and the read goes
/// on.
pub async fn read_body_chunks(
    response: &web_sys::Response,
    expected: Option<u64>,
    cap: u64,
    mut copy: Option<&CacheCopy>,
    mut on_chunk: impl FnMut(&[u8], u64) -> Result<(), String>,
) -> Result<u64, String> {
    if let Some(n) = expected
        && n > cap
    {
        return Err(format!(
            "{n} bytes is more than the {} MiB allowed for this file",
            cap >> 20
        ));
    }
    let Some(body) = response.body() else {
        return Ok(0);
    };
    let reader: web_sys::ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|_| "cannot read the response body".to_string())?;
    let give_up = |why: String| {
        let _ = reader.cancel();
        Err(why)
    };
    // Each chunk is copied out of JavaScript's memory into this buffer, reused.
    let mut scratch = Vec::new();
    let mut done = 0u64;
    loop {
        let step = match within(reader.read(), STALL_MS).await {
            Ok(Some(step)) => step,
            Ok(None) => {
                return give_up(format!(
                    "no data for {} s after {done} bytes",
                    STALL_MS / 1000
                ));
            }
            Err(e) => return Err(describe(&e)),
        };
        let finished = Reflect::get(&step, &"done".into())
            .ok()
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        if finished {
            break;
        }
        let chunk: Uint8Array = Reflect::get(&step, &"value".into())
            .map_err(|e| describe(&e))?
            .dyn_into()
            .map_err(|_| "a response chunk is not bytes".to_string())?;
        let n = chunk.length() as u64;
        if done + n > cap {
            return give_up(format!(
                "more than the {} MiB allowed for this file",
                cap >> 20
            ));
        }
        if expected.is_some_and(|e| done + n > e) {
            return give_up("the body is longer than its Content-Length".into());
        }
        if scratch.try_reserve(n as usize).is_err() {
            return give_up(format!("not enough memory for a chunk of {n} bytes"));
        }
        scratch.resize(n as usize, 0);
        chunk.copy_to(&mut scratch);
        done += n;
        if let Err(why) = on_chunk(&scratch, done) {
            return give_up(why);
        }
        if let Some(c) = copy
            && c.write(&chunk).await.is_err()
        {
            c.abort();
            copy = None;
        }
    }
    Ok(done)
}
