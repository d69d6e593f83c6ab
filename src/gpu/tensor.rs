//! Typed GPU buffers with a shape, and their upload and read-back.

use super::Gpu;
use crate::{Error, Precision, Result};
use half::f16;

/// Element type of a [`GpuTensor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// Unsigned 32-bit integer (token ids, counters, flags).
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 | DType::U32 => 4,
        }
    }
}

impl From<Precision> for DType {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F16 => DType::F16,
            Precision::F32 => DType::F32,
        }
    }
}

/// A dense row-major tensor in a storage buffer: the whole buffer, or a view of part of one
/// (a parameter inside the flat parameter buffer, see [`GpuTensor::view`]).
#[derive(Debug)]
pub struct GpuTensor {
    buffer: wgpu::Buffer,
    /// Byte offset of element 0 in `buffer`.
    offset: u64,
    shape: Vec<usize>,
    dtype: DType,
    label: String,
}

/// A resource to bind to a shader slot: a range of a buffer (a whole uniform buffer or a
/// tensor's elements) or a texture view.
#[derive(Clone, Copy, Debug)]
pub struct Bind<'a>(BindResource<'a>);

#[derive(Clone, Copy, Debug)]
enum BindResource<'a> {
    Buffer {
        buffer: &'a wgpu::Buffer,
        offset: u64,
        size: Option<std::num::NonZeroU64>,
    },
    Texture {
        view: &'a wgpu::TextureView,
        bytes: u64,
    },
}

impl<'a> Bind<'a> {
    /// All of `buffer`.
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        Bind(BindResource::Buffer {
            buffer,
            offset: 0,
            size: None,
        })
    }

    /// A texture view (sampled or storage, as the shader declares it) of `bytes` bytes.
    pub fn texture(view: &'a wgpu::TextureView, bytes: u64) -> Self {
        Bind(BindResource::Texture { view, bytes })
    }

    /// Bytes of the bound range (of the texture), for the dispatch census.
    pub fn bytes(&self) -> u64 {
        match self.0 {
            BindResource::Buffer {
                buffer,
                offset,
                size,
            } => size.map_or(buffer.size() - offset, |s| s.get()),
            BindResource::Texture { bytes, .. } => bytes,
        }
    }

    pub(crate) fn resource(&self) -> wgpu::BindingResource<'a> {
        match self.0 {
            BindResource::Buffer {
                buffer,
                offset,
                size,
            } => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size,
            }),
            BindResource::Texture { view, .. } => wgpu::BindingResource::TextureView(view),
        }
    }
}

impl GpuTensor {
    /// The underlying wgpu buffer (shared by all views of it).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// Byte offset of the tensor in [`GpuTensor::buffer`].
    pub fn offset_bytes(&self) -> u64 {
        self.offset
    }

    /// The tensor's range for binding to a shader slot. The size is rounded up to 4 bytes (an odd
    /// f16 tensor carries one element of what follows it, never written by a kernel).
    pub fn bind(&self) -> Bind<'_> {
        let bytes = (self.len().max(1) * self.dtype.size()).div_ceil(4) * 4;
        let bytes = (bytes as u64).min(self.buffer.size() - self.offset);
        Bind(BindResource::Buffer {
            buffer: &self.buffer,
            offset: self.offset,
            size: std::num::NonZeroU64::new(bytes),
        })
    }

    /// A tensor of `shape` over the elements starting at `offset` (in elements) of this one,
    /// sharing its buffer. The byte offset must meet the adapter's
    /// `min_storage_buffer_offset_alignment` to be bound (kiln's parameter layout aligns every
    /// tensor for that).
    pub fn view(&self, label: &str, offset: usize, shape: &[usize]) -> crate::Result<GpuTensor> {
        let len: usize = shape.iter().product();
        if offset + len > self.len() {
            return Err(Error::shape(
                "view",
                format!(
                    "{label}: elements {offset}..{} are outside {} ({} elements)",
                    offset + len,
                    self.label,
                    self.len()
                ),
            ));
        }
        Ok(GpuTensor {
            buffer: self.buffer.clone(),
            offset: self.offset + (offset * self.dtype.size()) as u64,
            shape: shape.to_vec(),
            dtype: self.dtype,
            label: label.to_string(),
        })
    }
    /// Shape, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The label given at creation (also the wgpu buffer's label).
    pub fn label(&self) -> &str {
        &self.label
    }
    /// Bytes of payload (without the padding to 4 bytes that f16 buffers may carry).
    pub fn bytes(&self) -> u64 {
        (self.len() * self.dtype.size()) as u64
    }
}

