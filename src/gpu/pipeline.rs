//! Compute pipelines, compiled once per kernel and specialisation and then shared.

use super::Gpu;
use crate::{Precision, Result, shaders};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Values for a shader's `override` constants, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Specialisation(pub Vec<(&'static str, f64)>);

impl Specialisation {
    /// Adds one constant (bools as 0/1).
    pub fn with(mut self, name: &'static str, value: impl Into<f64>) -> Self {
        self.0.push((name, value.into()));
        self
    }
    fn key(&self) -> Vec<(&'static str, u64)> {
        self.0.iter().map(|&(n, v)| (n, v.to_bits())).collect()
    }
}

/// Identifies one compiled pipeline.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineKey {
    /// Shader module: a name from [`crate::shaders::MODULES`] (`matmul`, ...).
    pub family: &'static str,
    /// Entry point in that file.
    pub entry: &'static str,
    /// Element type the alias sets.
    pub precision: Precision,
    /// Override constants.
    pub constants: Specialisation,
}

type CacheKey = (
    &'static str,
    &'static str,
    Precision,
    Vec<(&'static str, u64)>,
);

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<(&'static str, Precision), Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<CacheKey, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineCache {
    pub(crate) fn len(&self) -> usize {
        self.pipelines.lock().map(|p| p.len()).unwrap_or(0)
    }

    pub(crate) fn get_or_create(
        &self,
        gpu: &Gpu,
        key: &PipelineKey,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let ck: CacheKey = (key.family, key.entry, key.precision, key.constants.key());
        if let Some(p) = self
            .pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ck)
        {
            return Ok(p.clone());
        }
        let module = self.module(gpu, key.family, key.precision)?;
        let label = format!("{}::{} {}", key.family, key.entry, key.precision);
        let pipeline = gpu
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: None,
                module: &module,
                entry_point: Some(key.entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &key.constants.0,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        gpu.check(&format!("creating pipeline {label}"))?;
        let pipeline = Arc::new(pipeline);
        self.pipelines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ck, pipeline.clone());
        Ok(pipeline)
    }

    fn module(
        &self,
        gpu: &Gpu,
        family: &'static str,
        precision: Precision,
    ) -> Result<Arc<wgpu::ShaderModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&(family, precision)) {
            return Ok(m.clone());
        }
        // naga first, so a broken shader is a readable `Error::Shader` with line numbers rather
        // than a device error.
        let source = shaders::specialised_source(family, precision)?;
        shaders::validate_source(family, &source)?;
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(family),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        let module = gpu.device.create_shader_module(desc);
        gpu.check(&format!("compiling shader {family}"))?;
        let module = Arc::new(module);
        modules.insert((family, precision), module.clone());
        Ok(module)
    }
}
