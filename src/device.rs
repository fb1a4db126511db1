//! Where `kd` computes (`--device cpu|cuda[:N]|cubecl-cpu`), and the peak memory a device's
//! allocator reserved. The precision of the heavy products is [`crate::ops::Precision`].

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::ops::Precision;

/// A compute device named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU, through Burn's flex backend.
    #[default]
    Cpu,
    /// NVIDIA GPU number N (needs a build with `--features cuda`).
    Cuda(usize),
    /// Burn's CubeCL CPU runtime: the GPU code path (CubeCL kernels, fusion, autotune,
    /// Burn's own ops) compiled for the CPU, to check that path on a machine without a GPU
    /// (needs a build with `--features cubecl-cpu`; slower than `cpu`).
    CubeclCpu,
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown device '{s}': use cpu, cuda or cuda:N (e.g. cuda:0)");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "cubecl-cpu" => Ok(Self::CubeclCpu),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::CubeclCpu => write!(f, "cubecl-cpu"),
        }
    }
}

/// Opens `spec` for computing in `precision`; the error says how to fix an unusable choice.
pub fn open(spec: DeviceSpec, precision: Precision) -> Result<Device> {
    let device = match spec {
        DeviceSpec::Cpu => Device::flex(),
        DeviceSpec::Cuda(index) => open_cuda(index)?,
        DeviceSpec::CubeclCpu => open_cubecl_cpu()?,
    };
    if !device.supports_dtype(precision.dtype()) {
        bail!("device {spec} cannot compute in {precision}: use --precision f32");
    }
    Ok(device)
}

#[cfg(feature = "cuda")]
fn open_cuda(index: usize) -> Result<Device> {
    use burn::tensor::DeviceType;
    let found = Device::enumerate(DeviceType::Cuda).into_vec().len();
    if found == 0 {
        bail!(
            "no CUDA device found (no NVIDIA driver, libcuda.so or GPU on this machine): use --device cpu"
        );
    }
    if index >= found {
        bail!(
            "cuda:{index} does not exist: this machine has {found} CUDA device(s), cuda:0..cuda:{}",
            found - 1
        );
    }
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_index: usize) -> Result<Device> {
    bail!(
        "this kd was built without CUDA support: rebuild with `cargo build --release --features cuda` (see the README), or use --device cpu"
    )
}

#[cfg(feature = "cubecl-cpu")]
fn open_cubecl_cpu() -> Result<Device> {
    Ok(Device::cpu())
}

#[cfg(not(feature = "cubecl-cpu"))]
fn open_cubecl_cpu() -> Result<Device> {
    bail!(
        "this kd was built without the CubeCL CPU runtime: rebuild with `cargo build --release --features cubecl-cpu` (see the README), or use --device cpu"
    )
}

/// The most memory a device's allocator has reserved at any sample (the counterpart of
/// PyTorch's `torch.cuda.max_memory_reserved`); backends without a pool allocator (flex) have
/// none. Sampling makes a fused backend launch what it has queued (Burn's fusion drains its
/// stream for the report), so sample where the host already waits for the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PeakDeviceMemory(Option<u64>);

impl PeakDeviceMemory {
    /// Takes the allocator's current reservation into the peak.
    pub fn sample(&mut self, device: &Device) {
        if let Some(usage) = device.memory_pool_usage() {
            self.0 = Some(self.0.unwrap_or(0).max(usage.bytes_reserved));
        }
    }

    /// The peak in MiB, if the device reports one.
    pub fn mib(&self) -> Option<f64> {
        self.0.map(|b| b as f64 / (1024.0 * 1024.0))
    }
}

/// A short description of `device` for logs and benchmark tables.
pub fn describe(spec: DeviceSpec) -> String {
    match spec {
        DeviceSpec::Cpu => "flex (CPU)".into(),
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        DeviceSpec::CubeclCpu => "cubecl-cpu (CubeCL CPU runtime)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!("cubecl-cpu".parse(), Ok(DeviceSpec::CubeclCpu));
        let err = "tpu".parse::<DeviceSpec>().unwrap_err();
        assert!(err.contains("use cpu, cuda or cuda:N"), "{err}");
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }
}
