//! A whole synthetic mamba-130m through a session: a 128-token prefill and
//! one decode step at batch 1 and 8, f32 and bf16 weights, on the core's
//! `Sequential` backend and on a rayon pool of one thread per physical core.
//!
//! Ids read `phase/dtype/backend`; throughput is tokens (all sequences).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use mamba_core::{DType, Parallel, Sequential};
use mamba_runtime::parallel::RayonParallel;
use mamba_runtime::sampling::Rng;
use mamba_runtime::session::{LogitsMode, Session};
use mamba_runtime::synthetic::{shape, synthetic_model};

const PROMPT: usize = 128;
const MAX_BATCH: usize = 8;

fn bench_model(c: &mut Criterion) {
    let s = shape("mamba-130m").expect("known shape");
    let rayon = RayonParallel::new(0).expect("thread pool");
    let backends: [(String, &dyn Parallel); 2] =
        [("seq".into(), &Sequential), (format!("rayon{}", rayon.threads()), &rayon)];
    let mut rng = Rng::new(1);
    let prompt: Vec<u32> = (0..PROMPT).map(|_| (rng.next_u64() % s.vocab_size as u64) as u32).collect();
    for dtype in [DType::F32, DType::BF16, DType::Q8_0] {
        let model = synthetic_model(s, dtype, 0).expect("synthetic model");
        for (backend, par) in &backends {
            let id = |phase: &str| BenchmarkId::new(phase, format!("{}/{backend}", dtype.name()));
            let mut session = Session::new(&model, *par, MAX_BATCH).expect("session");

            let mut g = c.benchmark_group("mamba-130m");
            g.sampling_mode(SamplingMode::Flat);
            g.throughput(Throughput::Elements(PROMPT as u64));
            g.bench_function(id(&format!("prefill{PROMPT}")), |b| {
                b.iter(|| {
                    session.reset(0).expect("reset");
                    let out = session.prefill(&[&prompt], &[0], LogitsMode::Last).expect("prefill");
                    black_box(out);
                })
            });
            for batch in [1, MAX_BATCH] {
                let tokens: Vec<u32> = prompt[..batch].to_vec();
                let slots: Vec<usize> = (0..batch).collect();
                g.throughput(Throughput::Elements(batch as u64));
                g.bench_function(id(&format!("decode_b{batch}")), |b| {
                    b.iter(|| {
                        black_box(session.step(&tokens, &slots).expect("step"));
                    })
                });
            }
            g.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_model
}
criterion_main!(benches);
