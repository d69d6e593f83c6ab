//! Finding adapters and choosing one.

use crate::{Error, Result};

/// What kiln knows about one adapter, for `kiln info`, logs and benchmark output.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    /// Position in the enumeration (what `--adapter INDEX` refers to).
    pub index: usize,
    /// Adapter name as the driver reports it.
    pub name: String,
    /// Vulkan, Metal, Dx12, Gl, ...
    pub backend: String,
    /// DiscreteGpu, IntegratedGpu, Cpu, ...
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// True for software rasterisers such as lavapipe/llvmpipe.
    pub software: bool,
}

impl AdapterSummary {
    pub(crate) fn new(index: usize, info: &wgpu::AdapterInfo) -> Self {
        let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
            (false, false) => format!("{} ({})", info.driver, info.driver_info),
            (false, true) => info.driver.clone(),
            (true, false) => info.driver_info.clone(),
            (true, true) => "unknown".to_string(),
        };
        AdapterSummary {
            index,
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            driver,
            software: info.device_type == wgpu::DeviceType::Cpu,
        }
    }

    /// One line for listings.
    pub fn line(&self) -> String {
        format!(
            "[{}] {} ({}, {}, driver {})",
            self.index, self.name, self.backend, self.device_type, self.driver
        )
    }
}

/// A wgpu instance over every backend compiled in, honouring `WGPU_BACKEND` and friends.
pub(crate) fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

/// Every adapter the instance can see, in enumeration order.
pub(crate) fn enumerate(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
}

/// Ranking used when the user does not choose: hardware before software, native APIs before GL.
fn preference(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let kind = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (kind, api)
}

/// Picks an adapter: `wanted` is an index into [`enumerate`]'s order or a case-insensitive part of
/// the name; `None` picks the best hardware adapter, falling back to software ones.
pub(crate) fn choose(adapters: &[wgpu::Adapter], wanted: Option<&str>) -> Result<usize> {
    if adapters.is_empty() {
        return Err(Error::NoAdapter {
            backends: format!("{:?}", wgpu::Instance::enabled_backend_features()),
        });
    }
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let Some(wanted) = wanted.map(str::trim).filter(|w| !w.is_empty()) else {
        let best = (0..infos.len())
            .min_by_key(|&i| preference(&infos[i]))
            .expect("adapters is not empty");
        return Ok(best);
    };
    let found = match wanted.parse::<usize>() {
        Ok(i) if i < infos.len() => Some(i),
        Ok(_) => None,
        Err(_) => {
            let needle = wanted.to_lowercase();
            (0..infos.len())
                .filter(|&i| infos[i].name.to_lowercase().contains(&needle))
                .min_by_key(|&i| preference(&infos[i]))
        }
    };
    found.ok_or_else(|| Error::AdapterNotFound {
        wanted: wanted.to_string(),
        available: infos
            .iter()
            .enumerate()
            .map(|(i, info)| format!("  {}", AdapterSummary::new(i, info).line()))
            .collect::<Vec<_>>()
            .join("\n"),
    })
}
