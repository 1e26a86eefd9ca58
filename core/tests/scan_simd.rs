//! The prefill scan and the decode step give the same bits in every SIMD
//! mode (the AVX-512 register block, the compiler-vectorised AVX2 and
//! portable code). The modes agree bit for bit, except that AVX-512 fuses
//! the 16-state scan's multiply-adds: there it is within a few ulps of the
//! portable scan. A separate test binary: switching SIMD on is process-wide.

mod common;

use common::{bits, values};

use half::bf16;
use mamba_core::kernels::{selective_scan_seq, selective_scan_step, ScanRows};
use mamba_core::WData;

/// (prefill y, prefill final state, step y, step final state); A and D
/// stored in bf16 when `half` (the step widens them a block at a time).
fn run(n_s: usize, di: usize, len: usize, half: bool) -> [Vec<f32>; 4] {
    let (r, xp) = (3, 3 + 2 * n_s);
    let (x, dt) = (values(len * di, 1, -2.0, 2.0), values(len * di, 2, 0.001, 0.6));
    let (dbc, mut xz) = (values(len * xp, 3, -1.0, 1.0), values(len * 2 * di, 4, -3.0, 3.0));
    // The gate at its edges in the first token: zeros of both signs, past
    // the exponential's clamps, tiny.
    for (z, v) in xz[di..2 * di].iter_mut().zip([0.0, -0.0, 100.0, -100.0, -95.0, 1e-30]) {
        *z = v;
    }
    let (a, d, h0) =
        (values(di * n_s, 5, -6.0, -0.1), values(di, 6, 0.5, 1.5), values(di * n_s, 7, -1.0, 1.0));
    let rows = ScanRows { x: &x, dt: &dt, dbc: &dbc, xz: &xz, d_inner: di, d_state: n_s, dt_rank: r };
    let (ah, dh): (Vec<bf16>, Vec<bf16>) =
        (a.iter().map(|&v| bf16::from_f32(v)).collect(), d.iter().map(|&v| bf16::from_f32(v)).collect());
    let (aw, dw) = if half { (WData::BF16(&ah), WData::BF16(&dh)) } else { (WData::F32(&a), WData::F32(&d)) };
    let (mut hp, mut y) = (h0.clone(), vec![0.0f32; len * di]);
    selective_scan_seq(rows, len, aw, dw, &mut hp, &mut y);
    let (mut hs, mut ys) = (h0, vec![0.0f32; len * di]);
    for t in 0..len {
        let one = ScanRows {
            x: &x[t * di..(t + 1) * di],
            dt: &dt[t * di..(t + 1) * di],
            dbc: &dbc[t * xp..(t + 1) * xp],
            xz: &xz[t * 2 * di..(t + 1) * 2 * di],
            ..rows
        };
        // Channels in two pieces, the second from an offset, as threads split them.
        let cut = di / 2;
        let (s0, s1) = hs.split_at_mut(cut * n_s);
        let (y0, y1) = ys[t * di..(t + 1) * di].split_at_mut(cut);
        selective_scan_step(one, aw, dw, 0, s0, y0);
        selective_scan_step(one, aw, dw, cut, s1, y1);
    }
    [y, hp, ys, hs]
}

#[test]
fn scan_prefill_equals_step_in_every_mode_and_the_modes_agree() {
    // (d_state, d_inner, tokens, A and D in bf16): whole blocks of 16, a
    // partial block, a long run, other d_state.
    let shapes = [
        (16, 16, 9, false),
        (16, 37, 5, false),
        (16, 37, 5, true),
        (16, 64, 3, false),
        (16, 21, 300, false),
        (8, 20, 4, false),
        (1, 3, 2, false),
        (4, 17, 3, true),
        (17, 5, 3, false),
    ];
    let mut first: Option<Vec<[Vec<f32>; 4]>> = None;
    common::in_every_mode(|mode| {
        let got: Vec<[Vec<f32>; 4]> = shapes.iter().map(|&(n, d, l, h)| run(n, d, l, h)).collect();
        for (r, s) in got.iter().zip(&shapes) {
            assert_eq!(bits(&r[0]), bits(&r[2]), "{mode}: prefill y vs step {s:?}");
            assert_eq!(bits(&r[1]), bits(&r[3]), "{mode}: prefill state vs step {s:?}");
        }
        let Some(want) = &first else {
            first = Some(got);
            return;
        };
        for ((r, w), s) in got.iter().zip(want).zip(&shapes) {
            let fused = mode == "avx512" && s.0 == 16;
            for (g, w) in r.iter().zip(w) {
                if fused {
                    let worst =
                        g.iter().zip(w).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max);
                    assert!(worst < 1e-5, "{mode}: {s:?} is {worst} from the first mode");
                } else {
                    assert_eq!(bits(g), bits(w), "{mode}: {s:?} differs from the first mode");
                }
            }
        }
    });
}
