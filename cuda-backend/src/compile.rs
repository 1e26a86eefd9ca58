//! The kernel sources and their run-time compilation with NVRTC.
//!
//! Each `.cu` file under `kernels/` becomes one NVRTC program (the shared
//! `common.cuh` text in front of it), compiled to a cubin for one
//! architecture (`sm_90` on Hopper). Cubins are cached in memory for the
//! process and on disk under [`cache_dir`], keyed by a hash of the source,
//! the options and the NVRTC version, so a second run skips compilation.
//!
//! Environment:
//! - `MAMBA_CUDA_INCLUDE`: folder holding `cuda_fp16.h` / `cuda_bf16.h`
//!   (else `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`).
//! - `MAMBA_CUDA_CACHE`: cubin cache folder (else `$XDG_CACHE_HOME/mamba-cuda`
//!   or `~/.cache/mamba-cuda`); `MAMBA_CUDA_CACHE=off` disables the disk cache.
//! - NVRTC itself (`libnvrtc.so.13`) is found by the dynamic loader (`LD_LIBRARY_PATH`).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::error::{CudaError, Result};
use crate::plan;
use crate::probe::{self, Lib};

const COMMON: &str = include_str!("../kernels/common.cuh");

/// A kernel source file and the entry points it defines.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

/// Every kernel file of the backend.
pub const KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        name: "embed.cu",
        source: include_str!("../kernels/embed.cu"),
        functions: &["embed_f32", "embed_f16", "embed_bf16"],
    },
    KernelFile {
        name: "norm.cu",
        source: include_str!("../kernels/norm.cu"),
        functions: &["rms_norm", "add_rms_norm", "add_assign", "gather_rows"],
    },
    KernelFile {
        name: "linear.cu",
        source: include_str!("../kernels/linear.cu"),
        functions: LINEAR_FUNCTIONS,
    },
    KernelFile { name: "dt.cu", source: include_str!("../kernels/dt.cu"), functions: &["dt_proj_softplus"] },
    KernelFile {
        name: "conv.cu",
        source: include_str!("../kernels/conv.cu"),
        functions: &["conv1d_prefill_out", "conv1d_prefill_state", "conv1d_step"],
    },
    KernelFile { name: "scan.cu", source: include_str!("../kernels/scan.cu"), functions: SCAN_FUNCTIONS },
    KernelFile {
        name: "sample.cu",
        source: include_str!("../kernels/sample.cu"),
        functions: &["argmax_rows", "sample_rows"],
    },
];

/// The names of `parts`, in order, as one array: the launch plans'
/// kernel families are listed once, in [`crate::plan`]. `N` must be their
/// count (a mismatch fails to compile).
const fn join<const N: usize>(parts: &[&[&'static str]]) -> [&'static str; N] {
    let mut out = [""; N];
    let (mut k, mut i) = (0, 0);
    while i < parts.len() {
        let mut j = 0;
        while j < parts[i].len() {
            out[k] = parts[i][j];
            k += 1;
            j += 1;
        }
        i += 1;
    }
    assert!(k == N, "join: N is not the number of names");
    out
}

const SCAN_FUNCTIONS: &[&str] =
    &join::<25>(&[&plan::SCAN_KERNELS, &plan::CHUNK_END, &plan::CHUNK_Y, &["chunk_carry"]]);

const LINEAR_FUNCTIONS: &[&str] = &join::<27>(&[
    &["split_bf16", "split_f16", "combine_parts"],
    &plan::GEMV_F32,
    &plan::GEMV_F16,
    &plan::GEMV_BF16,
]);

/// The C type of one kernel parameter, as the launch code must pass it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Any pointer: a device address (u64).
    Ptr,
    U32,
    U64,
    F32,
}

/// The parameter kinds of entry point `function` of `file`, parsed from its
/// source: `void NAME(...)`, or for kernels stamped out by a macro, the
/// macro's `void PREFIX##...(...)` whose literal prefix starts `function`.
/// `None` when not found or a parameter type is not one the launcher passes.
pub fn signature(file: &KernelFile, function: &str) -> Option<Vec<ParamKind>> {
    let src = file.source.replace("\\\n", " ");
    let mut rest = src.as_str();
    while let Some(at) = rest.find("void ") {
        rest = &rest[at + 5..];
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '#'))?;
        let token = &rest[..end];
        let matches = match token.split_once("##") {
            None => token == function,
            Some((prefix, _)) => !prefix.is_empty() && function.starts_with(prefix),
        };
        if !matches || !rest[end..].starts_with('(') {
            continue;
        }
        let params = &rest[end + 1..end + rest[end..].find(')')?];
        return params
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                if p.contains('*') {
                    return Some(ParamKind::Ptr);
                }
                match p.split_whitespace().next()? {
                    "u32" => Some(ParamKind::U32),
                    "u64" => Some(ParamKind::U64),
                    "float" => Some(ParamKind::F32),
                    _ => None,
                }
            })
            .collect();
    }
    None
}

/// The full text NVRTC compiles for `file`.
pub fn program_text(file: &KernelFile) -> String {
    format!("{COMMON}\n#line 1 \"{}\"\n{}", file.name, file.source)
}

