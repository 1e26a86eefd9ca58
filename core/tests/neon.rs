//! The aarch64 NEON dot products against the portable reference. Run on an
//! x86-64 host under user-mode QEMU (see `.ci/run`).
#![cfg(all(target_arch = "aarch64", target_feature = "neon"))]

use half::{bf16, f16};
use mamba_core::kernels::{dot, dot4, dot_portable, linear, neon};
use mamba_core::{Tensor, WData, Q8_BLOCK};

const LENGTHS: [usize; 13] = [1, 7, 8, 15, 16, 17, 31, 32, 33, 64, 100, 768, 1536];

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| ((i as f32 + seed) * 0.731).sin() * 2.0).collect()
}

/// Q8_0 quants for `n` weights (the last block may be partial) and their
/// dequantized f32 values.
fn q8(n: usize) -> (Vec<i8>, Vec<f16>, Vec<f32>) {
    let q: Vec<i8> = (0..n).map(|i| (((i * 37 + 11) % 255) as i32 - 127) as i8).collect();
    let d: Vec<f16> = (0..n.div_ceil(Q8_BLOCK))
        .map(|b| f16::from_f32(0.0123 * (1.0 + (b % 7) as f32) / (1 + b % 3) as f32))
        .collect();
    let deq = q.iter().enumerate().map(|(i, &v)| v as f32 * d[i / Q8_BLOCK].to_f32()).collect();
    (q, d, deq)
}

fn xs(n: usize) -> Vec<Vec<f32>> {
    (0..4).map(|k| data(n, k as f32 * 3.1)).collect()
}

#[test]
fn neon_dot_matches_portable_and_dot4_matches_dot_for_every_dtype_and_length() {
    for n in LENGTHS {
        let w = data(n, 0.5);
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let (q, d, _) = q8(n);
        let xs = xs(n);
        let x4 = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
        for wd in [WData::F32(&w), WData::BF16(&wb), WData::F16(&wh), WData::Q8_0 { q: &q, d: &d }] {
            let four = dot4(wd, x4);
            assert_eq!(four.map(f32::to_bits), neon::dot4(wd, x4).map(f32::to_bits), "dispatch");
            for (k, x) in xs.iter().enumerate() {
                let (s, p) = (dot(wd, x), dot_portable(wd, x));
                assert_eq!(s.to_bits(), neon::dot(wd, x).to_bits(), "dispatch");
                let tol = 1e-5 * (n as f32).sqrt() * 4.0;
                assert!((s - p).abs() <= tol, "{:?} n={n}: neon {s} portable {p}", wd.dtype());
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

#[test]
fn q8_dot_and_dot4_equal_the_dequantized_f32_bitwise() {
    for n in LENGTHS {
        let (q, d, deq) = q8(n);
        let xs = xs(n);
        let x4 = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
        let (wq, wf) = (WData::Q8_0 { q: &q, d: &d }, WData::F32(&deq));
        for x in &xs {
            assert_eq!(dot(wq, x).to_bits(), dot(wf, x).to_bits(), "dot n={n}");
        }
        assert_eq!(dot4(wq, x4).map(f32::to_bits), dot4(wf, x4).map(f32::to_bits), "dot4 n={n}");
    }
}

#[test]
fn q8_linear_equals_the_dequantized_f32_linear_bitwise() {
    let product = |x: &[f32], rows: usize, w: &Tensor<'_>| {
        let n = w.rows;
        let mut out = vec![f32::NAN; rows * n];
        linear(x, rows, w, None, (0, n), |t, o, v| out[t * n + o..t * n + o + v.len()].copy_from_slice(v));
        out
    };
    for k in [32, 64, 96, 768] {
        let n_out = 5;
        let (q, d, deq) = q8(n_out * k);
        let wq = Tensor::new(WData::Q8_0 { q: &q, d: &d }, n_out, k, "wq").unwrap();
        let wf = Tensor::new(WData::F32(&deq), n_out, k, "wf").unwrap();
        // 1..3 rows use `dot` only, 9 rows two `dot4` blocks and one `dot`.
        for rows in [1, 3, 4, 9] {
            let x = data(rows * k, rows as f32);
            let (a, b) = (product(&x, rows, &wq), product(&x, rows, &wf));
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "k={k} rows={rows}"
            );
            // And a token's outputs do not depend on its block of four.
            for t in 0..rows {
                for o in 0..n_out {
                    let want = dot(wq.row(o), &x[t * k..(t + 1) * k]);
                    assert_eq!(a[t * n_out + o].to_bits(), want.to_bits(), "k={k} t={t} o={o}");
                }
            }
        }
    }
}

#[test]
fn kernels_read_only_the_shorter_operand() {
    let w = data(40, 0.5);
    let x = data(37, 1.5);
    let (q, d, _) = q8(64);
    for wd in [WData::F32(&w), WData::Q8_0 { q: &q, d: &d }] {
        let want = dot(wd.slice(0, 37.min(wd.len())), &x);
        assert_eq!(dot(wd, &x).to_bits(), want.to_bits());
        let short = &x[..20];
        assert_eq!(dot4(wd, [&x, short, &x, &x])[1].to_bits(), dot(wd, short).to_bits());
    }
    // Quants past the last scale are ignored, as in the portable code.
    let x = data(64, 0.0);
    let one_block = dot(WData::Q8_0 { q: &q[..32], d: &d[..1] }, &x);
    assert_eq!(dot(WData::Q8_0 { q: &q, d: &d[..1] }, &x).to_bits(), one_block.to_bits());
}

#[test]
fn f16_widening_equals_half_on_every_bit_pattern() {
    for b in (0..=u16::MAX).step_by(4) {
        let h: [f16; 4] = core::array::from_fn(|j| f16::from_bits(b + j as u16));
        let got = neon::widen_f16x4(h);
        for j in 0..4 {
            let want = h[j].to_f32();
            assert_eq!(got[j].to_bits(), want.to_bits(), "f16 bits {:#06x}", h[j].to_bits());
        }
    }
}
