//! Matrix products through cuBLAS (`cublasGemmEx`), f32 accumulation and output.
//!
//! Row-major `out[rows, n_out] = x[rows, k] W^T` with `W [n_out, k]` is, in
//! cuBLAS's column-major terms, `out^T (n_out x rows) = op_T(W) (n_out x k) * x^T (k x rows)`:
//! A = W with ld k, transposed; B = x with ld k; C = out with ld n_out.
//! Supported (A, B) types: (f32, f32), (bf16, bf16), (f16, f16), all with
//! `CUBLAS_COMPUTE_32F` (no TF32) and an f32 C.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use mamba_core::DType;

use crate::error::{CudaError, Result};

/// A cuBLAS handle bound to the backend's stream.
pub(crate) struct Blas {
    handle: sys::cublasHandle_t,
    /// cuBLAS's workspace, ours so a captured CUDA graph never sees cuBLAS allocate.
    _workspace: CudaSlice<u8>,
}

/// Bytes of cuBLAS workspace (NVIDIA suggests 32 MiB on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

fn blas_err(during: &'static str) -> impl FnOnce(blas::CublasError) -> CudaError {
    move |e| CudaError::Cublas { during, status: format!("{:?}", e.0) }
}

impl Blas {
    pub(crate) fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let handle = blas::create_handle().map_err(blas_err("creating a handle"))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(CudaError::driver("allocating cuBLAS workspace"))?;
        let ws = workspace.device_ptr(stream).0;
        // SAFETY: a live handle, the backend's live stream, and a workspace
        // that lives as long as the handle (both in `Blas`).
        #[allow(unsafe_code)]
        unsafe {
            blas::set_stream(handle, stream.cu_stream() as _).map_err(blas_err("binding the stream"))?;
            sys::cublasSetWorkspace_v2(handle, ws as *mut c_void, WORKSPACE_BYTES)
                .result()
                .map_err(blas_err("setting the workspace"))?;
            // Pedantic-free default math: CUBLAS_COMPUTE_32F below already rules out TF32.
            sys::cublasSetMathMode(handle, sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                .result()
                .map_err(blas_err("setting the math mode"))?;
        }
        Ok(Blas { handle, _workspace: workspace })
    }

    /// `c[rows, n_out] = b[rows, k] a[n_out, k]^T` on device addresses; `a` and
    /// `b` both of `dtype`, `c` f32.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm(
        &self,
        dtype: DType,
        a: u64,
        b: u64,
        c: u64,
        rows: usize,
        n_out: usize,
        k: usize,
    ) -> Result<()> {
        let ty = match dtype {
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            DType::F16 => sys::cudaDataType::CUDA_R_16F,
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::Q8_0 => {
                return Err(CudaError::Input("a Q8_0 matrix reached cuBLAS (uploads dequantize it)".into()))
            }
        };
        let dim = |v: usize, what: &str| {
            i32::try_from(v)
                .map_err(|_| CudaError::Input(format!("matrix {what} {v} is past cuBLAS's int range")))
        };
        let (m, n, kk) = (dim(n_out, "rows")?, dim(rows, "columns")?, dim(k, "depth")?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the caller checked that a, b and c hold n_out*k, rows*k and
        // rows*n_out elements of their types; alpha and beta are host f32s
        // (the handle's default host pointer mode).
        #[allow(unsafe_code)]
        unsafe {
            blas::gemm_ex(
                self.handle,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                kk,
                &alpha as *const f32 as *const c_void,
                a as *const c_void,
                ty,
                kk,
                b as *const c_void,
                ty,
                kk,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                m,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(blas_err("cublasGemmEx"))
        }
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once.
        #[allow(unsafe_code)]
        let _ = unsafe { blas::destroy_handle(self.handle) };
    }
}
