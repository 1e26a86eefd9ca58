//! Weights in device memory and their upload from host [`Tensor`] views.
//!
//! Matrices (in_proj, x_proj, out_proj, the embedding and the head) keep
//! their stored dtype (f32, f16 or bf16): decode reads every weight byte once
//! per step, so they stay as small as the checkpoint. Vectors and the small
//! per-channel weights (norms, biases, conv1d, dt_proj, A, D) are widened to
//! f32 once at upload: the kernels read them as f32, with the values the CPU
//! backend widens in registers. Q8_0 matrices are dequantized to f32 at
//! upload (exact), so no device weight is Q8_0.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use mamba_core::{CoreError, DType, Tensor, WData};

use crate::error::{CudaError, Result};

#[derive(Debug)]
pub(crate) enum WeightData {
    F32(CudaSlice<f32>),
    /// f16 or bf16 bits.
    Half(CudaSlice<u16>),
}

/// A `[rows, cols]` row-major weight on the device (the backend's
/// [`mamba_core::MambaOps::Weight`]). Cloning shares the device memory.
#[derive(Clone, Debug)]
pub struct DeviceWeight {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub(crate) data: Arc<WeightData>,
}

impl DeviceWeight {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes on the device.
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype.size()
    }
    pub(crate) fn ptr(&self, stream: &CudaStream) -> u64 {
        match &*self.data {
            WeightData::F32(s) => s.device_ptr(stream).0,
            WeightData::Half(s) => s.device_ptr(stream).0,
        }
    }
    /// Check the shape is `[rows, cols]`.
    pub fn expect_shape(&self, what: &'static str, rows: usize, cols: usize) -> Result<(), CoreError> {
        if self.rows == rows && self.cols == cols {
            Ok(())
        } else {
            Err(CoreError::BadShape { what, expected: (rows, cols), got: (self.rows, self.cols) })
        }
    }
    /// The address of an f32 weight (vectors and per-channel weights are uploaded as f32).
    pub(crate) fn f32_ptr(&self, what: &'static str, stream: &CudaStream) -> Result<u64> {
        match &*self.data {
            WeightData::F32(s) => Ok(s.device_ptr(stream).0),
            WeightData::Half(_) => Err(CudaError::Input(format!(
                "weight `{what}` is {} on the device; this operation needs it as f32 (upload it with \
                 upload_f32)",
                self.dtype.name()
            ))),
        }
    }
}

/// Upload `t` in its stored dtype.
pub fn upload_stored(stream: &Arc<CudaStream>, t: &Tensor<'_>) -> Result<DeviceWeight> {
    let data = match t.data {
        WData::F32(s) => {
            WeightData::F32(stream.clone_htod(s).map_err(CudaError::driver("uploading a weight"))?)
        }
        WData::F16(s) => {
            let bits: &[u16] = half::slice::HalfFloatSliceExt::reinterpret_cast(s);
            WeightData::Half(stream.clone_htod(bits).map_err(CudaError::driver("uploading a weight"))?)
        }
        WData::BF16(s) => {
            let bits: &[u16] = half::slice::HalfFloatSliceExt::reinterpret_cast(s);
            WeightData::Half(stream.clone_htod(bits).map_err(CudaError::driver("uploading a weight"))?)
        }
        // No Q8_0 kernels on the device yet: the dequantized weights are
        // exact in f32, so the f32 path computes the same product (at 4x
        // the bytes). Device weights are therefore never Q8_0.
        WData::Q8_0 { .. } => return upload_f32(stream, t),
    };
    Ok(DeviceWeight { dtype: t.dtype(), rows: t.rows, cols: t.cols, data: Arc::new(data) })
}

/// Upload `t` widened to f32.
pub fn upload_f32(stream: &Arc<CudaStream>, t: &Tensor<'_>) -> Result<DeviceWeight> {
    let host: Vec<f32> = (0..t.len()).map(|i| t.data.get(i)).collect();
    let s = stream.clone_htod(&host).map_err(CudaError::driver("uploading a weight"))?;
    Ok(DeviceWeight { dtype: DType::F32, rows: t.rows, cols: t.cols, data: Arc::new(WeightData::F32(s)) })
}

/// Upload the matrix `t` `[rows, cols]` transposed, `[cols, rows]`, widened to f32.
pub fn upload_f32_transposed(stream: &Arc<CudaStream>, t: &Tensor<'_>) -> Result<DeviceWeight> {
    let host = transposed_f32(t);
    let s = stream.clone_htod(&host).map_err(CudaError::driver("uploading a weight"))?;
    Ok(DeviceWeight { dtype: DType::F32, rows: t.cols, cols: t.rows, data: Arc::new(WeightData::F32(s)) })
}

/// `t` `[rows, cols]` as f32 values `[cols, rows]`.
pub fn transposed_f32(t: &Tensor<'_>) -> Vec<f32> {
    let (r, c) = (t.rows, t.cols);
    (0..r * c).map(|i| t.data.get((i % r) * c + i / r)).collect()
}
