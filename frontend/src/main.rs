//! The vlsm browser page (Leptos, client-side rendered). For now a placeholder that shows the
//! version of the core it is built against; the segmentation page is built out separately.

use leptos::prelude::*;

#[component]
fn App() -> impl IntoView {
    let input_size = vlsm::ClipSegConfig::default().vision_config.image_size;
    view! {
        <main>
            <h1>"vlsm"</h1>
            <p>"Text-prompted medical image segmentation, in your browser. Coming soon."</p>
            <p class="muted">{format!("core {} · CLIP vision default {input_size} px", env!("CARGO_PKG_VERSION"))}</p>
        </main>
    }
}

fn main() {
    leptos::mount::mount_to_body(App);
}
