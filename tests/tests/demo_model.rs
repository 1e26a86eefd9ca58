//! The demo model that ships in `models/mamba-demo`: its greedy output from
//! a fixed prompt stays what transformers gives, and its perplexity on the
//! held-out text stays at the figure reported at training time.

use std::path::PathBuf;

use mamba_core::Sequential;
use mamba_runtime::engine::token_logprob;
use mamba_runtime::generate::{generate, GenerateParams};
use mamba_runtime::model::LoadedModel;
use mamba_runtime::sampling::SamplingParams;
use mamba_runtime::session::{LogitsMode, Session};
use mamba_runtime::tokenizer::Tokenizer;
use serde_json::Value;

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba-demo")
}

fn eval() -> Value {
    serde_json::from_str(&std::fs::read_to_string(demo_dir().join("eval.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn demo_model_greedy_output_is_stable() {
    let e = eval();
    let m = LoadedModel::load(demo_dir().to_str().unwrap()).unwrap();
    assert_eq!(m.dtype, mamba_core::DType::BF16);
    assert_eq!(m.parameter_count(), e["parameters"].as_u64().unwrap() as usize);
    let tok = Tokenizer::from_dir(&m.dir).unwrap().expect("tokenizer.json");
    let g = &e["greedy"];
    let prompt = tok.encode(g["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(prompt, ids(&g["prompt_ids"]));
    let want = ids(&g["generated_ids"]);
    let mut s = Session::new(&m, &Sequential, 1).unwrap();
    let params =
        GenerateParams { max_tokens: want.len(), sampling: SamplingParams::default(), stop_ids: vec![0] };
    let out = generate(&mut s, 0, &prompt, &params, |_| Ok(())).unwrap();
    assert_eq!(out.generated, want, "greedy continuation of {:?}", g["prompt"]);
    assert_eq!(tok.decode(&out.generated).unwrap(), g["text"].as_str().unwrap());
}

#[test]
fn demo_model_perplexity_on_held_out_text_stays_at_the_trained_figure() {
    let e = eval();
    let h = &e["heldout"];
    let m = LoadedModel::load(demo_dir().to_str().unwrap()).unwrap();
    let tok = Tokenizer::from_dir(&m.dir).unwrap().unwrap();
    let text = std::fs::read_to_string(demo_dir().join(h["file"].as_str().unwrap())).unwrap();
    let ids = tok.encode(&text).unwrap();
    assert_eq!(ids.len(), h["tokens"].as_u64().unwrap() as usize);
    let par = mamba_runtime::parallel::RayonParallel::new(0).unwrap();
    let mut s = Session::new(&m, &par, 1).unwrap();
    let rows = s.prefill(&[&ids], &[0], LogitsMode::All).unwrap().remove(0);
    let v = m.cfg.vocab_size;
    // Token 0 is context only; the loss is over tokens 1..n-1, as at training time.
    let nats: f64 = (1..ids.len())
        .map(|i| -(token_logprob(&rows[(i - 1) * v..i * v], v, ids[i], 0).logprob as f64))
        .sum();
    let bytes = h["scored_bytes"].as_f64().unwrap();
    let bpb = nats / std::f64::consts::LN_2 / bytes;
    let reported = h["bits_per_byte"].as_f64().unwrap();
    eprintln!(
        "held-out: {bpb:.5} bits/byte (reported {reported:.5}), perplexity {:.4}",
        (nats / (ids.len() - 1) as f64).exp()
    );
    assert!(bpb <= reported * 1.0005, "bits/byte {bpb} above the reported {reported}");
    assert!(bpb >= reported * 0.9995, "bits/byte {bpb} suspiciously below the reported {reported}");
}
