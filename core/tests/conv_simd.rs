//! The causal conv gives the same bits in every SIMD mode (the AVX-512
//! width-4 block, the compiler-vectorised blocks, portable code), in the
//! prefill and in the step, and as the definition computes them. A separate
//! test binary: switching SIMD on is process-wide.

mod common;

use common::{bits, values};

use half::bf16;
use mamba_core::kernels::{conv1d_seq, conv1d_step, silu};
use mamba_core::WData;

/// (prefill out, prefill final state, step out, step final state) as bits,
/// each checked against the definition on the way.
fn run(di: usize, k: usize, len: usize, w: WData<'_>, bias: Option<WData<'_>>) -> [Vec<u32>; 4] {
    let xz = values(len * 2 * di, 1, -3.0, 3.0);
    let s0 = values(di * k, 2, -1.0, 1.0);
    let (mut sp, mut out) = (s0.clone(), vec![0.0f32; len * di]);
    conv1d_seq(&xz, 2 * di, len, di, k, w, bias, &mut sp, &mut out);

    // The definition: the bias, then tap c times the input k - 1 - c tokens back.
    let mut hist: Vec<Vec<f32>> = (0..di).map(|d| s0[d * k..(d + 1) * k].to_vec()).collect();
    for t in 0..len {
        for d in 0..di {
            hist[d].remove(0);
            hist[d].push(xz[t * 2 * di + d]);
            let mut acc = bias.map_or(0.0, |b| b.get(d));
            for (c, &v) in hist[d].iter().enumerate() {
                acc += w.get(d * k + c) * v;
            }
            let got = out[t * di + d];
            assert_eq!(silu(acc).to_bits(), got.to_bits(), "di {di} k {k}: token {t} channel {d}");
        }
    }

    let (mut ss, mut os) = (s0, vec![0.0f32; len * di]);
    for t in 0..len {
        // Channels in two pieces, the second from an offset, as threads split them.
        let cut = di / 2 + 1;
        let x = &xz[t * 2 * di..t * 2 * di + di];
        let (st0, st1) = ss.split_at_mut(cut * k);
        let (o0, o1) = os[t * di..(t + 1) * di].split_at_mut(cut);
        conv1d_step(x, k, w, bias, 0, st0, o0);
        conv1d_step(x, k, w, bias, cut, st1, o1);
    }
    [bits(&out), bits(&sp), bits(&os), bits(&ss)]
}

#[test]
fn conv_bits_are_the_same_in_every_mode_in_the_step_and_as_defined() {
    // (d_inner, d_conv, tokens): whole blocks of 16 (and 16 + 1 after the
    // step's cut), a partial block, other widths.
    let shapes = [(32, 4, 9), (31, 4, 5), (64, 4, 3), (20, 3, 4), (18, 2, 6), (17, 5, 3), (40, 1, 2)];
    common::same_in_every_mode(|mode| {
        let mut got = vec![];
        for &(di, k, len) in &shapes {
            let w = values(di * k, 3, -0.8, 0.8);
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let b = values(di, 4, -0.5, 0.5);
            for (wd, bias) in [(WData::F32(&w), Some(WData::F32(&b))), (WData::BF16(&wb), None)] {
                let r = run(di, k, len, wd, bias);
                let s = (di, k, len, wd.dtype());
                assert_eq!(r[0], r[2], "{mode}: prefill out vs step {s:?}");
                assert_eq!(r[1], r[3], "{mode}: prefill state vs step {s:?}");
                got.push(r);
            }
        }
        got
    });
}
