//! Logits, states and greedy continuations against transformers' float64
//! `MambaForCausalLM`, through prefill, the step path and ragged batches.

use mamba_core::Sequential;
use mamba_runtime::model::LoadedModel;
use mamba_runtime::sampling::argmax;
use mamba_runtime::session::{LogitsMode, Session};
use mamba_tests::{assert_close, Truth, CASES};

const LOGIT_TOL: f64 = 1e-3;
const STATE_TOL: f64 = 1e-4;

fn load(t: &Truth) -> LoadedModel {
    LoadedModel::load(t.dir_str()).unwrap_or_else(|e| panic!("{}: {e}", t.case))
}

#[test]
fn prefill_logits_and_states_match_transformers_at_every_position() {
    for case in CASES {
        let t = Truth::load(case);
        let m = load(&t);
        assert_eq!(m.cfg.vocab_size, t.padded_vocab_size, "{case}: vocab from the embedding");
        assert_eq!(m.sample_vocab(), t.vocab_size, "{case}: real vocab");
        let mut worst = 0.0f64;
        for (pi, p) in t.prompts.iter().enumerate() {
            let mut s = Session::new(&m, &Sequential, 1).unwrap();
            let logits = s.prefill(&[&p.ids], &[0], LogitsMode::All).unwrap();
            let what = format!("{case} prompt {pi} (len {}) prefill logits", p.ids.len());
            worst = worst.max(assert_close(&what, &logits[0], &t.read_f64(&p.logits), LOGIT_TOL));
            let (conv, ssm) = (t.read_f64(&p.conv_state), t.read_f64(&p.ssm_state));
            let (cl, sl) = (t.d_inner * t.d_conv, t.d_inner * t.d_state);
            for l in 0..t.n_layer {
                let what = format!("{case} prompt {pi} layer {l} conv state");
                assert_close(&what, s.conv_state(0, l), &conv[l * cl..(l + 1) * cl], STATE_TOL);
                let what = format!("{case} prompt {pi} layer {l} ssm state");
                assert_close(&what, s.ssm_state(0, l), &ssm[l * sl..(l + 1) * sl], STATE_TOL);
            }
        }
        eprintln!("{case}: prefill max |logit diff| {worst:.2e}");
    }
}

#[test]
fn step_path_logits_match_transformers_at_every_position() {
    for case in CASES {
        let t = Truth::load(case);
        let m = load(&t);
        let v = t.padded_vocab_size;
        let mut worst = 0.0f64;
        for (pi, p) in t.prompts.iter().enumerate() {
            let mut s = Session::new(&m, &Sequential, 1).unwrap();
            let want = t.read_f64(&p.logits);
            for (pos, &tok) in p.ids.iter().enumerate() {
                let row = s.step(&[tok], &[0]).unwrap().to_vec();
                let what = format!("{case} prompt {pi} step logits at position {pos}");
                worst = worst.max(assert_close(&what, &row, &want[pos * v..(pos + 1) * v], LOGIT_TOL));
            }
            let ssm = t.read_f64(&p.ssm_state);
            let sl = t.d_inner * t.d_state;
            for l in 0..t.n_layer {
                let what = format!("{case} prompt {pi} layer {l} ssm state after steps");
                assert_close(&what, s.ssm_state(0, l), &ssm[l * sl..(l + 1) * sl], STATE_TOL);
            }
        }
        eprintln!("{case}: step max |logit diff| {worst:.2e}");
    }
}

#[test]
fn ragged_batch_of_every_prompt_matches_transformers() {
    for case in CASES {
        let t = Truth::load(case);
        let m = load(&t);
        let n = t.prompts.len();
        let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
        // Slots in a shuffled order, and chunks that cut across sequences.
        let slots: Vec<usize> = (0..n).rev().collect();
        for chunk in [5, 64, 4096] {
            let mut s = Session::new(&m, &Sequential, n).unwrap();
            s.chunk_tokens = chunk;
            let logits = s.prefill(&seqs, &slots, LogitsMode::All).unwrap();
            for (pi, p) in t.prompts.iter().enumerate() {
                let what = format!("{case} chunk {chunk}: prompt {pi} in a ragged batch of {n}");
                assert_close(&what, &logits[pi], &t.read_f64(&p.logits), LOGIT_TOL);
                let ssm = t.read_f64(&p.ssm_state);
                let sl = t.d_inner * t.d_state;
                assert_close(&what, s.ssm_state(slots[pi], 0), &ssm[..sl], STATE_TOL);
            }
        }
    }
}

#[test]
fn ragged_prefill_equals_solo_prefill_bit_for_bit() {
    let t = Truth::load("hf_bf16_untied_sharded");
    let m = load(&t);
    let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
    let slots: Vec<usize> = (0..seqs.len()).collect();
    let mut together = Session::new(&m, &Sequential, seqs.len()).unwrap();
    let all = together.prefill(&seqs, &slots, LogitsMode::All).unwrap();
    for (i, seq) in seqs.iter().enumerate() {
        let mut solo = Session::new(&m, &Sequential, 1).unwrap();
        let one = solo.prefill(&[seq], &[0], LogitsMode::All).unwrap();
        assert_eq!(one[0], all[i], "sequence {i}: logits differ between ragged and solo prefill");
        assert_eq!(
            solo.slot_state(0).unwrap(),
            together.slot_state(i).unwrap(),
            "sequence {i}: state differs"
        );
    }
}