/// Buffer size for `n` elements: at least 4 bytes, rounded up to a multiple of 4 (copy alignment),
/// then of 16 so that kernels may view any tensor as `array<vec4<T>>`.
fn padded_bytes(n: usize, dtype: DType) -> u64 {
    let raw = (n.max(1) * dtype.size()) as u64;
    raw.div_ceil(16) * 16
}

impl Gpu {
    /// A zero-filled tensor.
    pub fn zeros(&self, label: &str, shape: &[usize], dtype: DType) -> Result<GpuTensor> {
        let n: usize = shape.iter().product();
        let size = padded_bytes(n, dtype);
        let limit = self.capabilities().max_tensor_bytes();
        if size > limit {
            return Err(Error::BufferTooLarge {
                what: format!("tensor {label} {shape:?} ({dtype:?})"),
                bytes: size,
                limit,
            });
        }
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.allocated
            .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        Ok(GpuTensor {
            buffer,
            offset: 0,
            shape: shape.to_vec(),
            dtype,
            label: label.to_string(),
        })
    }

    /// Uploads f32 data, converting to `dtype` (f16 rounds to nearest, u32 is rejected).
    pub fn upload(
        &self,
        label: &str,
        shape: &[usize],
        dtype: DType,
        data: &[f32],
    ) -> Result<GpuTensor> {
        let t = self.zeros(label, shape, dtype)?;
        self.write(&t, data)?;
        Ok(t)
    }

