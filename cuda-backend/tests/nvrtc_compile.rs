//! Every kernel file compiles with NVRTC for sm_80 and sm_90. Needs NVRTC
//! (`libnvrtc.so.13` on the loader path) and the CUDA headers
//! (`MAMBA_CUDA_INCLUDE`), no GPU. Without them the test prints
//! `skipped: <reason>` and passes, unless `MAMBA_REQUIRE_NVRTC=1` (CI sets it).

use mamba_cuda::compile::{
    compile_all_uncached, include_dir, nvrtc_version, signature, ParamKind, KERNEL_FILES,
};

fn required() -> bool {
    std::env::var("MAMBA_REQUIRE_NVRTC").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `Some(reason)` when NVRTC or the headers are not available.
fn unavailable() -> Option<String> {
    if let Err(e) = nvrtc_version() {
        return Some(e.to_string());
    }
    include_dir().err().map(|e| e.to_string())
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    if let Some(why) = unavailable() {
        assert!(!required(), "MAMBA_REQUIRE_NVRTC is set but NVRTC cannot run: {why}");
        println!("skipped: {why}");
        return;
    }
    let (major, minor) = nvrtc_version().expect("NVRTC version");
    for arch in ["sm_80", "sm_90"] {
        match compile_all_uncached(arch) {
            Ok(n) => println!("NVRTC {major}.{minor} compiled {n} kernel files for {arch}"),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn every_entry_point_has_a_signature_the_launcher_can_pass() {
    for f in KERNEL_FILES {
        assert!(!f.functions.is_empty(), "{} lists no entry point", f.name);
        for name in f.functions {
            let sig = signature(f, name)
                .unwrap_or_else(|| panic!("{}: no readable signature for `{name}`", f.name));
            assert!(!sig.is_empty(), "{}: `{name}` has no parameters", f.name);
        }
    }
    // Spot checks of the parser on a plain and a macro-made kernel.
    let scan = KERNEL_FILES.iter().find(|f| f.name == "scan.cu").unwrap();
    let s = signature(scan, "selective_scan_3").unwrap();
    assert_eq!(s.len(), 17);
    assert_eq!(&s[14..], &[ParamKind::U64, ParamKind::U64, ParamKind::U32]);
    let norm = KERNEL_FILES.iter().find(|f| f.name == "norm.cu").unwrap();
    let s = signature(norm, "rms_norm").unwrap();
    use ParamKind::*;
    assert_eq!(s, vec![Ptr, Ptr, Ptr, U32, U32, F32]);
    let lin = KERNEL_FILES.iter().find(|f| f.name == "linear.cu").unwrap();
    assert_eq!(signature(lin, "gemv_bf16_8").unwrap(), vec![Ptr, Ptr, Ptr, Ptr, U32, U32, U32, U32]);
    assert!(signature(lin, "no_such_kernel").is_none());
}

/// Every `__global__` entry point a source defines is listed, so the device
/// loads it (one left out is "not loaded" only on a GPU: the emulator
/// finds kernels by their symbols). Macro-made names are matched by their
/// literal prefix.
#[test]
fn every_global_function_in_a_source_is_listed() {
    for f in KERNEL_FILES {
        let src = f.source.replace("\\\n", " ");
        let mut rest = src.as_str();
        while let Some(at) = rest.find("__global__ void ") {
            rest = &rest[at + "__global__ void ".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '#'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let listed = match name.split_once("##") {
                None => f.functions.contains(&name),
                Some((prefix, _)) => f.functions.iter().any(|g| g.starts_with(prefix)),
            };
            assert!(listed, "{}: `{name}` is defined but not in KERNEL_FILES, so it is never loaded", f.name);
        }
    }
}
