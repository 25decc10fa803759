//! `--backend cpu|wgpu|cuda` → a burn device.

use anyhow::{Result, bail};
use vlsm::burn::tensor::Device;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// burn's pure-Rust CPU backend (flex)
    Cpu,
    /// burn's wgpu backend (Vulkan, Metal, DX12 or OpenGL)
    Wgpu,
    /// burn's CUDA backend (NVIDIA)
    Cuda,
}

pub fn device(backend: Backend) -> Result<Device> {
    match backend {
        Backend::Cpu => Ok(Device::flex()),
        Backend::Wgpu => wgpu(),
        Backend::Cuda => cuda(),
    }
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Result<Device> {
    Device::wgpu_options()
        .init()
        .map_err(|e| anyhow::anyhow!("no usable wgpu adapter: {e:?} (try --backend cpu)"))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<Device> {
    bail!(
        "this vlsm was built without wgpu support (rebuild with `--features wgpu`, or use --backend cpu)"
    )
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    Ok(Device::cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
    bail!(
        "this vlsm was built without CUDA support (rebuild with `--features cuda`, or use --backend cpu)"
    )
}
