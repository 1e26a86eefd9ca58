//! Whether the CUDA libraries can be loaded, asked before any cudarc call.
//!
//! cudarc (dynamic loading) panics inside its lazy loader when a library is
//! missing; every entry point here checks loadability first, and runs the
//! check itself under `catch_unwind`, so a machine without CUDA gets an error.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{CudaError, Result};

/// The libraries the backend loads: what they are for and their file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lib {
    Driver,
    Nvrtc,
    Cublas,
}

impl Lib {
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Lib::Driver => ("driver", "libcuda.so"),
            Lib::Nvrtc => ("NVRTC runtime compiler", "libnvrtc.so.13"),
            Lib::Cublas => ("cuBLAS library", "libcublas.so.13"),
        }
    }

    fn present(self) -> bool {
        // SAFETY: these only try dlopen on candidate names; nothing is called.
        #[allow(unsafe_code)]
        unsafe {
            match self {
                Lib::Driver => cudarc::driver::sys::is_culib_present(),
                Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Lib::Cublas => cudarc::cublas::sys::is_culib_present(),
            }
        }
    }
}

/// `Ok` when `lib` loads; otherwise a [`CudaError::Missing`] that names it.
pub fn require(lib: Lib) -> Result<()> {
    let (what, file) = lib.names();
    let hint = match lib {
        Lib::Driver => "is the NVIDIA driver installed and is this a GPU machine?",
        _ => "add its folder to LD_LIBRARY_PATH (a CUDA 13 toolkit's lib64, or the nvidia/cu13/lib folder of the pip wheels)",
    };
    match catch_unwind(AssertUnwindSafe(|| lib.present())) {
        Ok(true) => Ok(()),
        Ok(false) => Err(CudaError::Missing { what, lib: file, why: format!("not loadable; {hint}") }),
        Err(_) => Err(CudaError::Missing { what, lib: file, why: "the loader panicked".into() }),
    }
}

/// Run a cudarc call that may panic in its loader (a missing symbol), as an error.
pub(crate) fn guarded<T>(during: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(CudaError::Missing { what: "CUDA entry point", lib: during, why: msg.to_string() })
    })
}
