//! The GPU runtime: adapter choice, the device, tensors, the pipeline cache and error capture.

mod adapter;
mod capabilities;
mod pipeline;
mod scratch;
mod tensor;
mod timing;

pub use adapter::AdapterSummary;
pub use capabilities::Capabilities;
pub use pipeline::{PipelineKey, Specialisation};
pub use scratch::{SCRATCH_FORMAT, ScratchTexture};
pub use tensor::{Bind, DType, GpuTensor};
pub use timing::median;

use crate::precision::{Precision, PrecisionChoice};
use crate::{Error, Result};
use std::sync::{Arc, Mutex};

/// How to open the GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Adapter index or part of its name; `None` reads `KILN_ADAPTER`, then picks the best one.
    pub adapter: Option<String>,
    /// Storage precision; `Auto` uses f16 on GPUs that grant `SHADER_F16`, f32 on CPU-backed
    /// adapters and elsewhere (see [`PrecisionChoice::Auto`]).
    pub precision: PrecisionChoice,
}

/// An opened device with everything kiln keeps per device.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    caps: Capabilities,
    pipelines: pipeline::PipelineCache,
    errors: Arc<Mutex<Vec<String>>>,
    pub(crate) tuning: crate::kernels::tune::TuneCache,
    scratch: scratch::ScratchTextures,
    /// Bytes of every storage tensor created so far ([`Gpu::allocated_bytes`]).
    allocated: std::sync::atomic::AtomicU64,
}

/// Every adapter wgpu can see on this machine, in the order `--adapter INDEX` uses.
pub fn list_adapters() -> Vec<AdapterSummary> {
    adapter_search().0
}

/// [`list_adapters`], with one line per backend group saying what was searched and found (GL is
/// searched only when no Vulkan, Metal or DX12 adapter exists).
pub fn adapter_search() -> (Vec<AdapterSummary>, Vec<String>) {
    let found = adapter::discover();
    let list = found
        .adapters
        .iter()
        .enumerate()
        .map(|(i, a)| AdapterSummary::new(i, &a.get_info()))
        .collect();
    (list, found.searched)
}

/// The adapter for rank `local_rank` among the ranks of one machine in a data-parallel run:
/// hardware adapters are dealt out in turn (rank i takes the i-th modulo their number, in the
/// default ranking); with none, `None`, and every rank opens the default (software) adapter,
/// which several ranks may share. Returned as an index for [`GpuOptions::adapter`].
pub fn adapter_for_local_rank(local_rank: usize) -> Option<String> {
    let adapters = adapter::discover().adapters;
    let mut hardware: Vec<(usize, wgpu::AdapterInfo)> = adapters
        .iter()
        .map(|a| a.get_info())
        .enumerate()
        .filter(|(_, info)| {
            info.device_type != wgpu::DeviceType::Cpu && info.backend != wgpu::Backend::Gl
        })
        .collect();
    hardware.sort_by_key(|(i, info)| (adapter::preference(info), *i));
    let chosen = hardware.get(local_rank % hardware.len().max(1))?.0;
    log::info!("local rank {local_rank}: adapter {chosen}");
    Some(chosen.to_string())
}

impl Gpu {
    /// Opens the default adapter (or the one `KILN_ADAPTER` names) with automatic precision.
    pub fn new() -> Result<Self> {
        Self::with_options(&GpuOptions::default())
    }

