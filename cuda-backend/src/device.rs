//! The backend object: one device, one stream, the loaded kernels, a cuBLAS
//! handle, and the small host-to-device uploads every operation needs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::compile::{self, ParamKind, KERNEL_FILES};
use crate::error::{CudaError, Result};
use crate::gemm::Blas;
use crate::plan::{Arg, Launch};
use crate::probe::{self, Lib};

/// Host values copied to a device buffer that is reused while the values
/// stay the same (a ragged batch's descriptor is read by every layer).
#[derive(Default)]
pub(crate) struct Upload {
    host: Vec<u32>,
    dev: Option<CudaSlice<u32>>,
}

impl Upload {
    /// The device address of `data`, copying it only when it changed.
    /// While a graph is captured nothing may be copied or allocated: the
    /// address is returned as it is (the caller stages the values before
    /// each replay), or an error when the buffer is too small.
    pub(crate) fn put(&mut self, stream: &Arc<CudaStream>, data: &[u32], live: &Live) -> Result<u64> {
        let fits = self.dev.as_ref().is_some_and(|d| d.len() >= data.len().max(1));
        if live.capturing.get() {
            return if fits {
                Ok(self.ptr(stream))
            } else {
                Err(CudaError::Input("an upload buffer would grow while a CUDA graph is captured".into()))
            };
        }
        if fits && self.host == data {
            return Ok(self.ptr(stream));
        }
        if !fits {
            let cap = data.len().max(64).next_power_of_two();
            // SAFETY: u32 needs no initialisation; the prefix is written below before any kernel reads it.
            #[allow(unsafe_code)]
            let d = unsafe { stream.alloc::<u32>(cap) }
                .map_err(CudaError::driver("allocating an upload buffer"))?;
            self.dev = Some(d);
            live.moved();
        }
        if let Some(dev) = self.dev.as_mut() {
            if !data.is_empty() {
                let mut view = dev.slice_mut(..data.len());
                stream.memcpy_htod(data, &mut view).map_err(CudaError::driver("uploading batch indices"))?;
            }
        }
        self.host.clear();
        self.host.extend_from_slice(data);
        Ok(self.ptr(stream))
    }

    fn ptr(&self, stream: &CudaStream) -> u64 {
        self.dev.as_ref().map_or(0, |d| d.device_ptr(stream).0)
    }
}

/// What CUDA graphs of the decode step depend on: whether a capture is under
/// way, and a count of buffer reallocations (a graph captured before one
/// holds stale addresses and is captured again).
#[derive(Default)]
pub(crate) struct Live {
    pub(crate) capturing: std::cell::Cell<bool>,
    pub(crate) generation: std::cell::Cell<u64>,
}

impl Live {
    pub(crate) fn moved(&self) {
        self.generation.set(self.generation.get() + 1);
    }
}

/// The launch code passes what the kernel declares: a mismatch is a bug in
/// this crate, reported instead of launched (it would corrupt memory).
pub(crate) fn check_args(name: &str, sig: &[ParamKind], args: &[Arg]) -> Result<()> {
    if sig.len() != args.len() {
        return Err(CudaError::Input(format!(
            "kernel `{name}` takes {} arguments, the launch passes {}",
            sig.len(),
            args.len()
        )));
    }
    for (i, (k, a)) in sig.iter().zip(args).enumerate() {
        let ok = matches!(
            (k, a),
            (ParamKind::Ptr, Arg::Ptr(_))
                | (ParamKind::U32, Arg::U32(_))
                | (ParamKind::U64, Arg::U64(_))
                | (ParamKind::F32, Arg::F32(_))
        );
        if !ok {
            return Err(CudaError::Input(format!(
                "kernel `{name}` argument {i}: it takes {k:?}, the launch passes {a:?}"
            )));
        }
    }
    Ok(())
}

/// A growable device scratch of `T` for one operation's temporaries.
pub(crate) struct Temp<T> {
    dev: Option<CudaSlice<T>>,
}

impl<T: cudarc::driver::DeviceRepr> Temp<T> {
    pub(crate) fn new() -> Self {
        Temp { dev: None }
    }
    /// The address of at least `n` values (contents undefined).
    pub(crate) fn at_least(&mut self, stream: &Arc<CudaStream>, n: usize, live: &Live) -> Result<u64> {
        if self.dev.as_ref().is_none_or(|d| d.len() < n) {
            if live.capturing.get() {
                return Err(CudaError::Input("scratch would grow while a CUDA graph is captured".into()));
            }
            self.dev = None; // free first: the old one may be large
                             // SAFETY: callers write every element they later read.
            #[allow(unsafe_code)]
            let d =
                unsafe { stream.alloc::<T>(n.max(1)) }.map_err(CudaError::driver("allocating scratch"))?;
            self.dev = Some(d);
            live.moved();
        }
        Ok(self.dev.as_ref().map_or(0, |d| d.device_ptr(stream).0))
    }
}

/// The device's primary context, created once per process and kept: a
/// backend made after another was dropped (the tests make dozens) does not
/// pay for the context's set-up again.
fn context(index: usize) -> Result<Arc<CudaContext>> {
    static CONTEXTS: std::sync::Mutex<Vec<(usize, Arc<CudaContext>)>> = std::sync::Mutex::new(Vec::new());
    let mut held = CONTEXTS.lock().map_err(|_| CudaError::Input("the context list is poisoned".into()))?;
    if let Some((_, c)) = held.iter().find(|(i, _)| *i == index) {
        return Ok(c.clone());
    }
    let ctx = CudaContext::new(index).map_err(|e| CudaError::NoDevice { index, why: e.to_string() })?;
    // Each backend orders its work on its own stream and shares no buffer with
    // another: cudarc's per-buffer event tracking is not needed.
    // SAFETY: called before any buffer of this context exists.
    #[allow(unsafe_code)]
    unsafe {
        ctx.disable_event_tracking()
    };
    held.push((index, ctx.clone()));
    Ok(ctx)
}

