//! The x86-64 SIMD kernels against the portable reference. A separate test
//! binary: switching SIMD on is process-wide.
#![cfg(target_arch = "x86_64")]

mod common;

use half::{bf16, f16};
use mamba_core::kernels::{dot, dot4, dot_portable, simd};
use mamba_core::WData;

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.731).sin() * 2.0).collect()
}

#[test]
fn simd_dot_matches_portable_for_every_dtype_and_length() {
    if !common::has_avx2() {
        eprintln!("skipped: this CPU lacks AVX2/FMA/F16C");
        return;
    }
    // SAFETY: checked just above.
    #[allow(unsafe_code)]
    unsafe {
        simd::enable_avx2()
    };
    assert!(simd::avx2_enabled());
    for n in [1, 7, 8, 15, 16, 17, 31, 33, 64, 100, 768, 1536] {
        let w = data(n, 0.5);
        let xs: Vec<Vec<f32>> = (0..4).map(|k| data(n, k as f32 * 3.1)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        for wd in [WData::F32(&w), WData::BF16(&wb), WData::F16(&wh)] {
            let four = dot4(wd, [&xs[0], &xs[1], &xs[2], &xs[3]]);
            for (k, x) in xs.iter().enumerate() {
                let (s, p) = (dot(wd, x), dot_portable(wd, x));
                let tol = 1e-5 * (n as f32).sqrt() * 4.0;
                assert!((s - p).abs() <= tol, "{:?} n={n}: simd {s} portable {p}", wd.dtype());
                assert_eq!(
                    four[k].to_bits(),
                    s.to_bits(),
                    "{:?} n={n}: dot4 row {k} differs from dot",
                    wd.dtype()
                );
            }
        }
    }
}
