//! Every kernel file compiles with NVRTC for sm_80 and sm_90. Needs NVRTC
//! (`libnvrtc.so.13` on the loader path) and the CUDA headers
//! (`MAMBA_CUDA_INCLUDE`), no GPU. Without them the test prints
//! `skipped: <reason>` and passes, unless `MAMBA_REQUIRE_NVRTC=1` (CI sets it).

use mamba_cuda::compile::{compile_all_uncached, include_dir, nvrtc_version, KERNEL_FILES};

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
fn every_kernel_file_lists_entry_points_it_defines() {
    for f in KERNEL_FILES {
        assert!(!f.functions.is_empty(), "{} lists no entry point", f.name);
        for name in f.functions {
            let defined = f.source.contains(&format!("void {name}("))
                || (name.starts_with("selective_scan_") && f.source.contains("selective_scan_##NPT"));
            assert!(defined, "{} does not define `{name}`", f.name);
        }
    }
}