    /// Uploads u32 data (token ids and the like).
    pub fn upload_u32(&self, label: &str, shape: &[usize], data: &[u32]) -> Result<GpuTensor> {
        let t = self.zeros(label, shape, DType::U32)?;
        check_len("upload_u32", &t, data.len())?;
        self.write_bytes(&t, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Uploads f16 data as is.
    pub fn upload_f16(&self, label: &str, shape: &[usize], data: &[f16]) -> Result<GpuTensor> {
        let t = self.zeros(label, shape, DType::F16)?;
        check_len("upload_f16", &t, data.len())?;
        self.write_bytes(&t, bytemuck::cast_slice(data));
        Ok(t)
    }

    /// Overwrites a float tensor with f32 `data`, converting to its element type.
    pub fn write(&self, t: &GpuTensor, data: &[f32]) -> Result<()> {
        check_len("write", t, data.len())?;
        match t.dtype {
            DType::F32 => self.write_bytes(t, bytemuck::cast_slice(data)),
            DType::F16 => {
                let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                self.write_bytes(t, bytemuck::cast_slice(&h));
            }
            DType::U32 => {
                return Err(Error::shape(
                    "write",
                    format!("tensor {} is u32; use upload_u32", t.label),
                ));
            }
        }
        Ok(())
    }

    /// Overwrites a u32 tensor.
    pub fn write_u32(&self, t: &GpuTensor, data: &[u32]) -> Result<()> {
        check_len("write_u32", t, data.len())?;
        if t.dtype != DType::U32 {
            return Err(Error::shape(
                "write_u32",
                format!("tensor {} is {:?}, not u32; use write", t.label, t.dtype),
            ));
        }
        self.write_bytes(t, bytemuck::cast_slice(data));
        Ok(())
    }

    fn write_bytes(&self, t: &GpuTensor, bytes: &[u8]) {
        // write_buffer needs a multiple of 4 bytes: an odd-length f16 tensor gets one pad element.
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(&t.buffer, t.offset, bytes);
        } else {
            // Padding a view's last element would clobber the next tensor: keep its bytes.
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            if t.offset != 0 || t.buffer.size() > padded_bytes(t.len(), t.dtype) {
                let keep = self.read_range(t, bytes.len() as u64, 2);
                if let Ok(keep) = keep {
                    padded[bytes.len()..].copy_from_slice(&keep);
                }
            }
            self.queue.write_buffer(&t.buffer, t.offset, &padded);
        }
    }

    /// Reads a float tensor back as f32 (waits for the device).
    pub fn read(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(t)?;
        Ok(match t.dtype {
            DType::F32 => bytemuck::cast_slice::<u8, f32>(&bytes)[..t.len()].to_vec(),
            DType::F16 => bytemuck::cast_slice::<u8, f16>(&bytes)[..t.len()]
                .iter()
                .map(|h| h.to_f32())
                .collect(),
            DType::U32 => {
                return Err(Error::shape(
                    "read",
                    format!("tensor {} is u32; use read_u32", t.label),
                ));
            }
        })
    }

    /// Reads an f16 tensor back without conversion.
    pub fn read_f16(&self, t: &GpuTensor) -> Result<Vec<f16>> {
        expect_dtype("read_f16", t, DType::F16)?;
        let bytes = self.read_bytes(t)?;
        Ok(bytemuck::cast_slice::<u8, f16>(&bytes)[..t.len()].to_vec())
    }

    /// Reads a u32 tensor back.
    pub fn read_u32(&self, t: &GpuTensor) -> Result<Vec<u32>> {
        expect_dtype("read_u32", t, DType::U32)?;
        let bytes = self.read_bytes(t)?;
        Ok(bytemuck::cast_slice::<u8, u32>(&bytes)[..t.len()].to_vec())
    }

    /// Copies the tensor's bytes (rounded up to 4) into a staging buffer, maps it and returns them.
    fn read_bytes(&self, t: &GpuTensor) -> Result<Vec<u8>> {
        let size = ((t.len().max(1) * t.dtype.size()).div_ceil(4) * 4) as u64;
        self.read_range(t, 0, size)
    }

    /// `len` bytes from byte `start` of the tensor; the copy is widened to 4-byte boundaries.
    fn read_range(&self, t: &GpuTensor, start: u64, len: u64) -> Result<Vec<u8>> {
        let from = (t.offset + start) / 4 * 4;
        let skip = (t.offset + start - from) as usize;
        let size = ((skip as u64 + len).div_ceil(4) * 4).min(t.buffer.size() - from);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.submit("readback copy", |enc| {
            enc.copy_buffer_to_buffer(&t.buffer, from, &staging, 0, size)
        })?;
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        let mapped = rx.recv().map_err(|e| Error::Readback {
            what: t.label.clone(),
            message: e.to_string(),
        })?;
        mapped.map_err(|e| Error::Readback {
            what: t.label.clone(),
            message: e.to_string(),
        })?;
        let view = staging.get_mapped_range(..).map_err(|e| Error::Readback {
            what: t.label.clone(),
            message: e.to_string(),
        })?;
        let bytes = view[skip..(skip + len as usize).min(view.len())].to_vec();
        drop(view);
        staging.unmap();
        Ok(bytes)
    }
}

fn check_len(op: &'static str, t: &GpuTensor, n: usize) -> Result<()> {
    if n != t.len() {
        return Err(Error::shape(
            op,
            format!(
                "tensor {} has shape {:?} ({} elements) but {} values were given",
                t.label,
                t.shape,
                t.len(),
                n
            ),
        ));
    }
    Ok(())
}

fn expect_dtype(op: &'static str, t: &GpuTensor, dtype: DType) -> Result<()> {
    if t.dtype != dtype {
        return Err(Error::shape(
            op,
            format!("tensor {} is {:?}, not {:?}", t.label, t.dtype, dtype),
        ));
    }
    Ok(())
}
