//! CPU feature detection for the core's SIMD kernels.
//!
//! The core cannot detect features without `std`; this switches its AVX2
//! kernels on once when the CPU has AVX2, FMA and F16C, and its AVX-512
//! tiles when it also has AVX-512 F/BW/VL, and int8 Q8_0 products when it
//! also has AVX-512 VNNI. `MAMBA_SIMD=0` keeps the portable kernels,
//! `MAMBA_SIMD=avx2` stops at AVX2 and `MAMBA_SIMD=avx512` before VNNI (to
//! compare, or to rule a kernel set out).

use std::sync::OnceLock;

static SIMD: OnceLock<&'static str> = OnceLock::new();

/// The kernels that run without a switch: NEON dot products are part of
/// the aarch64 baseline (the core uses them whenever NEON is compiled in).
const BASELINE: &str =
    if cfg!(all(target_arch = "aarch64", target_feature = "neon")) { "neon" } else { "portable" };

/// Enable the best kernels this CPU supports; returns their name. Idempotent.
pub fn init_simd() -> &'static str {
    SIMD.get_or_init(|| {
        let asked = std::env::var("MAMBA_SIMD").map(|v| v.to_ascii_lowercase()).ok();
        let asked_for = |choice: &str| asked.as_deref() == Some(choice);
        if asked_for("0") || asked_for("off") {
            return if BASELINE == "neon" {
                "neon (MAMBA_SIMD=0 has no effect)"
            } else {
                "portable (MAMBA_SIMD=0)"
            };
        }
        #[cfg(target_arch = "x86_64")]
        if !asked_for("avx2")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
        {
            if !asked_for("avx512") && is_x86_feature_detected!("avx512vnni") {
                // SAFETY: all seven features were detected on this CPU just above.
                #[allow(unsafe_code)]
                unsafe {
                    mamba_core::kernels::simd::enable_vnni()
                };
                return "avx512+vnni+avx2+fma+f16c";
            }
            // SAFETY: all six features were detected on this CPU just above.
            #[allow(unsafe_code)]
            unsafe {
                mamba_core::kernels::simd::enable_avx512()
            };
            return "avx512+avx2+fma+f16c";
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: the three features were detected on this CPU just above.
            #[allow(unsafe_code)]
            unsafe {
                mamba_core::kernels::simd::enable_avx2()
            };
            return "avx2+fma+f16c";
        }
        BASELINE
    })
}

/// Run bf16 matrix products with the CPU's BF16 dot-product instruction
/// (`vdpbf16ps`), over activations rounded to bf16: about twice the
/// products a cycle of f32 FMAs, at bf16's precision (the README reports
/// what it costs in accuracy). Off by default: the default products keep
/// f32 precision. Other weight formats are not affected.
///
/// Fails, saying why, where the AVX-512 tiles are off (`MAMBA_SIMD`, or a
/// CPU without AVX-512) or the CPU lacks AVX-512 BF16.
pub fn enable_bf16_dot() -> crate::error::Result<()> {
    let kernels = init_simd();
    let why = if !mamba_core::kernels::simd::avx512_enabled() {
        format!("the AVX-512 tiles are off (kernels: {kernels})")
    } else {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512bf16") {
            // SAFETY: the tiles are on, so AVX-512 F/BW/VL, AVX2, FMA and
            // F16C were detected; AVX-512 BF16 just above.
            #[allow(unsafe_code)]
            unsafe {
                mamba_core::kernels::simd::enable_bf16_dot()
            };
            return Ok(());
        }
        "this CPU lacks AVX-512 BF16".to_string()
    };
    Err(crate::error::Error::Input(format!(
        "bf16 dot products need the AVX-512 tiles and AVX-512 BF16: {why}"
    )))
}
