//! `--backend cpu|wgpu|cuda` → a burn device, checked before any work: a missing driver,
//! toolkit file or adapter is one `error:` line, not a panic deep inside the first kernel.

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
    use vlsm::burn::tensor::wgpu::wgpu::DeviceType;
    let (device, setup) = catch_panic("wgpu", || Device::wgpu_options().init_with_setup())?
        .map_err(|e| {
            anyhow::anyhow!(
                "no usable wgpu adapter: {} (try --backend cpu)",
                one_line(&e)
            )
        })?;
    let info = setup.adapter.get_info();
    // wgpu falls back to a CPU driver (lavapipe, llvmpipe, SwiftShader) without saying so.
    let kind = match info.device_type {
        DeviceType::DiscreteGpu => "discrete GPU",
        DeviceType::IntegratedGpu => "integrated GPU",
        DeviceType::VirtualGpu => "virtual GPU",
        DeviceType::Cpu => "CPU driver, no GPU: slow; --backend cpu is faster",
        DeviceType::Other => "unknown device type",
    };
    eprintln!(
        "wgpu adapter: {} ({:?}, {kind}; driver {} {})",
        info.name, info.backend, info.driver, info.driver_info
    );
    probe("wgpu", &device)?;
    Ok(device)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<Device> {
    bail!(
        "this vlsm was built without wgpu support (rebuild with `--features wgpu`, or use --backend cpu)"
    )
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<Device> {
    cuda_driver()?;
    cuda_libdevice()?;
    let device = Device::cuda(0);
    probe("CUDA", &device)?;
    eprintln!("CUDA device 0");
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<Device> {
    bail!(
        "this vlsm was built without CUDA support (rebuild with `--features cuda`, or use --backend cpu)"
    )
}

/// The CUDA driver library, which cudarc loads on first use (and panics without).
#[cfg(all(feature = "cuda", unix))]
fn cuda_driver() -> Result<()> {
    let mut reasons = Vec::new();
    for name in [c"libcuda.so.1", c"libcuda.so"] {
        // SAFETY: dlopen with a valid C string; the handle is kept open (cudarc opens it again).
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            return Ok(());
        }
        // SAFETY: dlerror returns null or a C string valid until the next dl* call.
        let reason = unsafe { libc::dlerror() };
        if !reason.is_null() {
            reasons.push(
                unsafe { std::ffi::CStr::from_ptr(reason) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    bail!(
        "--backend cuda: no NVIDIA driver (libcuda.so.1 not found: {}); install the driver or use --backend cpu",
        reasons
            .first()
            .map_or("not on the library path", String::as_str)
    )
}

#[cfg(all(feature = "cuda", not(unix)))]
fn cuda_driver() -> Result<()> {
    Ok(()) // probed by the first kernel below
}

/// burn's CUDA backend compiles kernels with LLVM and links the toolkit's libdevice for
/// exp, erf and tanh (every model here needs them); cubecl looks where this does.
#[cfg(feature = "cuda")]
fn cuda_libdevice() -> Result<()> {
    use std::path::{Path, PathBuf};
    let file = |root: &Path| root.join("nvvm/libdevice/libdevice.10.bc");
    let root = match std::env::var_os("CUDA_PATH") {
        Some(path) => Some(PathBuf::from(path)),
        None => ["/usr/local/cuda", "/opt/cuda", "/usr/lib/cuda", "/usr"]
            .iter()
            .map(PathBuf::from)
            .find(|root| root.join("nvvm/libdevice").is_dir()),
    };
    match root {
        Some(root) if file(&root).is_file() => Ok(()),
        Some(root) => bail!(
            "--backend cuda: {} not found; set CUDA_PATH to a CUDA toolkit that has it",
            file(&root).display()
        ),
        None => bail!(
            "--backend cuda: no CUDA toolkit found for libdevice.10.bc (kernels need it); set CUDA_PATH to a toolkit directory with nvvm/libdevice/"
        ),
    }
}

/// One tiny computation with `exp`, read back, so that a device which cannot run kernels
/// fails here with its reason instead of in the middle of a model.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn probe(name: &str, device: &Device) -> Result<()> {
    use vlsm::burn::tensor::Tensor;
    let values = catch_panic(name, || {
        Tensor::<1>::from_floats([0.0, 1.0], device)
            .exp()
            .into_data()
            .try_to_vec::<f32>()
    })?
    .map_err(|e| anyhow::anyhow!("{name}: cannot read back from the device: {e:?}"))?;
    if (values[1] - std::f32::consts::E).abs() > 1e-4 || values[0] != 1.0 {
        bail!("{name}: the device computed exp([0, 1]) = {values:?}, not [1, e]");
    }
    Ok(())
}

/// Runs `f`, turning a panic into an error that carries the panic's message: burn's GPU
/// runtimes panic when a driver, device or toolkit file is missing. The process's panic
/// hook (which reports internal errors) is silenced meanwhile and then restored.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn catch_panic<T>(name: &str, f: impl FnOnce() -> T) -> Result<T> {
    use std::sync::{Arc, Mutex};
    let message = Arc::new(Mutex::new(None::<String>));
    let sink = Arc::clone(&message);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut slot) = sink.lock() {
            slot.get_or_insert_with(|| crate::panic_message(info.payload()).to_string());
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    result.map_err(|_| {
        let text = message
            .lock()
            .ok()
            .and_then(|m| m.clone())
            .unwrap_or_default();
        anyhow::anyhow!("{name} backend failed to start: {}", one_line(&text))
    })
}

/// Error texts of GPU runtimes span lines; the CLI prints one.
fn one_line(text: &dyn std::fmt::Display) -> String {
    text.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_with_its_message_on_one_line() {
        let err = catch_panic("test", || -> u32 { panic!("no driver\nsecond line") }).unwrap_err();
        assert_eq!(
            err.to_string(),
            "test backend failed to start: no driver second line"
        );
        assert_eq!(catch_panic("test", || 7).unwrap(), 7);
    }
}