/// The folder with the CUDA headers NVRTC needs (`cuda_bf16.h`), from the
/// environment (see the module docs), or an error naming where it looked.
pub fn include_dir() -> Result<PathBuf> {
    let mut tried = vec![];
    let env = |v: &str, sub: &str| std::env::var_os(v).map(|p| PathBuf::from(p).join(sub));
    let candidates = [
        env("MAMBA_CUDA_INCLUDE", ""),
        env("CUDA_HOME", "include"),
        env("CUDA_PATH", "include"),
        Some(PathBuf::from("/usr/local/cuda/include")),
    ];
    for dir in candidates.into_iter().flatten() {
        if dir.join("cuda_bf16.h").is_file() {
            return Ok(dir);
        }
        tried.push(dir.display().to_string());
    }
    Err(CudaError::Missing {
        what: "CUDA headers",
        lib: "cuda_bf16.h",
        why: format!(
            "looked in {}; set MAMBA_CUDA_INCLUDE to a folder with cuda_bf16.h (a toolkit's include/, or \
             the nvidia/cu13/include folder of the nvidia-cuda-runtime pip wheel)",
            tried.join(", ")
        ),
    })
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    probe::require(Lib::Nvrtc)?;
    probe::guarded("nvrtcVersion", || {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: two out-pointers to live locals.
        #[allow(unsafe_code)]
        let r = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
        r.result().map_err(|e| nvrtc_err("asking NVRTC's version", e))?;
        Ok((major, minor))
    })
}

fn nvrtc_err(during: &'static str, e: nvrtc::NvrtcError) -> CudaError {
    CudaError::Input(format!("NVRTC failed while {during}: {e}"))
}

/// Options for one architecture, e.g. `sm_90`.
fn options(arch: &str, include: &Path) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        format!("--include-path={}", include.display()),
        "--std=c++17".into(),
        // Exact division and square root, no flush to zero: the CPU reference's numerics.
        "--fmad=true".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
    ]
}

/// 64-bit FNV-1a: a stable key for the disk cache (std's hasher may change between releases).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Where compiled cubins are kept between runs, or `None` when disabled.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("MAMBA_CUDA_CACHE") {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("mamba-cuda")),
    }
}

type MemCache = Mutex<HashMap<u64, Vec<u8>>>;

fn mem_cache() -> &'static MemCache {
    static CACHE: OnceLock<MemCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The cubin of `file` for `arch` (`sm_80`, `sm_90`, ...), from the caches or NVRTC.
pub fn cubin(file: &KernelFile, arch: &str) -> Result<Vec<u8>> {
    let include = include_dir()?;
    let text = program_text(file);
    let opts = options(arch, &include);
    let (major, minor) = nvrtc_version()?;
    let version = format!("nvrtc {major}.{minor}");
    let key = fnv1a(&[text.as_bytes(), opts.join(" ").as_bytes(), version.as_bytes()]);
    if let Some(c) = mem_cache().lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(c);
    }
    let disk = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.cubin", file.name)));
    if let Some(c) = disk.as_ref().and_then(|p| std::fs::read(p).ok()).filter(|c| !c.is_empty()) {
        if let Ok(mut m) = mem_cache().lock() {
            m.insert(key, c.clone());
        }
        return Ok(c);
    }
    let c = compile(file.name, &text, &opts, arch)?;
    if let Some(p) = disk {
        // A cache that cannot be written only costs a recompilation next run.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if p.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) && std::fs::write(&tmp, &c).is_ok()
        {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    if let Ok(mut m) = mem_cache().lock() {
        m.insert(key, c.clone());
    }
    Ok(c)
}

/// One NVRTC compilation to a cubin.
fn compile(name: &'static str, text: &str, opts: &[String], arch: &str) -> Result<Vec<u8>> {
    probe::require(Lib::Nvrtc)?;
    let src = CString::new(text).map_err(|_| CudaError::Input(format!("{name} contains a NUL byte")))?;
    let cname = CString::new(name).map_err(|_| CudaError::Input(format!("{name}: bad file name")))?;
    probe::guarded("nvrtcCompileProgram", || {
        let prog =
            nvrtc::create_program(&src, Some(&cname)).map_err(|e| nvrtc_err("creating a program", e))?;
        let out = compile_program(prog, name, opts, arch);
        // SAFETY: `prog` came from create_program and is destroyed once.
        #[allow(unsafe_code)]
        let _ = unsafe { nvrtc::destroy_program(prog) };
        out
    })
}

fn compile_program(
    prog: nvrtc_sys::nvrtcProgram,
    name: &'static str,
    opts: &[String],
    arch: &str,
) -> Result<Vec<u8>> {
    // SAFETY: `prog` is a live program; the log and cubin buffers are sized
    // by NVRTC's own size queries before it writes them.
    #[allow(unsafe_code)]
    unsafe {
        if let Err(e) = nvrtc::compile_program(prog, opts) {
            let log = nvrtc::get_program_log(prog)
                .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(CudaError::Compile { file: name, arch: arch.into(), log: format!("{e}: {log}") });
        }
        let mut size = 0usize;
        nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| nvrtc_err("sizing the cubin", e))?;
        if size == 0 {
            return Err(CudaError::Compile {
                file: name,
                arch: arch.into(),
                log: "NVRTC made no cubin".into(),
            });
        }
        let mut buf = vec![0u8; size];
        nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
            .result()
            .map_err(|e| nvrtc_err("reading the cubin", e))?;
        Ok(buf)
    }
}

/// Compile every kernel file for `arch` without any cache (the CI check).
/// Returns the number of files compiled.
pub fn compile_all_uncached(arch: &str) -> Result<usize> {
    let include = include_dir()?;
    let opts = options(arch, &include);
    for f in KERNEL_FILES {
        compile(f.name, &program_text(f), &opts, arch)?;
    }
    Ok(KERNEL_FILES.len())
}
