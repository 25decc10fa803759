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

/// Reads a response body chunk by chunk into one `Vec` (sized from Content-Length when
/// given), calling `progress(done)` after each chunk.
pub async fn read_body(
    response: &web_sys::Response,
    expected: Option<u64>,
    mut on_chunk: impl FnMut(&[u8], u64),
) -> Result<Vec<u8>, String> {
    let Some(body) = response.body() else {
        return Ok(Vec::new());
    };
    let reader: web_sys::ReadableStreamDefaultReader = body
        .get_reader()
        .dyn_into()
        .map_err(|_| "cannot read the response body".to_string())?;
    let mut bytes = Vec::new();
    if let Some(n) = expected {
        bytes
            .try_reserve_exact(n as usize)
            .map_err(|_| format!("not enough memory for {n} bytes"))?;
    }
    loop {
        let step = JsFuture::from(reader.read())
            .await
            .map_err(|e| describe(&e))?;
        let done = Reflect::get(&step, &"done".into())
            .ok()
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        if done {
            break;
        }
        let chunk: Uint8Array = Reflect::get(&step, &"value".into())
            .map_err(|e| describe(&e))?
            .dyn_into()
            .map_err(|_| "a response chunk is not bytes".to_string())?;
        let start = bytes.len();
        let n = chunk.length() as usize;
        bytes
            .try_reserve(n)
            .map_err(|_| format!("not enough memory for {} bytes", start + n))?;
        bytes.resize(start + n, 0);
        chunk.copy_to(&mut bytes[start..]);
        on_chunk(&bytes[start..], bytes.len() as u64);
    }
    Ok(bytes)
}
