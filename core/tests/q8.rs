//! Q8_0 weights: every kernel but AVX-512 VNNI's gives the bits of the f32
//! product over the dequantized weights (each `q * d` is exact in f32);
//! VNNI's sums in integers over int8 activations, bit for bit as its
//! scalar model here and within the rounding bound of the exact product.
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

/// The AVX-512 VNNI Q8_0 arithmetic, one scalar step at a time: `x`
/// quantized to int8 per block of 32 (scale `max |x| / 127`, ties to even),
/// a block's products summed exactly four to a lane into 8 lanes, each
/// lane times `d_w * d_x` added by one FMA into the even or the odd blocks'
/// chain, the chains added (each plus +0, as the tiles' second register is
/// zero) and the lanes summed in halves.
fn int8_reference(q: &[i8], d: &[f16], x: &[f32]) -> f32 {
    let mut acc = [[0.0f32; 8]; 2];
    for (b, xb) in x[..q.len()].chunks_exact(Q8_BLOCK).enumerate() {
        let m = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let (inv, dx) = if m < 1e-30 { (0.0, 0.0) } else { (127.0 / m, m / 127.0) };
        let xq: Vec<i32> = xb.iter().map(|v| ((v * inv).round_ties_even() as i32).clamp(-128, 127)).collect();
        let s = d[b].to_f32() * dx;
        let qb = &q[b * Q8_BLOCK..];
        for (j, a) in acc[b % 2].iter_mut().enumerate() {
            let p: i32 = (4 * j..4 * j + 4).map(|i| qb[i] as i32 * xq[i]).sum();
            *a = (p as f32).mul_add(s, *a);
        }
    }
    let mut v: Vec<f32> = (0..8).map(|j| (acc[0][j] + 0.0) + (acc[1][j] + 0.0)).collect();
    while v.len() > 1 {
        let h = v.len() / 2;
        v = (0..h).map(|j| v[j] + v[j + h]).collect();
    }
    v[0]
}

/// How far rounding the activations may move a Q8_0 product: half a step of
/// each block's largest |x| / 127 per weight, plus f32 rounding.
fn int8_bound(w: &[f32], x: &[f32]) -> f64 {
    let mut bound = 0.0f64;
    for (wb, xb) in w.chunks_exact(Q8_BLOCK).zip(x.chunks_exact(Q8_BLOCK)) {
        let m = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        bound += wb.iter().map(|&v| v.abs() as f64).sum::<f64>() * m / 254.0;
    }
    bound + 1e-6 * w.iter().zip(x).map(|(a, b)| (a * b).abs() as f64).sum::<f64>()
}

fn check_mode(mode: &str) {
    // AVX-512 with VNNI sums Q8_0 blocks in integers over int8 activations;
    // the other modes (AVX-512 without VNNI too) multiply dequantized
    // weights, exactly.
    let ints = mode == "avx512" && mamba_core::kernels::simd::vnni_enabled();
    // 8224 is wider than the AVX-512 kernels quantize on the stack: dequantized there too.
    for k in [32, 64, 96, 608, 768, 8224] {
        let n_out = 10;
        let (q, d) = q8(n_out * k);
        let deq: Vec<f32> = q.iter().enumerate().map(|(i, &v)| v as f32 * d[i / Q8_BLOCK].to_f32()).collect();
        let wq = Tensor::new(WData::Q8_0 { q: &q, d: &d }, n_out, k, "wq").unwrap();
        let wf = Tensor::new(WData::F32(&deq), n_out, k, "wf").unwrap();
        for (i, v) in deq.iter().enumerate() {
            assert_eq!(wq.data.get(i).to_bits(), v.to_bits());
        }
        let ints = ints && k <= 8192;
        let qrow = |o: usize| (&q[o * k..(o + 1) * k], &d[o * k / Q8_BLOCK..(o + 1) * k / Q8_BLOCK]);
        for rows in [1, 2, 3, 4, 9] {
            let x = data(rows * k, rows as f32);
            // Rows read in place from a wider buffer: the same bits as packed rows.
            let strided = common::strided_product(&x, rows, &wq, k + 32);
            let packed = product(&x, rows, &wq, (0, n_out));
            assert_eq!(common::bits(&strided), common::bits(&packed), "{mode}: k={k} rows={rows} strided");
            for f in [(0, n_out), (3, 7), (2, 9)] {
                let (a, b) = (product(&x, rows, &wq, f), product(&x, rows, &wf, f));
                if !ints {
                    assert_eq!(
                        common::bits(&a),
                        common::bits(&b),
                        "{mode}: k={k} rows={rows} features {f:?}"
                    );
                    continue;
                }
                for t in 0..rows {
                    let xt = &x[t * k..(t + 1) * k];
                    for o in f.0..f.1 {
                        let (got, (qo, dq)) = (a[t * n_out + o], qrow(o));
                        let at = format!("{mode}: k={k} rows={rows} features {f:?}: token {t} feature {o}");
                        assert_eq!(got.to_bits(), int8_reference(qo, dq, xt).to_bits(), "{at}");
                        let wo = &deq[o * k..(o + 1) * k];
                        let exact: f64 = wo.iter().zip(xt).map(|(&w, &v)| w as f64 * v as f64).sum();
                        assert!((got as f64 - exact).abs() <= int8_bound(wo, xt), "{at}: {got} vs {exact}");
                    }
                }
            }
            for o in 0..n_out {
                let xr = &x[..k];
                let want = if ints { int8_reference(qrow(o).0, qrow(o).1, xr) } else { dot(wf.row(o), xr) };
                assert_eq!(dot(wq.row(o), xr).to_bits(), want.to_bits(), "{mode} dot k={k}");
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

/// Zero, tiny and non-finite activations: a NaN or an infinity in a block
/// makes the product non-finite, as in f32, and all-zero blocks add nothing.
fn check_special_activations(mode: &str) {
    let k = 96;
    let (q, d) = q8(2 * k);
    let wq = Tensor::new(WData::Q8_0 { q: &q, d: &d }, 2, k, "wq").unwrap();
    let mut x = data(k, 0.5);
    x[32..64].fill(0.0);
    x[64..96].iter_mut().for_each(|v| *v *= 1e-35);
    let v = product(&x, 1, &wq, (0, 2));
    let w0: Vec<f32> = (0..32).map(|i| q[i] as f32 * d[0].to_f32()).collect();
    let head: f32 = w0.iter().zip(&x).map(|(w, v)| w * v).sum();
    let tol = int8_bound(&w0, &x[..32]) as f32;
    assert!(v[0].is_finite() && (v[0] - head).abs() <= tol, "{mode}: {v:?} vs {head}");
    common::non_finite_activations_stay_non_finite(mode, &x, |xr, rows| product(xr, rows, &wq, (0, 2)));
}

#[test]
fn q8_products_in_every_mode_against_the_dequantized_f32_products() {
    // On aarch64, `dot` and `linear` always run the NEON kernels.
    // One test: switching modes is process-wide.
    common::in_every_mode(|mode| {
        check_mode(mode);
        check_special_activations(mode);
    });
    // AVX-512 without VNNI (as on CPUs that lack it) dequantizes instead.
    #[cfg(target_arch = "x86_64")]
    if common::has_avx512() {
        use mamba_core::kernels::simd;
        // SAFETY: has_avx512 checked the features just above.
        #[allow(unsafe_code)]
        unsafe {
            simd::enable_avx512()
        };
        assert!(!simd::vnni_enabled());
        check_mode("avx512 without vnni");
        check_special_activations("avx512 without vnni");
        simd::disable_avx512();
    }
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
