//! What the SIMD test binaries share. Each is a binary of its own: switching
//! SIMD on is process-wide.
// Each binary uses part of this module.
#![allow(dead_code)]

/// Run `check(mode)` with the kernels every mode this CPU has would pick:
/// the default (portable, or NEON on aarch64), then on x86-64 AVX2 and
/// AVX-512 (with VNNI where the CPU has it, as the runtime picks) when
/// detected, printing why a mode is skipped. Leaves AVX-512 and VNNI off.
pub fn in_every_mode(mut check: impl FnMut(&str)) {
    check(if cfg!(target_arch = "aarch64") { "neon" } else { "portable" });
    #[cfg(target_arch = "x86_64")]
    {
        use mamba_core::kernels::simd;
        if !has_avx2() {
            eprintln!("skipped the AVX2 and AVX-512 modes: this CPU lacks AVX2/FMA/F16C");
            return;
        }
        // SAFETY: has_avx2 checked the features just above.
        #[allow(unsafe_code)]
        unsafe {
            simd::enable_avx2()
        };
        check("avx2");
        if !has_avx512() {
            eprintln!("skipped the AVX-512 mode: this CPU lacks AVX-512 F/BW/VL");
            return;
        }
        // SAFETY: has_avx512 (and has_vnni) checked the features just above.
        #[allow(unsafe_code)]
        unsafe {
            if has_vnni() {
                simd::enable_vnni()
            } else {
                eprintln!("AVX-512 mode without VNNI: this CPU lacks it (Q8_0 products dequantize)");
                simd::enable_avx512()
            }
        };
        check("avx512");
        simd::disable_avx512();
    }
}

/// Whether the CPU has what `simd::enable_avx2` needs: AVX2, FMA, F16C.
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

/// Whether the CPU has what `simd::enable_avx512` needs: AVX-512 F/BW/VL and [`has_avx2`]'s.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && has_avx2()
}

/// Whether the CPU also has AVX-512 VNNI (`simd::enable_vnni`).
#[cfg(target_arch = "x86_64")]
pub fn has_vnni() -> bool {
    has_avx512() && std::is_x86_feature_detected!("avx512vnni")
}

/// Deterministic pseudo-random values in `[lo, hi]` (xorshift from `seed`).
pub fn values(n: usize, seed: u32, lo: f32, hi: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(7);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            lo + (x as f32 / u32::MAX as f32) * (hi - lo)
        })
        .collect()
}

/// The bit patterns of `v`, to compare results exactly.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// [`in_every_mode`], requiring every mode's `run(mode)` to equal the first's.
pub fn same_in_every_mode<T: PartialEq>(mut run: impl FnMut(&str) -> T) {
    let mut first: Option<T> = None;
    in_every_mode(|mode| {
        let got = run(mode);
        match &first {
            Some(want) => assert!(&got == want, "{mode} differs from the first mode"),
            None => first = Some(got),
        }
    });
}

/// A NaN or an infinity put at a few places of the row `x`, the row alone
/// and repeated over four: `product(rows of x, rows)` gives no finite value,
/// as an f32 product would not.
pub fn non_finite_activations_stay_non_finite(
    what: &str,
    x: &[f32],
    product: impl Fn(&[f32], usize) -> Vec<f32>,
) {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for at in [0, 33, x.len() - 1] {
            let mut xb = x.to_vec();
            xb[at] = bad;
            for rows in [1, 4] {
                let xr: Vec<f32> = xb.iter().cycle().take(rows * x.len()).copied().collect();
                let v = product(&xr, rows);
                assert!(v.iter().all(|r| !r.is_finite()), "{what}: {bad} at {at}, {rows} rows: {v:?}");
            }
        }
    }
}

/// `w`'s product over the `rows` rows of `x` (`k = w.cols` each), read in
/// place from a buffer whose rows are `stride` apart (NaN between them).
pub fn strided_product(x: &[f32], rows: usize, w: &mamba_core::Tensor<'_>, stride: usize) -> Vec<f32> {
    let (k, n) = (w.cols, w.rows);
    let mut wide = vec![f32::NAN; rows * stride];
    for t in 0..rows {
        wide[t * stride..t * stride + k].copy_from_slice(&x[t * k..(t + 1) * k]);
    }
    let mut out = vec![f32::NAN; rows * n];
    mamba_core::kernels::linear_strided((&wide, stride), rows, w, None, (0, n), |t, o, v| {
        out[t * n + o..t * n + o + v.len()].copy_from_slice(v)
    });
    out
}
