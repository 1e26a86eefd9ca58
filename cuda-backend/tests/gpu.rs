//! GPU tests: the CUDA backend against transformers' float64 truth and
//! against the CPU backend. Without a device each test prints
//! `skipped: no CUDA device: <reason>` and passes, unless `MAMBA_REQUIRE_GPU=1`
//! (tools/gpu-check.sh sets it), which turns a missing device into a failure.

mod common;

use common::{cpu_all_logits, HostModel};
use mamba_core::Model;
use mamba_cuda::{CudaBackend, CudaError, CudaSession, LogitsMode};
use mamba_runtime::model::LoadedModel;
use mamba_tests::{assert_close, Truth, CASES};

fn gpu_required() -> bool {
    std::env::var("MAMBA_REQUIRE_GPU").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The device, or `None` after printing why the test is skipped.
fn device(test: &str) -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(!gpu_required(), "{test}: MAMBA_REQUIRE_GPU is set but: {e}");
            println!("skipped: no CUDA device: {e}");
            None
        }
    }
}

/// Logit tolerance against the float64 truth: 1e-3 for f32 weights, 3e-2 for bf16/f16 (issue 5).
fn logit_tol(t: &Truth) -> f64 {
    if t.storage_dtype == "f32" {
        1e-3
    } else {
        3e-2
    }
}
const STATE_TOL: f64 = 1e-3;

fn load(t: &Truth) -> LoadedModel {
    LoadedModel::load(t.dir_str()).unwrap_or_else(|e| panic!("{}: {e}", t.case))
}

fn session(test: &str, m: &LoadedModel, slots: usize) -> Option<CudaSession> {
    let b = device(test)?;
    let view = m.view().unwrap();
    Some(CudaSession::new(b, &view.model(), slots).unwrap())
}

#[test]
fn without_a_device_the_error_names_the_reason() {
    match CudaBackend::new(0) {
        Ok(b) => println!("device present ({}, {}): nothing to check", b.device_name(), b.arch()),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("no CUDA"), "unexpected error: {msg}");
            println!("no device, as expected here: {msg}");
        }
    }
    // A device index past the last is an error too, never a panic.
    if let Err(e) = CudaBackend::new(4096) {
        assert!(e.to_string().starts_with("no CUDA"), "{e}");
    }
}

#[test]
fn prefill_logits_and_states_match_transformers_at_every_position() {
    for case in CASES {
        let t = Truth::load(case);
        let m = load(&t);
        for (pi, p) in t.prompts.iter().enumerate() {
            let Some(mut s) = session("prefill parity", &m, 1) else { return };
            let logits = s.prefill(&[&p.ids], &[0], LogitsMode::All).unwrap();
            let what = format!("{case} prompt {pi} (len {}) GPU prefill logits", p.ids.len());
            let worst = assert_close(&what, &logits[0], &t.read_f64(&p.logits), logit_tol(&t));
            let (conv, ssm) = (t.read_f64(&p.conv_state), t.read_f64(&p.ssm_state));
            let (cl, sl) = (t.d_inner * t.d_conv, t.d_inner * t.d_state);
            for l in 0..t.n_layer {
                let what = format!("{case} prompt {pi} layer {l} GPU conv state");
                assert_close(&what, &s.conv_state(0, l).unwrap(), &conv[l * cl..(l + 1) * cl], STATE_TOL);
                let what = format!("{case} prompt {pi} layer {l} GPU ssm state");
                assert_close(&what, &s.ssm_state(0, l).unwrap(), &ssm[l * sl..(l + 1) * sl], STATE_TOL);
            }
            println!("{case} prompt {pi}: GPU prefill max |logit diff| {worst:.2e}");
        }
    }
}

