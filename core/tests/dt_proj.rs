//! dt_proj with its weight transposed in blocks of 64 channels: in AVX-512
//! mode it is one fused multiply-add chain a channel (checked bit for bit
//! against a scalar model of it), in other modes the transposed copy is
//! ignored (the dot products' bits); in every mode prefill = step with
//! channels cut anywhere, and the values are those of the definition. A
//! separate test binary: switching SIMD on is process-wide.

mod common;

use common::{bits, values};

use half::{bf16, f16};
use mamba_core::kernels::{dt_avx512, dt_proj_softplus, softplus};
use mamba_core::{Tensor, WData};

/// `w` (`[di, r]`) in the blocked layout, zeros in a partial last block.
fn blocked<T: Copy + Default>(w: &[T], di: usize, r: usize) -> Vec<T> {
    let mut out = vec![T::default(); dt_avx512::blocked_rows(di, r) * dt_avx512::BLOCK];
    dt_avx512::to_blocked(w, di, r, &mut out);
    out
}

/// dt for `rows` tokens, all channels at once, then token by token with
/// the channels in three pieces; both with the transposed weight, and the
/// whole once without it.
fn run(w: WData<'_>, wt: WData<'_>, di: usize, r: usize, rows: usize, stride: usize) -> [Vec<f32>; 3] {
    let dbc = values(rows * stride, 3, -1.5, 1.5);
    let bias = values(di, 4, -4.0, 1.0);
    let (bias, w) = (Tensor::vector_f32(&bias), Tensor::new(w, di, r, "w").unwrap());
    let wt = Tensor::new(wt, dt_avx512::blocked_rows(di, r), dt_avx512::BLOCK, "wt").unwrap();
    let mut whole = vec![f32::NAN; rows * di];
    dt_proj_softplus(&dbc, stride, rows, &w, Some(&wt), &bias, (0, di), &mut whole);
    let mut steps = vec![f32::NAN; rows * di];
    let cuts = [0, di / 3, di / 3 + 17.min(di - di / 3), di];
    for t in 0..rows {
        for c in cuts.windows(2) {
            let o = &mut steps[t * di + c[0]..t * di + c[1]];
            dt_proj_softplus(&dbc[t * stride..], stride, 1, &w, Some(&wt), &bias, (c[0], c[1]), o);
        }
    }
    let mut plain = vec![f32::NAN; rows * di];
    dt_proj_softplus(&dbc, stride, rows, &w, None, &bias, (0, di), &mut plain);

    // Every mode: the definition, within rounding.
    for t in 0..rows {
        for d in 0..di {
            let x = &dbc[t * stride..t * stride + r];
            let dot: f64 = (0..r).map(|k| f64::from(w.data.get(d * r + k)) * f64::from(x[k])).sum();
            let z = dot + f64::from(bias.data.get(d));
            let want = if z > 20.0 { z } else { z.exp().ln_1p() };
            let got = f64::from(whole[t * di + d]);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "di {di} r {r} t {t} d {d}: {got} vs {want}"
            );
        }
    }
    [whole, steps, plain]
}

/// The AVX-512 kernel's arithmetic: `x[k] * w[k]` fused into one chain from 0, then the bias.
fn chain(w: WData<'_>, di: usize, r: usize, rows: usize, stride: usize) -> Vec<f32> {
    let dbc = values(rows * stride, 3, -1.5, 1.5);
    let bias = values(di, 4, -4.0, 1.0);
    let mut out = Vec::new();
    for t in 0..rows {
        for (d, b) in bias.iter().enumerate() {
            let acc = (0..r).fold(0.0f32, |acc, k| dbc[t * stride + k].mul_add(w.get(d * r + k), acc));
            out.push(softplus(acc + b));
        }
    }
    out
}

#[test]
fn transposed_dt_proj_is_one_chain_a_channel_with_avx512_and_ignored_otherwise() {
    // (d_inner, dt_rank, rows): whole and partial blocks of 64, the 130m
    // rank, a rank wider than any published one, a lone token.
    let shapes = [(64, 48, 6), (100, 5, 9), (1536, 48, 5), (37, 160, 4), (200, 1, 1)];
    common::in_every_mode(|mode| {
        for &(di, r, rows) in &shapes {
            let stride = r + 7;
            let w32 = values(di * r, 1, -0.6, 0.6);
            let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let (t32, t16, tb) = (blocked(&w32, di, r), blocked(&w16, di, r), blocked(&wb, di, r));
            let cases = [
                ("f32", WData::F32(&w32), WData::F32(&t32)),
                ("f16", WData::F16(&w16), WData::F16(&t16)),
                ("bf16", WData::BF16(&wb), WData::BF16(&tb)),
            ];
            for (dtype, w, wt) in cases {
                let what = format!("{mode} {dtype} di {di} r {r}");
                let [whole, steps, plain] = run(w, wt, di, r, rows, stride);
                assert_eq!(bits(&whole), bits(&steps), "{what}: prefill vs step");
                if mode == "avx512" {
                    assert_eq!(bits(&whole), bits(&chain(w, di, r, rows, stride)), "{what}: vs the chain");
                } else {
                    assert_eq!(bits(&whole), bits(&plain), "{what}: the transposed copy was read");
                }
            }
        }
    });
}