#[test]
fn chunked_prefill_equals_prefill_in_one_piece() {
    let t = Truth::load("hf_f32_tied");
    let m = load(&t);
    let long = t.prompts.iter().max_by_key(|p| p.ids.len()).unwrap();
    assert!(long.ids.len() > 1000, "the fixture has a prompt of over 1,000 tokens");
    let mut whole = Session::new(&m, &Sequential, 1).unwrap();
    whole.chunk_tokens = 1 << 20;
    let want = whole.prefill(&[&long.ids], &[0], LogitsMode::All).unwrap();
    for chunk in [1, 3, 100, 512] {
        let mut s = Session::new(&m, &Sequential, 1).unwrap();
        s.chunk_tokens = chunk;
        let got = s.prefill(&[&long.ids], &[0], LogitsMode::All).unwrap();
        assert_eq!(got, want, "chunk {chunk}: logits differ");
        assert_eq!(s.slot_state(0).unwrap(), whole.slot_state(0).unwrap(), "chunk {chunk}: state differs");
    }
    // A prompt continued by the caller in pieces, from the saved state.
    let mut s = Session::new(&m, &Sequential, 1).unwrap();
    let (a, b) = long.ids.split_at(437);
    s.prefill(&[a], &[0], LogitsMode::Last).unwrap();
    let rest = s.prefill(&[b], &[0], LogitsMode::All).unwrap();
    let v = t.padded_vocab_size;
    assert_eq!(rest[0], want[0][437 * v..], "continued prefill differs");
}

#[test]
fn greedy_continuations_match_transformers_token_for_token() {
    for case in CASES {
        let t = Truth::load(case);
        let m = load(&t);
        let vocab = m.sample_vocab();
        for (pi, p) in t.prompts.iter().enumerate() {
            let mut s = Session::new(&m, &Sequential, 1).unwrap();
            let last = s.prefill(&[&p.ids], &[0], LogitsMode::Last).unwrap();
            let mut tok = argmax(&last[0][..vocab]) as u32;
            let mut got = vec![tok];
            while got.len() < p.greedy.len() {
                tok = argmax(&s.step(&[tok], &[0]).unwrap()[..vocab]) as u32;
                got.push(tok);
            }
            assert_eq!(got, p.greedy, "{case} prompt {pi}: greedy continuation");
        }
    }
}

#[test]
fn batched_step_equals_single_steps() {
    let t = Truth::load("hf_f16_k2");
    let m = load(&t);
    let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
    let n = seqs.len();
    let slots: Vec<usize> = (0..n).collect();
    let mut batch = Session::new(&m, &Sequential, n).unwrap();
    batch.prefill(&seqs, &slots, LogitsMode::Last).unwrap();
    let toks: Vec<u32> = (0..n as u32).map(|i| i + 3).collect();
    let rows = batch.step(&toks, &slots).unwrap().to_vec();
    let v = t.padded_vocab_size;
    for i in 0..n {
        let mut solo = Session::new(&m, &Sequential, 1).unwrap();
        solo.prefill(&[seqs[i]], &[0], LogitsMode::Last).unwrap();
        let row = solo.step(&[toks[i]], &[0]).unwrap();
        assert_eq!(row, &rows[i * v..(i + 1) * v], "sequence {i}");
    }
}

#[test]
fn last_n_logits_are_the_last_rows_of_every_sequence() {
    let t = Truth::load("hf_bf16_untied_sharded");
    let m = load(&t);
    let v = t.padded_vocab_size;
    let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
    let slots: Vec<usize> = (0..seqs.len()).collect();
    for (n, chunk) in [(1, 4096), (3, 5), (20, 7), (1000, 64)] {
        let mut s = Session::new(&m, &Sequential, seqs.len()).unwrap();
        s.chunk_tokens = chunk;
        let rows = s.prefill(&seqs, &slots, LogitsMode::LastN(n)).unwrap();
        for (i, p) in t.prompts.iter().enumerate() {
            let want = t.read_f64(&p.logits);
            let keep = n.min(p.ids.len());
            let what = format!("last {n} rows of prompt {i} (chunk {chunk})");
            assert_close(&what, &rows[i], &want[(p.ids.len() - keep) * v..], LOGIT_TOL);
        }
    }
}

#[test]
fn threaded_prefill_and_step_equal_sequential_bit_for_bit() {
    let rayon = mamba_runtime::parallel::RayonParallel::new(2).unwrap();
    let spin = mamba_runtime::parallel::SpinPool::new(3).unwrap();
    let pools: [&dyn mamba_core::Parallel; 2] = [&rayon, &spin];
    for (case, par) in
        ["hf_f32_tied", "hf_bf16_untied_sharded"].into_iter().flat_map(|c| pools.map(|p| (c, p)))
    {
        let t = Truth::load(case);
        let m = load(&t);
        let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
        let slots: Vec<usize> = (0..seqs.len()).collect();
        let mut one = Session::new(&m, &Sequential, seqs.len()).unwrap();
        let mut two = Session::new(&m, par, seqs.len()).unwrap();
        let a = one.prefill(&seqs, &slots, LogitsMode::All).unwrap();
        let b = two.prefill(&seqs, &slots, LogitsMode::All).unwrap();
        assert_eq!(a, b, "{case}: prefill logits");
        // All sequences, then one and two: below two a thread, each thread
        // steps its own channels of every sequence (in_proj rows too).
        for b in [seqs.len(), 1, 2, 1] {
            let (toks, slots) = ((0..b as u32).collect::<Vec<_>>(), &slots[..b]);
            assert_eq!(
                one.step(&toks, slots).unwrap(),
                two.step(&toks, slots).unwrap(),
                "{case}: step of {b}"
            );
        }
        for s in slots {
            assert_eq!(one.slot_state(s).unwrap(), two.slot_state(s).unwrap(), "{case}: state of slot {s}");
        }
    }
}
