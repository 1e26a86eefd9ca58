//! Q8_0 weights: every kernel gives the bits of the f32 product over the
//! dequantized weights (each `q * d` is exact in f32), in every SIMD mode.
//! A separate test binary: switching SIMD on is process-wide.

mod common;

use half::f16;
use mamba_core::kernels::{dot, dot4, dot_portable, linear};
use mamba_core::{CoreError, Tensor, WData, Q8_BLOCK};

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.731).sin() * 2.0).collect()
}

/// Quants from a pattern, scales spread over a wide range.
fn q8(n: usize) -> (Vec<i8>, Vec<f16>) {
    let q = (0..n).map(|i| ((i * 37 + 11) % 255) as i32 - 127).map(|v| v as i8).collect();
    let d = (0..n / Q8_BLOCK)
        .map(|b| f16::from_f32(0.0123 * (1.0 + (b % 7) as f32) / (1 + b % 3) as f32))
        .collect();
    (q, d)
}

fn product(x: &[f32], rows: usize, w: &Tensor<'_>, f: (usize, usize)) -> Vec<f32> {
    let n = w.rows;
    let mut out = vec![f32::NAN; rows * n];
    linear(x, rows, w, None, f, |t, o, v| out[t * n + o..t * n + o + v.len()].copy_from_slice(v));
    out
}

fn check_mode(mode: &str) {
    for k in [32, 64, 96, 768] {
        let n_out = 10;
        let (q, d) = q8(n_out * k);
        let deq: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v as f32 * d[i / Q8_BLOCK].to_f32()).collect();
        let wq = Tensor::new(WData::Q8_0 { q: &q, d: &d }, n_out, k, "wq").unwrap();
        let wf = Tensor::new(WData::F32(&deq), n_out, k, "wf").unwrap();
        for (i, v) in deq.iter().enumerate() {
            assert_eq!(wq.data.get(i).to_bits(), v.to_bits());
        }
        for rows in [1, 3, 4, 9] {
            let x = data(rows * k, rows as f32);
            for f in [(0, n_out), (3, 7)] {
                let (a, b) = (product(&x, rows, &wq, f), product(&x, rows, &wf, f));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{mode}: k={k} rows={rows} features {f:?}");
            }
            for o in 0..n_out {
                let xr = &x[..k];
                assert_eq!(dot(wq.row(o), xr).to_bits(), dot(wf.row(o), xr).to_bits(), "{mode} dot k={k}");
                assert_eq!(dot_portable(wq.row(o), xr).to_bits(), dot_portable(wf.row(o), xr).to_bits());
            }
        }
        let xs: Vec<Vec<f32>> = (0..4).map(|j| data(k, j as f32 * 2.7)).collect();
        let x4 = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
        assert_eq!(
            dot4(wq.row(1), x4).map(f32::to_bits),
            dot4(wf.row(1), x4).map(f32::to_bits),
            "{mode} dot4"
        );
    }
}

#[test]
fn q8_products_equal_the_dequantized_f32_products_in_every_mode() {
    // On aarch64, `dot` and `linear` always run the NEON kernels.
    common::in_every_mode(check_mode);
}

#[test]
fn q8_views_need_whole_blocks_and_one_scale_each() {
    let q = [1i8; 96];
    let d = [f16::ONE; 3];
    let e = Tensor::new(WData::Q8_0 { q: &q, d: &d }, 2, 48, "w").unwrap_err();
    assert_eq!(e, CoreError::BadQ8 { what: "w", cols: 48, scales: 3 });
    assert!(e.to_string().contains("whole 32-weight blocks"), "{e}");
    let e = Tensor::new(WData::Q8_0 { q: &q, d: &d[..2] }, 3, 32, "w").unwrap_err();
    assert_eq!(e, CoreError::BadQ8 { what: "w", cols: 32, scales: 2 });
    let e = Tensor::from_q8_bytes(&[0u8; 64], &[0u8; 3], 2, 32, "w").unwrap_err();
    assert!(matches!(e, CoreError::BadWeightBytes { .. }), "{e}");
    // Scales 2-byte aligned (a `[u8; 4]` on the stack need not be).
    let scales = [0u16; 2];
    let t = Tensor::from_q8_bytes(&[0u8; 64], bytemuck::cast_slice(&scales), 2, 32, "w").unwrap();
    assert_eq!((t.nbytes(), t.expect_float("norm").unwrap_err().to_string().contains("q8_0")), (68, true));
}
