//! The serving engine: continuous batching, slots, fork, log-probs, stops,
//! seeds, and a long randomised run that must lose nothing and leak no slot.

use std::collections::HashMap;

use mamba_core::Sequential;
use mamba_runtime::engine::{Engine, EngineConfig, Event, RequestParams};
use mamba_runtime::generate::FinishReason;
use mamba_runtime::model::LoadedModel;
use mamba_runtime::sampling::{Rng, SamplingParams};
use mamba_runtime::tokenizer::Tokenizer;
use mamba_tests::{assert_close, Truth};

/// Per (request, index): generated ids, text, finish reason.
type Results = HashMap<(u64, u32), (Vec<u32>, String, Option<FinishReason>)>;

fn collect(engine: &mut Engine<'_>) -> Results {
    let mut out: Results = HashMap::new();
    engine
        .run_to_completion(|e| match e {
            Event::Token { request, index, token, text, .. } => {
                let r = out.entry((request, index)).or_default();
                r.0.push(token);
                r.1 += &text;
            }
            Event::Finished { request, index, reason, text, .. } => {
                let r = out.entry((request, index)).or_default();
                assert!(r.2.is_none(), "request {request}/{index} finished twice");
                r.1 += &text;
                r.2 = Some(reason);
            }
            Event::PromptLogprobs { .. } => {}
        })
        .unwrap();
    out
}

fn greedy(max_tokens: usize) -> RequestParams {
    RequestParams { max_tokens, ..Default::default() }
}

#[test]
fn batched_requests_with_mixed_prefill_and_decode_match_transformers() {
    for case in ["hf_f32_tied", "hf_bf16_untied_sharded", "orig_bin"] {
        let t = Truth::load(case);
        let m = LoadedModel::load(t.dir_str()).unwrap();
        // A small prefill chunk: long prompts are still prefilling while short ones decode.
        let cfg = EngineConfig { slots: 8, prefill_chunk: 7, ..Default::default() };
        let mut e = Engine::new(&m, &Sequential, None, cfg).unwrap();
        let ids: Vec<u64> =
            t.prompts.iter().map(|p| e.add(p.ids.clone(), greedy(p.greedy.len())).unwrap()).collect();
        let out = collect(&mut e);
        for (id, p) in ids.iter().zip(&t.prompts) {
            let (toks, _, reason) = &out[&(*id, 0)];
            assert_eq!(toks, &p.greedy, "{case}: request {id}");
            assert_eq!(*reason, Some(FinishReason::Length));
        }
        assert_eq!(e.slot_usage().0, 0, "every slot is released");
    }
}

#[test]
fn claiming_past_capacity_waits_and_reused_slots_start_from_zero() {
    let t = Truth::load("hf_f16_k2");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let cfg = EngineConfig { slots: 1, prefill_chunk: 4, ..Default::default() };
    let mut e = Engine::new(&m, &Sequential, None, cfg).unwrap();
    let ids: Vec<u64> = (0..3)
        .flat_map(|_| t.prompts.iter().map(|p| p.ids.clone()))
        .map(|ids| e.add(ids, greedy(12)).unwrap())
        .collect();
    let out = collect(&mut e);
    for (k, id) in ids.iter().enumerate() {
        let p = &t.prompts[k % t.prompts.len()];
        assert_eq!(out[&(*id, 0)].0, p.greedy, "request {id} in a reused slot");
    }
}

#[test]
fn fork_gives_identical_greedy_continuations() {
    let t = Truth::load("orig_st_bf16");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let mut e = Engine::new(&m, &Sequential, None, EngineConfig { slots: 4, ..Default::default() }).unwrap();
    let p = &t.prompts[1];
    let id = e.add(p.ids.clone(), RequestParams { n: 3, ..greedy(12) }).unwrap();
    let out = collect(&mut e);
    for i in 0..3 {
        assert_eq!(out[&(id, i)].0, p.greedy, "sample {i}");
    }
    // n larger than the slots is refused up front.
    let err = e.add(p.ids.clone(), RequestParams { n: 5, ..greedy(1) }).unwrap_err().to_string();
    assert!(err.contains("n must be"), "{err}");
}

