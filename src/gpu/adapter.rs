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

/// The adapters found, and how they were looked for.
pub(crate) struct Discovery {
    /// Every adapter found, in the order `--adapter INDEX` uses.
    pub adapters: Vec<wgpu::Adapter>,
    /// One line per backend group searched (or skipped), for `kiln info`.
    pub searched: Vec<String>,
}

/// Finds the adapters, honouring `WGPU_BACKEND` and friends. The native APIs (Vulkan, Metal,
/// DX12) are searched first and OpenGL only when they find nothing: probing GL initialises EGL,
/// which on a headless Linux machine makes Mesa print "XDG_RUNTIME_DIR is invalid or not set"
/// to stderr, and a GL adapter is never chosen over a native one anyway.
pub(crate) fn discover() -> Discovery {
    let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let allowed = desc.backends;
    let native = allowed & !wgpu::Backends::GL;
    let mut searched = Vec::new();
    let search = |backends: wgpu::Backends| {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
        });
        pollster::block_on(instance.enumerate_adapters(backends))
    };
    let mut adapters = Vec::new();
    if !native.is_empty() {
        adapters = search(native);
        searched.push(format!(
            "{}: {} adapter(s)",
            backend_names(native),
            adapters.len()
        ));
    }
    if allowed.contains(wgpu::Backends::GL) {
        if adapters.is_empty() {
            adapters = search(wgpu::Backends::GL);
            searched.push(format!("GL: {} adapter(s)", adapters.len()));
        } else {
            searched.push(
                "GL: not searched (a native adapter was found; WGPU_BACKEND=gl searches it alone)"
                    .to_string(),
            );
        }
    }
    Discovery { adapters, searched }
}

fn backend_names(b: wgpu::Backends) -> String {
    let mut names = Vec::new();
    for (flag, name) in [
        (wgpu::Backends::VULKAN, "Vulkan"),
        (wgpu::Backends::METAL, "Metal"),
        (wgpu::Backends::DX12, "DX12"),
        (wgpu::Backends::BROWSER_WEBGPU, "WebGPU"),
    ] {
        if b.contains(flag) {
            names.push(name);
        }
    }
    names.join("/")
}

/// Why the default choice fell on `info`, in words, and a warning when the choice is a slow
/// fallback that a package would fix.
pub(crate) fn explain_choice(
    info: &wgpu::AdapterInfo,
    by_user: bool,
    all: &[wgpu::Adapter],
) -> (String, Option<String>) {
    let reason = if by_user {
        "chosen with --adapter / KILN_ADAPTER".to_string()
    } else if all.len() == 1 {
        "the only adapter found".to_string()
    } else {
        "ranked first: discrete, integrated, virtual, other, then software (CPU) adapters; \
         Vulkan/Metal/DX12 before GL"
            .to_string()
    };
    let warning = (info.backend == wgpu::Backend::Gl).then(|| {
        format!(
            "kiln is running on {} through OpenGL: no f16, no subgroups, and on a CPU about 100x \
             slower than a Vulkan driver (matmul at 1024^3 measured 0.3 GFLOP/s here against \
             about 30 on Mesa's software Vulkan driver). No Vulkan driver was found. Install one: \
             on Debian/Ubuntu `apt-get update && apt-get install -y mesa-vulkan-drivers \
             libvulkan1` (or your GPU vendor's driver)",
            info.name
        )
    });
    (reason, warning)
}

/// Ranking used when the user does not choose: hardware before software, native APIs before GL.
pub(crate) fn preference(info: &wgpu::AdapterInfo) -> (u8, u8) {
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
