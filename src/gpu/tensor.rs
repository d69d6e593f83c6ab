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

/// A storage buffer holding a dense row-major tensor.
#[derive(Debug)]
pub struct GpuTensor {
    buffer: wgpu::Buffer,
    shape: Vec<usize>,
    dtype: DType,
    label: String,
}

impl GpuTensor {
    /// The wgpu buffer (bound as a storage buffer by kernels).
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
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
        Ok(GpuTensor {
            buffer,
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

    fn write_bytes(&self, t: &GpuTensor, bytes: &[u8]) {
        // write_buffer needs a multiple of 4 bytes: an odd-length f16 tensor gets one pad element.
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(&t.buffer, 0, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(&t.buffer, 0, &padded);
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

    /// Copies the whole buffer into a staging buffer, maps it and returns its bytes.
    fn read_bytes(&self, t: &GpuTensor) -> Result<Vec<u8>> {
        let size = t.buffer.size();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kiln readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.submit("readback copy", |enc| {
            enc.copy_buffer_to_buffer(&t.buffer, 0, &staging, 0, size)
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
        let bytes = view.to_vec();
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