#[test]
fn logprobs_match_log_softmax_of_the_reference_logits() {
    let t = Truth::load("hf_bf16_untied_sharded");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let v = t.padded_vocab_size;
    let vocab = t.vocab_size;
    let p = &t.prompts[1];
    let truth = t.read_f64(&p.logits);
    let log_softmax = |row: &[f64], tok: usize| {
        let max = row[..vocab].iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = row[..vocab].iter().map(|x| (x - max).exp()).sum();
        row[tok] - max - z.ln()
    };
    let cfg = EngineConfig { slots: 2, prefill_chunk: 4, ..Default::default() };
    let mut e = Engine::new(&m, &Sequential, None, cfg).unwrap();
    let params = RequestParams { logprobs: Some(5), echo: true, ..greedy(1) };
    e.add(p.ids.clone(), params).unwrap();
    let mut prompt_lp = None;
    let mut gen_lp = None;
    e.run_to_completion(|ev| match ev {
        Event::PromptLogprobs { logprobs, .. } => prompt_lp = Some(logprobs),
        Event::Token { logprob, .. } => gen_lp = logprob,
        _ => {}
    })
    .unwrap();
    let prompt_lp = prompt_lp.expect("echo gives prompt log-probs");
    assert_eq!(prompt_lp.len(), p.ids.len());
    assert!(prompt_lp[0].is_none(), "the first prompt token has no log-prob");
    for (i, lp) in prompt_lp.iter().enumerate().skip(1) {
        let lp = lp.as_ref().unwrap();
        let row = &truth[(i - 1) * v..i * v];
        assert_eq!(lp.token, p.ids[i]);
        assert_close(
            &format!("prompt log-prob {i}"),
            &[lp.logprob],
            &[log_softmax(row, p.ids[i] as usize)],
            1e-3,
        );
        assert_eq!(lp.top.len(), 5);
        let want: Vec<f64> = lp.top.iter().map(|&(tk, _)| log_softmax(row, tk as usize)).collect();
        let got: Vec<f32> = lp.top.iter().map(|&(_, l)| l).collect();
        assert_close("top alternatives", &got, &want, 1e-3);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    }
    let g = gen_lp.expect("generated token log-prob");
    let last = &truth[(p.ids.len() - 1) * v..];
    assert_eq!(g.token, p.greedy[0]);
    assert_eq!(g.top[0].0, p.greedy[0], "greedy picks the top alternative");
    assert_close("generated log-prob", &[g.logprob], &[log_softmax(last, g.token as usize)], 1e-3);
}

#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    let t = Truth::load("hf_f32_tied");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let sampled = RequestParams {
        max_tokens: 20,
        sampling: SamplingParams { temperature: 1.0, top_p: 0.9, seed: 1234, ..Default::default() },
        ..Default::default()
    };
    let mut alone = Engine::new(&m, &Sequential, None, EngineConfig::default()).unwrap();
    let id = alone.add(t.prompts[2].ids.clone(), sampled.clone()).unwrap();
    let want = collect(&mut alone)[&(id, 0)].0.clone();
    let mut busy =
        Engine::new(&m, &Sequential, None, EngineConfig { prefill_chunk: 16, ..Default::default() }).unwrap();
    busy.add(t.prompts[4].ids.clone(), greedy(30)).unwrap();
    busy.add(t.prompts[0].ids.clone(), RequestParams { n: 2, ..sampled.clone() }).unwrap();
    let id = busy.add(t.prompts[2].ids.clone(), sampled).unwrap();
    let out = collect(&mut busy);
    assert_eq!(out[&(id, 0)].0, want);
}

#[test]
fn stop_strings_cut_the_text_exactly() {
    let t = Truth::load("hf_f32_tied");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let tok = Tokenizer::from_dir(&t.dir).unwrap().unwrap();
    let p = t.prompts.iter().find(|p| p.text.is_some()).unwrap();
    let full = tok.decode(&p.greedy).unwrap();
    // Stop at the third word of the greedy text, even across a token boundary.
    let words: Vec<&str> = full.split(' ').collect();
    let stop = format!("{} {}", words[2], &words[3][..1]);
    let cut = full.find(&stop).unwrap();
    let mut e = Engine::new(&m, &Sequential, Some(&tok), EngineConfig::default()).unwrap();
    let id = e.add(p.ids.clone(), RequestParams { stop: vec![stop.clone()], ..greedy(12) }).unwrap();
    let out = collect(&mut e);
    let (ids, text, reason) = &out[&(id, 0)];
    assert_eq!(*reason, Some(FinishReason::Stop));
    assert_eq!(text.trim_start(), full[..cut].trim_start(), "stop {stop:?} in {full:?}");
    assert_eq!(ids[..], p.greedy[..4], "generation stops at the token completing the stop string");
}