    /// Opens a device as `options` say. Requests `SHADER_F16`, `SUBGROUP` and `TIMESTAMP_QUERY`
    /// where the adapter has them and the adapter's own limits.
    pub fn with_options(options: &GpuOptions) -> Result<Self> {
        let adapters = adapter::discover().adapters;
        let wanted = options
            .adapter
            .clone()
            .or_else(|| std::env::var("KILN_ADAPTER").ok());
        let index = adapter::choose(&adapters, wanted.as_deref())?;
        let adapter = &adapters[index];
        let info = adapter.get_info();
        let summary = AdapterSummary::new(index, &info);
        let by_user = wanted.as_deref().is_some_and(|w| !w.trim().is_empty());
        let (reason, warning) = adapter::explain_choice(&info, by_user, &adapters);
        if let Some(w) = &warning {
            log::warn!("{w}");
        } else if summary.software {
            log::warn!(
                "using software adapter {} ({}): expect CPU speeds, not GPU speeds",
                summary.name,
                summary.backend
            );
        } else {
            log::info!("using adapter {}", summary.line());
        }

        let available = adapter.features();
        let wanted_features = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        let features = available & wanted_features;
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln device"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|source| Error::RequestDevice {
            adapter: info.name.clone(),
            source,
        })?;

        let shader_f16 = features.contains(wgpu::Features::SHADER_F16);
        let precision =
            resolve_precision(options.precision, shader_f16, summary.software, &info.name)?;
        let caps = Capabilities {
            adapter: summary,
            shader_f16,
            subgroup: features.contains(wgpu::Features::SUBGROUP),
            subgroup_size: (info.subgroup_min_size, info.subgroup_max_size),
            timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            timestamp_inside_passes: features
                .contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
            timestamp_period_ns: queue.get_timestamp_period(),
            limits,
            precision,
            choice_reason: reason,
            slow_fallback: warning,
        };

        // wgpu's default handler panics on a validation error; kiln turns them into `Error::Gpu`
        // at the next `check` so that no panic reaches a user.
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("wgpu: {e}");
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));

        Ok(Gpu {
            device,
            queue,
            caps,
            pipelines: pipeline::PipelineCache::default(),
            errors,
            tuning: Default::default(),
            scratch: Default::default(),
            allocated: Default::default(),
        })
    }

    /// Bytes of every storage tensor created on this device so far through [`Gpu::zeros`] and
    /// the uploads built on it (buffer sizes, padding included), whether or not it has been
    /// dropped since: the difference across a model's construction is what that model
    /// allocated. Uniform blocks and the matmul's scratch textures are not counted.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What was granted.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Storage precision in use on this device.
    pub fn precision(&self) -> Precision {
        self.caps.precision
    }

    /// The underlying wgpu device, for callers that record their own work.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The underlying wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Returns the first GPU error reported since the last check, naming what kiln was doing.
    pub fn check(&self, during: &str) -> Result<()> {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.is_empty() {
            return Ok(());
        }
        let message = errors.join("\n");
        errors.clear();
        Err(Error::Gpu {
            during: during.to_string(),
            message,
        })
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu {
                during: "waiting for the device".into(),
                message: e.to_string(),
            })?;
        self.check("GPU work")
    }

    /// Records work into a fresh encoder through `f`, submits it, and returns without waiting.
    pub fn submit(&self, label: &str, f: impl FnOnce(&mut wgpu::CommandEncoder)) -> Result<()> {
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        f(&mut encoder);
        self.queue.submit([encoder.finish()]);
        self.check(label)
    }

    /// Runs `f` inside a single compute pass, submits, and returns without waiting.
    pub fn run_pass(&self, label: &str, f: impl FnOnce(&mut wgpu::ComputePass<'_>)) -> Result<()> {
        self.submit(label, |encoder| {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes: None,
            });
            f(&mut pass);
        })
    }

    /// The cached compute pipeline for `key`, compiling it on first use.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipelines.get_or_create(self, key)
    }

    /// The per-device cache of measured kernel-variant choices.
    pub fn tuning(&self) -> &crate::kernels::tune::TuneCache {
        &self.tuning
    }

    /// Number of pipelines compiled so far (for tests of the cache).
    pub fn pipelines_compiled(&self) -> usize {
        self.pipelines.len()
    }

    /// Creates a uniform buffer holding `value`.
    pub fn uniform<P: bytemuck::Pod>(&self, label: &str, value: &P) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytemuck::bytes_of(value),
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// A bind group for `pipeline`'s group 0 binding each `(slot, range)` pair.
    pub fn bind_group(
        &self,
        label: &str,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[(u32, Bind<'_>)],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .map(|(binding, b)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: b.resource(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }
}

/// The storage precision a choice gives on an adapter (see [`PrecisionChoice::Auto`]).
fn resolve_precision(
    choice: PrecisionChoice,
    shader_f16: bool,
    software: bool,
    adapter: &str,
) -> Result<Precision> {
    match choice {
        PrecisionChoice::Auto if shader_f16 && !software => Ok(Precision::F16),
        PrecisionChoice::Auto | PrecisionChoice::F32 => Ok(Precision::F32),
        PrecisionChoice::F16 if shader_f16 => Ok(Precision::F16),
        PrecisionChoice::F16 => Err(Error::invalid(
            "precision",
            "f16",
            format!("adapter {adapter} does not grant SHADER_F16; use precision auto or f32"),
        )),
    }
}

#[cfg(test)]
mod precision_tests {
    use super::*;

    #[test]
    fn auto_is_f16_only_on_gpus_with_shader_f16() {
        let r = |c, f16, sw| resolve_precision(c, f16, sw, "x").ok();
        use PrecisionChoice::*;
        assert_eq!(r(Auto, true, false), Some(Precision::F16));
        assert_eq!(r(Auto, true, true), Some(Precision::F32));
        assert_eq!(r(Auto, false, false), Some(Precision::F32));
        // An explicit f16 is honoured on a software adapter, refused without SHADER_F16.
        assert_eq!(r(F16, true, true), Some(Precision::F16));
        assert_eq!(r(F16, false, false), None);
        assert_eq!(r(F32, true, false), Some(Precision::F32));
    }
}
