//! The vlsm page: text-prompted segmentation in the browser. Built by Trunk.

fn main() {
    #[cfg(target_arch = "wasm32")]
    vlsm_web::app::start();
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("vlsm-web runs in the browser: build it with `trunk build` (see README)");
}
