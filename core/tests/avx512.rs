//! The AVX-512 matrix-product tiles against the portable reference. A
//! separate test binary: switching SIMD on is process-wide.
#![cfg(target_arch = "x86_64")]

mod common;

use half::{bf16, f16};
use mamba_core::kernels::{dot, dot_portable, linear, linear_strided, simd};
use mamba_core::{Tensor, WData};

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.731).sin() * 2.0).collect()
}

/// `out[t, o]` for features `f0..f1` of a `[rows, n_out]` product.
fn product(x: &[f32], rows: usize, w: &Tensor<'_>, b: Option<&Tensor<'_>>, f: (usize, usize)) -> Vec<f32> {
    let n = w.rows;
    let mut out = vec![f32::NAN; rows * n];
    linear(x, rows, w, b, f, |t, o, v| out[t * n + o..t * n + o + v.len()].copy_from_slice(v));
    out
}

#[test]
fn tiles_match_portable_and_are_independent_of_the_split() {
    if !common::has_avx512() {
        eprintln!("skipped: this CPU lacks AVX-512 F/BW/VL");
        return;
    }
    // SAFETY: checked just above.
    #[allow(unsafe_code)]
    unsafe {
        simd::enable_avx512()
    };
    assert!(simd::avx512_enabled());
    // Lengths around the 16- and 32-element blocks, and model widths; 600
    // features make several panels (at most 255 rows each).
    let shapes = [1, 5, 15, 16, 17, 31, 32, 33, 47, 48, 100, 200, 768].map(|k| (k, 11));
    for (k, n_out) in shapes.into_iter().chain([(32, 600), (768, 600)]) {
        let w32 = data(n_out * k, 0.5);
        let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
        let bias = data(n_out, 9.0);
        let bias = Tensor::vector_f32(&bias);
        let rows = 9;
        let x = data(rows * k, 3.3);
        for wd in [WData::F32(&w32), WData::BF16(&wb), WData::F16(&wh)] {
            let w = Tensor::new(wd, n_out, k, "w").unwrap();
            let whole = product(&x, rows, &w, Some(&bias), (0, n_out));
            for t in 0..rows {
                for o in 0..n_out {
                    let xr = &x[t * k..(t + 1) * k];
                    let want = dot_portable(w.row(o), xr) + bias.data.get(o);
                    let got = whole[t * n_out + o];
                    let tol = 1e-5 * (k as f32).sqrt() * 4.0;
                    assert!((got - want).abs() <= tol, "{:?} k={k} t={t} o={o}: {got} vs {want}", wd.dtype());
                    // A lone dot product sums in the tiles' order.
                    assert_eq!((dot(w.row(o), xr) + bias.data.get(o)).to_bits(), got.to_bits());
                }
            }
            // Any split of tokens or features gives the same bits.
            for r in 1..=rows {
                for t0 in [0, rows - r] {
                    let part = product(&x[t0 * k..(t0 + r) * k], r, &w, Some(&bias), (0, n_out));
                    for t in 0..r {
                        assert_eq!(
                            &part[t * n_out..(t + 1) * n_out],
                            &whole[(t0 + t) * n_out..(t0 + t + 1) * n_out],
                            "{:?} k={k}: {r} rows from {t0}",
                            wd.dtype()
                        );
                    }
                }
            }
            // Rows read in place from a wider buffer (dt_proj's columns of
            // x_proj's output) give the same bits as packed rows.
            let stride = k + 5;
            let mut wide = vec![f32::NAN; rows * stride];
            for t in 0..rows {
                wide[t * stride..t * stride + k].copy_from_slice(&x[t * k..(t + 1) * k]);
            }
            let mut strided = vec![f32::NAN; rows * n_out];
            linear_strided((&wide, stride), rows, &w, Some(&bias), (0, n_out), |t, o, v| {
                strided[t * n_out + o..t * n_out + o + v.len()].copy_from_slice(v)
            });
            assert_eq!(common::bits(&strided), common::bits(&whole), "{:?} k={k}: strided rows", wd.dtype());
            for (f0, f1) in [(0, 1), (1, 5), (4, 11), (3, 10), (7, n_out - 3)] {
                let part = product(&x, rows, &w, Some(&bias), (f0, f1));
                for t in 0..rows {
                    for o in f0..f1 {
                        assert_eq!(part[t * n_out + o].to_bits(), whole[t * n_out + o].to_bits());
                    }
                }
                // One to four tokens stream the range's two halves side by
                // side (an odd count leaves a row after them), where the
                // format streams that many: the same bits.
                for r in 1..=4 {
                    let part = product(&x[..r * k], r, &w, Some(&bias), (f0, f1));
                    for t in 0..r {
                        for o in f0..f1 {
                            assert_eq!(
                                part[t * n_out + o].to_bits(),
                                whole[t * n_out + o].to_bits(),
                                "{:?} k={k}: {r} tokens, {f0}..{f1}, token {t} feature {o}",
                                wd.dtype()
                            );
                        }
                    }
                }
            }
        }
    }
    simd::disable_avx512();
    assert!(!simd::avx512_enabled());
}