#[test]
fn step_path_logits_match_transformers_at_every_position() {
    for case in CASES {
        let t = Truth::load(case);
        let m = load(&t);
        let v = t.padded_vocab_size;
        for (pi, p) in t.prompts.iter().enumerate().filter(|(_, p)| p.ids.len() <= 200) {
            let Some(mut s) = session("step parity", &m, 1) else { return };
            let want = t.read_f64(&p.logits);
            let mut worst = 0.0f64;
            for (pos, &tok) in p.ids.iter().enumerate() {
                let row = s.step(&[tok], &[0]).unwrap();
                let what = format!("{case} prompt {pi} GPU step logits at position {pos}");
                worst = worst.max(assert_close(&what, &row, &want[pos * v..(pos + 1) * v], logit_tol(&t)));
            }
            println!("{case} prompt {pi}: GPU step max |logit diff| {worst:.2e}");
        }
    }
}

#[test]
fn ragged_batch_of_every_prompt_matches_transformers() {
    for case in CASES {
        let t = Truth::load(case);
        let m = load(&t);
        let n = t.prompts.len();
        let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
        let slots: Vec<usize> = (0..n).rev().collect();
        for chunk in [5, 64, 4096] {
            let Some(mut s) = session("ragged parity", &m, n) else { return };
            s.chunk_tokens = chunk;
            let logits = s.prefill(&seqs, &slots, LogitsMode::All).unwrap();
            for (pi, p) in t.prompts.iter().enumerate() {
                let what = format!("{case} chunk {chunk}: prompt {pi} in a GPU ragged batch of {n}");
                assert_close(&what, &logits[pi], &t.read_f64(&p.logits), logit_tol(&t));
                let sl = t.d_inner * t.d_state;
                let ssm = t.read_f64(&p.ssm_state);
                assert_close(&what, &s.ssm_state(slots[pi], 0).unwrap(), &ssm[..sl], STATE_TOL);
            }
        }
    }
}

#[test]
fn greedy_continuations_on_the_device_match_transformers() {
    for case in CASES {
        let t = Truth::load(case);
        let m = load(&t);
        let vocab = m.sample_vocab();
        for (pi, p) in t.prompts.iter().enumerate() {
            let Some(mut s) = session("greedy", &m, 1) else { return };
            s.prefill(&[&p.ids], &[0], LogitsMode::Last).unwrap();
            let mut tok = s.argmax_last_logits(1, vocab).unwrap()[0];
            let mut got = vec![tok];
            while got.len() < p.greedy.len() {
                tok = s.step_greedy(&[tok], &[0], vocab).unwrap()[0];
                got.push(tok);
            }
            assert_eq!(got, p.greedy, "{case} prompt {pi}: GPU greedy continuation");
        }
    }
}

#[test]
fn batched_step_equals_single_steps_and_slot_copies_fork() {
    let t = Truth::load("hf_f16_k2");
    let m = load(&t);
    let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
    let n = seqs.len();
    let slots: Vec<usize> = (0..n).rev().collect();
    let Some(mut batch) = session("batched step", &m, n + 1) else { return };
    batch.prefill(&seqs, &slots, LogitsMode::Last).unwrap();
    let toks: Vec<u32> = (0..n as u32).map(|i| i + 3).collect();
    // Fork sequence 0 into the spare slot before stepping.
    batch.copy_slot(slots[0], n).unwrap();
    let rows = batch.step(&toks, &slots).unwrap();
    let v = t.padded_vocab_size;
    let forked = batch.step(&[toks[0]], &[n]).unwrap();
    let want: Vec<f64> = rows[..v].iter().map(|&x| x as f64).collect();
    assert_close("forked slot steps like its source", &forked, &want, 1e-5);
    for i in 0..n {
        let Some(mut solo) = session("batched step", &m, 1) else { return };
        solo.prefill(&[seqs[i]], &[0], LogitsMode::Last).unwrap();
        let row = solo.step(&[toks[i]], &[0]).unwrap();
        let want: Vec<f64> = rows[i * v..(i + 1) * v].iter().map(|&x| x as f64).collect();
        assert_close(&format!("sequence {i}: batched vs single step"), &row, &want, 1e-4);
    }
    batch.reset(n).unwrap();
    assert!(batch.slot_state(n).unwrap().iter().all(|&x| x == 0.0), "reset zeroes the slot");
}