#[test]
fn a_thousand_requests_with_random_arrival_and_cancellation_lose_nothing() {
    let t = Truth::load("hf_f16_k2");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let cfg = EngineConfig { slots: 6, prefill_chunk: 24, ..Default::default() };
    let mut e = Engine::new(&m, &Sequential, None, cfg).unwrap();
    let mut rng = Rng::new(99);
    let mut pending: Vec<(Vec<u32>, RequestParams)> = (0..1000)
        .map(|i| {
            let len = 1 + (rng.next_u64() % 30) as usize;
            let prompt: Vec<u32> = (0..len).map(|_| (rng.next_u64() % 37) as u32).collect();
            let n = 1 + (i % 7 == 0) as usize;
            (prompt, RequestParams { n, max_tokens: 1 + (rng.next_u64() % 9) as usize, ..Default::default() })
        })
        .collect();
    pending.reverse();
    let mut added: HashMap<u64, (Vec<u32>, RequestParams)> = HashMap::new();
    let mut finished: HashMap<(u64, u32), (FinishReason, Vec<u32>)> = HashMap::new();
    let mut tokens: HashMap<(u64, u32), Vec<u32>> = HashMap::new();
    let mut cancelled = 0;
    while !pending.is_empty() || e.has_work() {
        for _ in 0..(rng.next_u64() % 4) {
            if let Some((p, params)) = pending.pop() {
                let id = e.add(p.clone(), params.clone()).unwrap();
                added.insert(id, (p, params));
            }
        }
        if rng.next_u64().is_multiple_of(5) && !added.is_empty() {
            let victim = rng.next_u64() % added.len() as u64;
            if e.cancel(victim) {
                cancelled += 1;
            }
        }
        e.step(|ev| match ev {
            Event::Token { request, index, token, .. } => {
                tokens.entry((request, index)).or_default().push(token)
            }
            Event::Finished { request, index, reason, usage, .. } => {
                let toks = tokens.get(&(request, index)).cloned().unwrap_or_default();
                assert_eq!(usage.completion_tokens, toks.len());
                assert!(finished.insert((request, index), (reason, toks)).is_none(), "finished twice");
            }
            _ => {}
        })
        .unwrap();
        let (used, free) = e.slot_usage();
        assert_eq!(used + free, 6);
    }
    assert_eq!(e.slot_usage(), (0, 6), "no slot leaked");
    let samples: usize = added.values().map(|(_, p)| p.n).sum();
    assert_eq!(finished.len(), samples, "every sample of every request finished exactly once");
    assert!(cancelled > 20, "the run exercised cancellation ({cancelled})");
    // Uncancelled requests equal the same request run alone.
    let mut solo =
        Engine::new(&m, &Sequential, None, EngineConfig { slots: 2, ..Default::default() }).unwrap();
    let mut checked = 0;
    for (id, (prompt, params)) in added.iter().filter(|(id, _)| id.is_multiple_of(10)) {
        let (reason, toks) = &finished[&(*id, 0)];
        if *reason == FinishReason::Cancelled {
            continue;
        }
        let sid = solo.add(prompt.clone(), params.clone()).unwrap();
        let out = collect(&mut solo);
        assert_eq!(&out[&(sid, 0)].0, toks, "request {id}");
        checked += 1;
    }
    assert!(checked > 30);
}

#[test]
fn fork_mid_generation_continues_like_the_parent_without_recomputing() {
    let t = Truth::load("hf_bf16_untied_sharded");
    let m = LoadedModel::load(t.dir_str()).unwrap();
    let p = &t.prompts[2];
    let mut e = Engine::new(&m, &Sequential, None, EngineConfig { slots: 2, ..Default::default() }).unwrap();
    let parent = e.add(p.ids.clone(), greedy(12)).unwrap();
    let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
    fn record(tokens: &mut HashMap<u64, Vec<u32>>, ev: Event) {
        if let Event::Token { request, token, .. } = ev {
            tokens.entry(request).or_default().push(token);
        }
    }
    while tokens.get(&parent).map_or(0, Vec::len) < 4 {
        e.step(|ev| record(&mut tokens, ev)).unwrap();
    }
    let child = e.fork(parent, 0, greedy(8)).unwrap();
    assert_eq!(e.slot_usage(), (2, 0));
    // A third sequence does not fit: a clear error, nothing changes.
    let err = e.fork(parent, 0, greedy(8)).unwrap_err().to_string();
    assert!(err.contains("state slots are in use"), "{err}");
    e.run_to_completion(|ev| record(&mut tokens, ev)).unwrap();
    assert_eq!(tokens[&parent], p.greedy);
    assert_eq!(tokens[&child], p.greedy[4..], "the fork continues exactly where the parent was");
    assert_eq!(e.slot_usage(), (0, 2));
    assert!(e.fork(parent, 0, greedy(1)).is_err(), "a finished request cannot be forked");
}
