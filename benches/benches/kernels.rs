//! The core's kernels at mamba-130m shapes, weights in f32, bf16 and f16.
//!
//! Weights are layer 0 (and the tied head) of a synthetic mamba-130m, so
//! shapes and value ranges are those of the real model. Ids read
//! `kernel/shape/dtype`; throughput is multiply-adds for `linear` and token
//! rows for the others.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use mamba_core::{kernels, DType};
use mamba_runtime::sampling::Rng;
use mamba_runtime::synthetic::{shape, synthetic_model};

/// Tokens of the sequence kernels (a prefill chunk).
const SEQ: usize = 128;

fn activations(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| lo + (hi - lo) * rng.next_f64() as f32).collect()
}

fn bench_kernels(c: &mut Criterion) {
    // The kernels the runtime would pick on this CPU (`MAMBA_SIMD` as there).
    eprintln!("kernels: {}", mamba_runtime::cpu::init_simd());
    let s = shape("mamba-130m").expect("known shape");
    let (dm, di, n, k, r) = (s.d_model, s.d_inner(), 16, 4, s.dt_rank());
    let xp = r + 2 * n;
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::Q8_0] {
        let model = synthetic_model(s, dtype, 0).expect("synthetic model");
        let view = model.view().expect("view");
        let m = view.model();
        let l = &m.layers[0];
        let dt = dtype.name();

        let mut g = c.benchmark_group("linear");
        // The lm head in f16 takes tens of milliseconds: the same few iterations per sample.
        g.sampling_mode(SamplingMode::Flat);
        for (name, w, rows) in [
            ("in_proj", &l.in_proj, 1),
            ("in_proj", &l.in_proj, 32),
            ("out_proj", &l.out_proj, 1),
            ("dt_proj", &l.dt_proj, 1),
            ("dt_proj", &l.dt_proj, 32),
            ("lm_head", m.head(), 1),
        ] {
            let x = activations(rows * w.cols, 1, -1.0, 1.0);
            let mut out = vec![0.0f32; rows * w.rows];
            g.throughput(Throughput::Elements((rows * w.rows * w.cols) as u64));
            let id = BenchmarkId::new(format!("{name}_{}x{}/rows{rows}", w.rows, w.cols), dt);
            g.bench_function(id, |b| {
                b.iter(|| {
                    let n = w.rows;
                    kernels::linear(black_box(&x), rows, w, None, (0, n), |t, o, v| {
                        out[t * n + o..t * n + o + v.len()].copy_from_slice(v)
                    });
                    black_box(&out);
                })
            });
        }
        g.finish();
        // Q8_0 is for the matrices only: the rest of its model is f32, benched above.
        if dtype == DType::Q8_0 {
            continue;
        }

        let mut g = c.benchmark_group("conv1d_seq");
        g.throughput(Throughput::Elements(SEQ as u64));
        let xz = activations(SEQ * 2 * di, 2, -1.0, 1.0);
        let mut state = vec![0.0f32; di * k];
        let mut out = vec![0.0f32; SEQ * di];
        g.bench_function(BenchmarkId::new(format!("{SEQ}x{di}_k{k}"), dt), |b| {
            b.iter(|| {
                let bias = l.conv_b.map(|t| t.data);
                kernels::conv1d_seq(&xz, 2 * di, SEQ, di, k, l.conv_w.data, bias, &mut state, &mut out);
                black_box(&out);
            })
        });
        g.finish();
        let mut g = c.benchmark_group("conv1d_step");
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new(format!("{di}_k{k}"), dt), |b| {
            b.iter(|| {
                let bias = l.conv_b.map(|t| t.data);
                kernels::conv1d_step(&xz[..di], k, l.conv_w.data, bias, 0, &mut state, &mut out[..di]);
                black_box(&out);
            })
        });
        g.finish();

        // A is f32 at run time whatever the checkpoint's dtype; D keeps `dtype`.
        let x = activations(SEQ * di, 3, -1.0, 1.0);
        let dts = activations(SEQ * di, 4, 1e-3, 1e-1);
        let dbc = activations(SEQ * xp, 5, -1.0, 1.0);
        let mut h = vec![0.0f32; di * n];
        let mut y = vec![0.0f32; SEQ * di];
        let rows = |len: usize| kernels::ScanRows {
            x: &x[..len * di],
            dt: &dts[..len * di],
            dbc: &dbc[..len * xp],
            xz: &xz[..len * 2 * di],
            d_inner: di,
            d_state: n,
            dt_rank: r,
        };
        let mut g = c.benchmark_group("selective_scan_seq");
        g.sampling_mode(SamplingMode::Flat);
        g.throughput(Throughput::Elements(SEQ as u64));
        g.bench_function(BenchmarkId::new(format!("{SEQ}x{di}_n{n}"), dt), |b| {
            b.iter(|| {
                kernels::selective_scan_seq(rows(SEQ), SEQ, l.a.data, l.d.data, &mut h, &mut y);
                black_box(&y);
            })
        });
        g.finish();
        let mut g = c.benchmark_group("selective_scan_step");
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new(format!("{di}_n{n}"), dt), |b| {
            b.iter(|| {
                kernels::selective_scan_step(rows(1), l.a.data, l.d.data, 0, &mut h, &mut y[..di]);
                black_box(&y);
            })
        });
        g.finish();

        let mut g = c.benchmark_group("rms_norm");
        g.throughput(Throughput::Elements(SEQ as u64));
        let xs = activations(SEQ * dm, 6, -2.0, 2.0);
        let mut out = vec![0.0f32; SEQ * dm];
        g.bench_function(BenchmarkId::new(format!("{SEQ}x{dm}"), dt), |b| {
            b.iter(|| {
                kernels::rms_norm(black_box(&xs), l.norm.data, 1e-5, &mut out);
                black_box(&out);
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench_kernels
}
criterion_main!(benches);
