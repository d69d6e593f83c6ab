//! Scratch textures: device memory that kernels stage operands in for the length of one dispatch
//! sequence (the texture matmul packs its operands into them).
//!
//! They are shared by every op that asks for the same role and size. That is safe because work
//! on one queue runs in submission order and wgpu orders a dispatch that writes a texture after
//! the dispatches that read it; it keeps the memory to one texture per distinct shape.

use super::Gpu;
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The format of every scratch texture: four f32 channels, whatever the storage precision of
/// the tensors staged in it (f16 values are exact in it).
pub const SCRATCH_FORMAT: wgpu::TextureFormat = wgpu::TextureFormat::Rgba32Float;

/// A 2-D array texture usable as a write-only storage texture and as a sampled texture.
pub struct ScratchTexture {
    texture: wgpu::Texture,
    view: wgpu::TextureView,
}

impl ScratchTexture {
    /// The array view (binds as `texture_2d_array` and `texture_storage_2d_array`).
    pub fn view(&self) -> &wgpu::TextureView {
        &self.view
    }

    /// The texture itself (the target of buffer-to-texture copies).
    pub fn texture(&self) -> &wgpu::Texture {
        &self.texture
    }

    /// The view as a binding, with its bytes for the dispatch census.
    pub fn bind(&self) -> super::Bind<'_> {
        super::Bind::texture(&self.view, self.bytes())
    }

    /// Bytes of the texture (16 per texel: [`SCRATCH_FORMAT`]).
    pub fn bytes(&self) -> u64 {
        self.size().iter().map(|&d| u64::from(d)).product::<u64>() * 16
    }

    /// Width, height and layers in texels.
    pub fn size(&self) -> [u32; 3] {
        let s = self.texture.size();
        [s.width, s.height, s.depth_or_array_layers]
    }
}

/// (role, size) of a scratch texture.
type ScratchKey = (&'static str, [u32; 3]);

#[derive(Default)]
pub(crate) struct ScratchTextures(Mutex<HashMap<ScratchKey, Arc<ScratchTexture>>>);

impl Gpu {
    /// Whether a scratch texture of `size` (width, height, layers) fits the adapter's limits.
    pub fn scratch_texture_fits(&self, size: [u32; 3]) -> bool {
        let l = &self.capabilities().limits;
        size.iter().all(|&d| d >= 1)
            && size[0] <= l.max_texture_dimension_2d
            && size[1] <= l.max_texture_dimension_2d
            && size[2] <= l.max_texture_array_layers
    }

    /// Bytes of every scratch texture created so far (16 per texel).
    pub fn scratch_texture_bytes(&self) -> u64 {
        let map = self.scratch.0.lock().unwrap_or_else(|e| e.into_inner());
        map.values().map(|t| t.bytes()).sum()
    }

    /// The shared scratch texture for `role` (a name that keeps operands of one op apart) and
    /// `size` (width, height, layers), created on first use.
    pub fn scratch_texture(
        &self,
        role: &'static str,
        size: [u32; 3],
    ) -> Result<Arc<ScratchTexture>> {
        if !self.scratch_texture_fits(size) {
            let l = &self.capabilities().limits;
            return Err(Error::shape(
                "scratch texture",
                format!(
                    "{role}: {size:?} texels exceed the adapter's limits ({} per side, {} layers)",
                    l.max_texture_dimension_2d, l.max_texture_array_layers
                ),
            ));
        }
        let mut map = self.scratch.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = map.get(&(role, size)) {
            return Ok(t.clone());
        }
        let label = format!("scratch {role} {}x{}x{}", size[0], size[1], size[2]);
        let texture = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(&label),
            size: wgpu::Extent3d {
                width: size[0],
                height: size[1],
                depth_or_array_layers: size[2],
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: SCRATCH_FORMAT,
            // COPY_DST: an operand whose memory already has the packed layout is copied in
            // (kernels::matmul) rather than packed by a dispatch.
            usage: wgpu::TextureUsages::STORAGE_BINDING
                | wgpu::TextureUsages::TEXTURE_BINDING
                | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        let view = texture.create_view(&wgpu::TextureViewDescriptor {
            label: Some(&label),
            dimension: Some(wgpu::TextureViewDimension::D2Array),
            ..Default::default()
        });
        self.check(&format!("creating {label}"))?;
        let t = Arc::new(ScratchTexture { texture, view });
        map.insert((role, size), t.clone());
        Ok(t)
    }
}
