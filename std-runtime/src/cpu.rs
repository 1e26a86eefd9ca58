//! CPU feature detection for the core's SIMD kernels.
//!
//! The core cannot detect features without `std`; this switches its AVX2
//! kernels on once when the CPU has AVX2, FMA and F16C. `MAMBA_SIMD=0`
//! keeps the portable kernels (to compare, or to rule SIMD out).

use std::sync::OnceLock;

static SIMD: OnceLock<&'static str> = OnceLock::new();

/// Enable the best kernels this CPU supports; returns their name. Idempotent.
pub fn init_simd() -> &'static str {
    SIMD.get_or_init(|| {
        if std::env::var("MAMBA_SIMD").is_ok_and(|v| v == "0" || v.eq_ignore_ascii_case("off")) {
            return "portable (MAMBA_SIMD=0)";
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
        "portable"
    })
}