#[test]
fn bad_input_is_an_error_before_any_launch() {
    let t = Truth::load("hf_f32_tied");
    let m = load(&t);
    let Some(mut s) = session("bad input", &m, 2) else { return };
    let vocab = t.padded_vocab_size as u32;
    let e = s.prefill(&[&[1, vocab]], &[0], LogitsMode::Last).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    let e = s.step(&[1], &[2]).unwrap_err();
    assert!(e.to_string().contains("slot 2"), "{e}");
    let e = s.step(&[1, 2], &[0, 0]).unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    assert!(matches!(s.set_slot_state(0, &[0.0; 3]), Err(CudaError::Input(_))));
}

#[test]
fn any_state_size_up_to_256_matches_the_cpu_backend() {
    let ids: Vec<u32> = (0..150u32).map(|i| (i * 37 + 11) % 97).collect();
    for (d_state, d_conv, bias) in
        [(1, 4, true), (5, 2, false), (16, 4, true), (40, 3, true), (256, 4, false)]
    {
        let hm = HostModel::new(d_state, d_conv, bias);
        let (layers, emb, norm_f) = hm.model();
        let m = Model { cfg: hm.cfg, embedding: emb, layers: &layers, norm_f, lm_head: None };
        let want: Vec<f64> = cpu_all_logits(&m, &ids).into_iter().map(f64::from).collect();
        let Some(b) = device("state sizes") else { return };
        let mut s = CudaSession::new(b, &m, 1).unwrap();
        s.chunk_tokens = 64; // carry the state across chunks too
        let got = s.prefill(&[&ids], &[0], LogitsMode::All).unwrap();
        let what = format!("d_state {d_state}, d_conv {d_conv}: GPU vs CPU prefill");
        let worst = assert_close(&what, &got[0], &want, 1e-3);
        // And the step path continuing from the prefilled state.
        let mut s2 = {
            let Some(b) = device("state sizes") else { return };
            CudaSession::new(b, &m, 1).unwrap()
        };
        s2.prefill(&[&ids[..100]], &[0], LogitsMode::Last).unwrap();
        let v = hm.cfg.vocab_size;
        for (pos, &tok) in ids.iter().enumerate().skip(100) {
            let row = s2.step(&[tok], &[0]).unwrap();
            assert_close(&format!("{what}: step at {pos}"), &row, &want[pos * v..(pos + 1) * v], 1e-3);
        }
        println!("{what}: max |diff| {worst:.2e}");
    }
}

#[test]
fn decode_graphs_replay_the_eager_step() {
    let t = Truth::load("hf_bf16_untied_sharded");
    let m = load(&t);
    let vocab = m.sample_vocab();
    let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
    // 1 and 3 sequences take the decode kernel, 12 the cuBLAS path.
    for batch in [1usize, 3, 12] {
        let Some(mut eager) = session("decode graphs", &m, batch) else { return };
        let Some(mut graph) = session("decode graphs", &m, batch) else { return };
        let slots: Vec<usize> = (0..batch).collect();
        let prompts: Vec<&[u32]> = (0..batch).map(|i| seqs[i % seqs.len()]).collect();
        eager.prefill(&prompts, &slots, LogitsMode::Last).unwrap();
        graph.prefill(&prompts, &slots, LogitsMode::Last).unwrap();
        let mut a: Vec<u32> = (0..batch as u32).map(|i| i % 7 + 1).collect();
        let mut b = a.clone();
        for step in 0..6 {
            a = eager.step_greedy(&a, &slots, vocab).unwrap();
            b = graph.step_greedy_graph(&b, &slots, vocab).unwrap();
            assert_eq!(a, b, "batch {batch}, step {step}: graph replay picks other tokens");
        }
        // A prefill that grows the buffers in between forces a new capture.
        let long: Vec<u32> = (0..300u32).map(|i| i % 50 + 1).collect();
        eager.prefill(&[&long], &[0], LogitsMode::Last).unwrap();
        graph.prefill(&[&long], &[0], LogitsMode::Last).unwrap();
        for step in 6..9 {
            a = eager.step_greedy(&a, &slots, vocab).unwrap();
            b = graph.step_greedy_graph(&b, &slots, vocab).unwrap();
            assert_eq!(a, b, "batch {batch}, step {step} (after a prefill): graph replay differs");
        }
        for &s in &slots {
            let (x, y) = (eager.slot_state(s).unwrap(), graph.slot_state(s).unwrap());
            let want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            assert_close(&format!("batch {batch} slot {s} state, eager vs graph"), &y, &want, 1e-6);
        }
    }
}