/// The CUDA backend for one device. Not `Sync`: one thread drives a device.
pub struct CudaBackend {
    // Dropped first: the cuBLAS handle is bound to the stream.
    pub(crate) blas: Blas,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// Each kernel with its parameter kinds (parsed from its source), checked at every launch.
    funcs: HashMap<&'static str, (CudaFunction, Vec<ParamKind>)>,
    arch: String,
    name: String,
    pub(crate) ids: RefCell<Upload>,
    pub(crate) rows: RefCell<Upload>,
    pub(crate) batch: RefCell<Upload>,
    pub(crate) half_x: RefCell<Temp<u16>>,
    pub(crate) parts: RefCell<Temp<f32>>,
    pub(crate) chunks: RefCell<Upload>,
    pub(crate) chunk_h: RefCell<Temp<f32>>,
    pub(crate) chunk_dt: RefCell<Temp<f32>>,
    pub(crate) live: Live,
    /// Half-precision weights: cut f32 activations into two half parts (hi + lo)
    /// for cuBLAS so only the weights' own rounding remains (default), or round
    /// them once (`false`: half the GEMM columns, bf16-level activation error).
    pub split_activations: bool,
    /// Products of at most this many rows (decode) use the crate's own
    /// matrix-vector kernel (weights read once, f32 accumulation) instead of
    /// cuBLAS; 0 sends everything to cuBLAS. Default 8, or `MAMBA_CUDA_GEMV_ROWS`.
    pub gemv_max_rows: usize,
    /// Prefill scans of sequences of at least two chunks of this many tokens
    /// run chunked when the plain scan would keep few threads busy
    /// ([`crate::plan::use_chunked_scan`]); 0 never. Default 128, or `MAMBA_CUDA_SCAN_CHUNK`.
    pub scan_chunk: usize,
}

impl CudaBackend {
    /// Open device `index`: load the driver, create a context and a stream,
    /// compile (or fetch from the cache) every kernel for the device's
    /// architecture, and create a cuBLAS handle. Errors, never panics, when
    /// CUDA, NVRTC, cuBLAS or the device is missing.
    pub fn new(index: usize) -> Result<Self> {
        probe::require(Lib::Driver)?;
        probe::require(Lib::Nvrtc)?;
        probe::require(Lib::Cublas)?;
        probe::guarded("opening the device", || Self::open(index))
    }

    fn open(index: usize) -> Result<Self> {
        let count = CudaContext::device_count().map_err(CudaError::driver("counting devices"))?;
        if index >= count.max(0) as usize {
            return Err(CudaError::NoDevice { index, why: format!("the driver sees {count} device(s)") });
        }
        let ctx = context(index)?;
        let stream = ctx.new_stream().map_err(CudaError::driver("creating a stream"))?;
        let (major, minor) =
            ctx.compute_capability().map_err(CudaError::driver("reading the architecture"))?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let mut funcs = HashMap::new();
        for file in KERNEL_FILES {
            let cubin = compile::cubin(file, &arch)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                .map_err(CudaError::driver("loading a kernel module"))?;
            for &f in file.functions {
                let func = module.load_function(f).map_err(CudaError::driver("finding a kernel"))?;
                let sig = compile::signature(file, f).ok_or_else(|| {
                    CudaError::Input(format!("cannot read the parameters of `{f}` in {}", file.name))
                })?;
                funcs.insert(f, (func, sig));
            }
        }
        let blas = Blas::new(&stream)?;
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            funcs,
            arch,
            name,
            ids: RefCell::default(),
            rows: RefCell::default(),
            batch: RefCell::default(),
            half_x: RefCell::new(Temp::new()),
            parts: RefCell::new(Temp::new()),
            chunks: RefCell::default(),
            chunk_h: RefCell::new(Temp::new()),
            chunk_dt: RefCell::new(Temp::new()),
            live: Live::default(),
            split_activations: true,
            gemv_max_rows: std::env::var("MAMBA_CUDA_GEMV_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(crate::plan::GEMV_MAX_ROWS),
            scan_chunk: std::env::var("MAMBA_CUDA_SCAN_CHUNK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(128),
        })
    }

    /// The device's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> &str {
        &self.name
    }
    /// The architecture kernels were compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// The stream every operation runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// `(free, total)` device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(CudaError::driver("reading free memory"))
    }
    /// Wait for all queued work; surfaces errors of earlier launches.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(CudaError::driver("waiting for the device"))
    }

    /// Queue one planned launch (see [`crate::plan`]).
    pub(crate) fn run(&self, l: &Launch) -> Result<()> {
        let Launch { kernel: name, grid, block, args } = l;
        if *grid == 0 {
            return Ok(());
        }
        let (f, sig) =
            self.funcs.get(name).ok_or_else(|| CudaError::Input(format!("kernel `{name}` is not loaded")))?;
        check_args(name, sig, args)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: (*grid, 1, 1), block_dim: (*block, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the argument kinds match the kernel's parameters (checked
        // above) and callers checked every buffer's size before planning.
        #[allow(unsafe_code)]
        unsafe { b.launch(cfg) }.map_err(CudaError::driver(name))?;
        Ok(())
    }
}
