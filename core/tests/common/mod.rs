//! What the SIMD test binaries share. Each is a binary of its own: switching
//! SIMD on is process-wide.

/// Run `check(mode)` with the kernels every mode this CPU has would pick:
/// the default (portable, or NEON on aarch64), then on x86-64 AVX2 and
/// AVX-512 when detected, printing why a mode is skipped. Leaves AVX-512 off.
pub fn in_every_mode(mut check: impl FnMut(&str)) {
    check(if cfg!(target_arch = "aarch64") { "neon" } else { "portable" });
    #[cfg(target_arch = "x86_64")]
    {
        use mamba_core::kernels::simd;
        let avx2 = std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c");
        if !avx2 {
            eprintln!("skipped the AVX2 and AVX-512 modes: this CPU lacks AVX2/FMA/F16C");
            return;
        }
        // SAFETY: checked just above.
        #[allow(unsafe_code)]
        unsafe {
            simd::enable_avx2()
        };
        check("avx2");
        let avx512 = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl");
        if !avx512 {
            eprintln!("skipped the AVX-512 mode: this CPU lacks AVX-512 F/BW/VL");
            return;
        }
        // SAFETY: checked just above.
        #[allow(unsafe_code)]
        unsafe {
            simd::enable_avx512()
        };
        check("avx512");
        simd::disable_avx512();
    }
}