#[test]
fn device_sampling_matches_the_cpu_sampler_on_the_same_logits() {
    use mamba_cuda::DeviceSampling;
    use mamba_runtime::sampling::{Rng, Sampler, SamplingParams};
    let t = Truth::load("hf_bf16_untied_sharded");
    let m = load(&t);
    let vocab = m.sample_vocab();
    let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
    let n = seqs.len();
    let slots: Vec<usize> = (0..n).collect();
    let Some(mut a) = session("device sampling", &m, n) else { return };
    let Some(mut b) = session("device sampling", &m, n) else { return };
    a.prefill(&seqs, &slots, LogitsMode::Last).unwrap();
    b.prefill(&seqs, &slots, LogitsMode::Last).unwrap();
    let toks: Vec<u32> = (0..n as u32).map(|i| i + 2).collect();
    let logits = a.step(&toks, &slots).unwrap();
    let settings: Vec<DeviceSampling> = (0..n)
        .map(|i| DeviceSampling { temperature: 0.9, top_k: [0, 5, 40][i % 3], top_p: 0.9, min_p: 0.0 })
        .collect();
    let seeds: Vec<u64> = (0..n as u64).map(|i| 77 + i).collect();
    let u: Vec<f64> = seeds.iter().map(|&s| Rng::new(s).next_f64()).collect();
    let got = b.step_sample(&toks, &slots, &settings, &u, vocab).unwrap();
    let v = t.padded_vocab_size;
    for i in 0..n {
        let s = &settings[i];
        let sp = SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            seed: seeds[i],
            ..SamplingParams::default()
        };
        let want = Sampler::new(sp).sample(&logits[i * v..(i + 1) * v], vocab);
        assert_eq!(got[i], want, "row {i}: device sampling vs the CPU sampler on the same logits");
    }
}

#[test]
fn chunked_prefill_scan_equals_the_plain_scan_on_the_device() {
    let hm = HostModel::new(16, 4, true);
    let (layers, emb, norm_f) = hm.model();
    let m = Model { cfg: hm.cfg, embedding: emb, layers: &layers, norm_f, lm_head: None };
    let long: Vec<u32> = (0..700u32).map(|i| (i * 31 + 7) % 97).collect();
    let short: Vec<u32> = (0..90u32).map(|i| (i * 17 + 3) % 97).collect();
    let mut runs = vec![];
    for chunk in [0usize, 128] {
        let Some(mut b) = device("chunked scan") else { return };
        b.scan_chunk = chunk;
        let mut s = CudaSession::new(b, &m, 2).unwrap();
        s.chunk_tokens = 4096;
        let logits = s.prefill(&[&long, &short], &[1, 0], LogitsMode::All).unwrap();
        runs.push((logits, s.slot_state(0).unwrap(), s.slot_state(1).unwrap()));
    }
    let (plain, chunked) = (&runs[0], &runs[1]);
    for (i, (a, b)) in plain.0.iter().zip(&chunked.0).enumerate() {
        let want: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        assert_close(&format!("sequence {i}: chunked vs plain scan logits"), b, &want, 1e-4);
    }
    let want: Vec<f64> = plain.2.iter().map(|&v| v as f64).collect();
    assert_close("long sequence's final state, chunked vs plain", &chunked.2, &want, 1e-4);
    let want: Vec<f64> = plain.1.iter().map(|&v| v as f64).collect();
    assert_close("short sequence's final state, chunked vs plain", &chunked.1, &want, 1e-4);
}
