//! What the device kiln opened can do.

use super::adapter::AdapterSummary;
use crate::Precision;

/// Features and limits granted on the opened device.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// The adapter the device was opened on.
    pub adapter: AdapterSummary,
    /// `SHADER_F16` was granted: f16 storage and arithmetic in WGSL.
    pub shader_f16: bool,
    /// `SUBGROUP` was granted: subgroup builtins in WGSL.
    pub subgroup: bool,
    /// Smallest and largest subgroup size the adapter reports.
    pub subgroup_size: (u32, u32),
    /// `TIMESTAMP_QUERY` was granted: GPU-side timing of passes.
    pub timestamp_query: bool,
    /// Timestamps can also be written inside passes and encoders.
    pub timestamp_inside_passes: bool,
    /// Nanoseconds per timestamp tick.
    pub timestamp_period_ns: f32,
    /// The limits the device was opened with (the adapter's own).
    pub limits: wgpu::Limits,
    /// Precision kiln uses for storage on this device.
    pub precision: Precision,
    /// Why this adapter was chosen, in words.
    pub choice_reason: String,
    /// Set when the adapter is a slow fallback that installing a driver would fix (OpenGL on a
    /// machine without a Vulkan driver): what to install.
    pub slow_fallback: Option<String>,
}

impl Capabilities {
    /// Largest single storage buffer binding, the bound on every tensor kiln allocates.
    pub fn max_tensor_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// The granted optional features, by name.
    pub fn feature_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.shader_f16 {
            v.push("SHADER_F16");
        }
        if self.subgroup {
            v.push("SUBGROUP");
        }
        if self.timestamp_query {
            v.push("TIMESTAMP_QUERY");
        }
        if self.timestamp_inside_passes {
            v.push("TIMESTAMP_QUERY_INSIDE_PASSES");
        }
        v
    }
}
