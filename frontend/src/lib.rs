//! The vlsm browser page: a Leptos UI on the main thread ([`app`]) and the model in a Web
//! Worker ([`worker`]), talking through [`protocol`]. [`logic`] is the page's pure logic,
//! tested natively.

pub mod logic;
pub mod protocol;

#[cfg(target_arch = "wasm32")]
pub mod app;
#[cfg(target_arch = "wasm32")]
mod js;
#[cfg(target_arch = "wasm32")]
pub mod worker;
