//! The generation loop: stop tokens, budgets, and greedy agreement.

use mamba_core::Sequential;
use mamba_runtime::generate::{generate, FinishReason, GenerateParams};
use mamba_runtime::model::LoadedModel;
use mamba_runtime::sampling::SamplingParams;
use mamba_runtime::session::Session;
use mamba_tests::Truth;

#[test]
fn a_stop_token_ends_generation_and_is_kept() {
    let t = Truth::load("hf_f16_k2");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let p = &t.prompts[1];
    let mut s = Session::new(&m, &Sequential, 1).unwrap();
    let params =
        GenerateParams { max_tokens: 12, sampling: SamplingParams::default(), stop_ids: vec![p.greedy[3]] };
    let first = p.greedy.iter().position(|&x| x == p.greedy[3]).unwrap();
    let mut seen = vec![];
    let out = generate(&mut s, 0, &p.ids, &params, |id| {
        seen.push(id);
        Ok(())
    })
    .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.generated, p.greedy[..=first]);
    assert_eq!(seen, out.generated, "the callback sees every token in order");
}

#[test]
fn max_tokens_bounds_generation_and_matches_greedy_truth() {
    let t = Truth::load("orig_bin");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let mut s = Session::new(&m, &Sequential, 2).unwrap();
    for p in &t.prompts {
        let params = GenerateParams { max_tokens: 7, sampling: SamplingParams::default(), stop_ids: vec![] };
        // Slot 1 is reset by generate: a previous sequence leaves nothing behind.
        let out = generate(&mut s, 1, &p.ids, &params, |_| Ok(())).unwrap();
        assert_eq!(out.finish_reason, FinishReason::Length);
        assert_eq!(out.generated, p.greedy[..7]);
    }
}

#[test]
fn empty_prompt_and_bad_sampling_are_errors() {
    let t = Truth::load("hf_f32_tied");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let mut s = Session::new(&m, &Sequential, 1).unwrap();
    let params = GenerateParams { max_tokens: 3, sampling: SamplingParams::default(), stop_ids: vec![] };
    let e = generate(&mut s, 0, &[], &params, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("prompt is empty"), "{e}");
    let bad =
        GenerateParams { sampling: SamplingParams { temperature: -1.0, ..Default::default() }, ..params };
    let e = generate(&mut s, 0, &[1], &bad, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("temperature"), "{e}");
}
