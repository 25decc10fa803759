//! The model worker: a Web Worker that fetches weights, loads the model and segments,
//! so the page stays responsive. Built by Trunk as a `data-type="worker"` binary.

fn main() {
    #[cfg(target_arch = "wasm32")]
    vlsm_web::worker::start();
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("vlsm-worker runs in the browser: build the page with `trunk build`");
}
