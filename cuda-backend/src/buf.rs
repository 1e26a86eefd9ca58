//! Device buffers: f32 activations and the state pool, and their checks.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use mamba_core::CoreError;

/// An f32 buffer in device memory (the backend's [`mamba_core::MambaOps::Buf`]).
/// Its length is its capacity in f32 values; operations use a prefix.
#[derive(Debug)]
pub struct DeviceBuf {
    pub(crate) data: CudaSlice<f32>,
}

impl DeviceBuf {
    /// Capacity in f32 values.
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }
    /// The raw device address, for kernel arguments.
    pub(crate) fn ptr(&self, stream: &CudaStream) -> u64 {
        let (p, _sync) = self.data.device_ptr(stream);
        p
    }
    /// `Ok(address)` when the buffer holds at least `n` values.
    pub(crate) fn need(&self, what: &'static str, n: usize, stream: &CudaStream) -> Result<u64, CoreError> {
        if self.len() < n {
            return Err(CoreError::BufferTooSmall { what, need: n, got: self.len() });
        }
        Ok(self.ptr(stream))
    }
}
