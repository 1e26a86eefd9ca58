//! bf16 products through AVX-512 BF16's `vdpbf16ps`, over activations
//! rounded to bf16 (`--bf16-dot`): how far they move the bf16 fixtures'
//! logits from transformers' float64 and the demo model's held-out
//! perplexity from the f32 products', and that prefill = step, ragged =
//! solo and threaded = sequential still hold bit for bit. A test binary of
//! its own: the switch is process-wide.

use mamba_core::kernels::simd;
use mamba_core::Sequential;
use mamba_runtime::eval::{for_each_prediction, nll};
use mamba_runtime::model::LoadedModel;
use mamba_runtime::parallel::RayonParallel;
use mamba_runtime::sampling::argmax;
use mamba_runtime::session::{LogitsMode, Session};
use mamba_tests::{assert_close, bits, solo_logits, Truth, CASES};

/// Rounding an activation to bf16 moves it by up to 2^-9 of itself, where
/// f32 moves it by 2^-24; the fixtures' random weights carry that through
/// every layer. Measured worst: 5.3e-2 (the f32 products: 8e-6).
const LOGIT_TOL: f64 = 0.1;

/// The logits of the step path, a token at a time.
fn steps(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let mut s = Session::new(m, &Sequential, 1).unwrap();
    ids.iter().flat_map(|&t| s.step(&[t], &[0]).unwrap().to_vec()).collect()
}

/// The bf16 fixtures against float64, and every path against the others.
fn check_fixtures(pool: &RayonParallel) {
    for case in CASES {
        let t = Truth::load(case);
        if t.storage_dtype != "bf16" {
            continue;
        }
        let m = LoadedModel::load(t.dir_str()).unwrap();
        let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
        let solo = solo_logits(&m, &Sequential, &seqs);
        let mut worst = 0.0f64;
        for (pi, p) in t.prompts.iter().enumerate() {
            let what = format!("{case} prompt {pi} logits with bf16 dot products");
            worst = worst.max(assert_close(&what, &solo[pi], &t.read_f64(&p.logits), LOGIT_TOL));
            assert_eq!(bits(&steps(&m, &p.ids)), bits(&solo[pi]), "{case} prompt {pi}: step != prefill");
        }
        // One ragged prefill of every prompt, slots shuffled, on two threads.
        let slots: Vec<usize> = (0..seqs.len()).rev().collect();
        let mut s = Session::new(&m, pool, seqs.len()).unwrap();
        let ragged = s.prefill(&seqs, &slots, LogitsMode::All).unwrap();
        for (pi, (r, s)) in ragged.iter().zip(&solo).enumerate() {
            assert_eq!(bits(r), bits(s), "{case} prompt {pi}: ragged and threaded != solo and sequential");
        }
        // The switch takes effect: the f32 products give other bits.
        simd::disable_bf16_dot();
        let exact = solo_logits(&m, &Sequential, &seqs);
        mamba_runtime::cpu::enable_bf16_dot().unwrap();
        assert_ne!(bits(&exact[0]), bits(&solo[0]), "{case}: --bf16-dot changed nothing");
        eprintln!("{case}: max |logit diff| {worst:.2e} against float64 with bf16 dot products");
    }
}

/// Scores and logits rows (the real vocabulary) of the demo model on its
/// held-out text. Not `eval::compare`: it runs both sessions window by
/// window, and the switch between the two products is process-wide.
fn demo_predictions(m: &LoadedModel, pool: &RayonParallel, ids: &[u32]) -> (f64, Vec<Vec<f32>>) {
    let vocab = m.sample_vocab();
    let mut s = Session::new(m, pool, 1).unwrap();
    let (mut nats, mut rows) = (0.0, Vec::new());
    for_each_prediction(&mut [&mut s], ids, 512, |p, r| {
        nats += nll(r[0], vocab, ids[p + 1]);
        rows.push(r[0][..vocab].to_vec());
    })
    .unwrap();
    ((nats / rows.len() as f64).exp(), rows)
}

/// A trained model, unlike the random fixtures: what the rounding costs in use.
fn check_demo(pool: &RayonParallel) {
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mamba-demo");
    let m = LoadedModel::load(demo.to_str().unwrap()).unwrap();
    assert_eq!(m.dtype, mamba_core::DType::BF16, "the demo model ships in bf16");
    let tok = mamba_runtime::tokenizer::Tokenizer::from_dir(&m.dir).unwrap().unwrap();
    let ids = tok.encode(&std::fs::read_to_string(demo.join("heldout.txt")).unwrap()).unwrap();
    let (p1, fast) = demo_predictions(&m, pool, &ids);
    simd::disable_bf16_dot();
    let (p0, exact) = demo_predictions(&m, pool, &ids);
    mamba_runtime::cpu::enable_bf16_dot().unwrap();
    let (mut max, mut sum, mut agree) = (0.0f64, 0.0f64, 0usize);
    for (a, b) in exact.iter().zip(&fast) {
        for (&x, &y) in a.iter().zip(b) {
            max = max.max((x as f64 - y as f64).abs());
            sum += (x as f64 - y as f64).abs();
        }
        agree += usize::from(argmax(a) == argmax(b));
    }
    let mean = sum / (exact.len() * exact[0].len()) as f64;
    let top1 = agree as f64 / exact.len() as f64;
    eprintln!(
        "demo model, {} positions: perplexity {p0:.4} -> {p1:.4} with bf16 dot products, |logit diff| max {max:.4} mean {mean:.5}, top-1 {:.2}%",
        exact.len(),
        top1 * 100.0
    );
    assert!((p1 / p0 - 1.0).abs() < 1e-3, "perplexity {p0} -> {p1}");
    // Measured: 15.1632 -> 15.1631, max 0.061, mean 0.0050, top-1 99.7%.
    assert!(max < 0.15 && mean < 0.01, "|logit diff| max {max} mean {mean}");
    assert!(top1 >= 0.99, "top-1 agreement {top1}");
}

#[test]
fn bf16_dot_products_stay_close_and_keep_every_path_equal() {
    if let Err(e) = mamba_runtime::cpu::enable_bf16_dot() {
        eprintln!("skipped: {e}");
        return;
    }
    let pool = RayonParallel::new(2).unwrap();
    check_fixtures(&pool);
    check_demo(&pool);
    simd::disable_bf16_dot();
}
