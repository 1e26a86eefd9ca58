//! Measuring prefill and decode speed of a loaded model.
//!
//! [`run`] times, through a [`Session`]:
//! - prefill: `batch` prompts of `prompt_tokens` seeded token ids as one
//!   [`Session::prefill`] call (ragged batch, last-position logits; the
//!   session cuts it in chunks of [`crate::session::DEFAULT_CHUNK_TOKENS`]);
//! - decode: `gen_tokens` batched steps of the `batch` sequences, greedy
//!   (the argmax is part of the timed loop).
//!
//! Each is run `repeats` times after a short warm-up; the median is reported.
//! Decode costs the same at any position (the state has a fixed size), so the
//! decode repeats simply continue the same sequences.

use std::time::{Duration, Instant};

use mamba_core::{Parallel, Tensor};
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::sampling::{argmax, Rng};
use crate::session::{LogitsMode, Session};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchConfig {
    /// Tokens of each prompt.
    pub prompt_tokens: usize,
    /// Decode steps.
    pub gen_tokens: usize,
    /// Sequences run together.
    pub batch: usize,
    /// Timed runs of each phase (the median is reported).
    pub repeats: usize,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig { prompt_tokens: 128, gen_tokens: 32, batch: 1, repeats: 3 }
    }
}

/// The measured speeds and the sizes behind them.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchReport {
    pub model: String,
    pub dtype: &'static str,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub batch: usize,
    /// Prompt tokens (all sequences) per second.
    pub prefill_tok_s: f64,
    /// Generated tokens (all sequences) per second.
    pub decode_tok_s: f64,
    /// Stored weight bytes ([`LoadedModel::weight_bytes`]).
    pub weight_bytes: usize,
    /// Weight bytes one decode step reads at batch 1: every layer, norm_f,
    /// the lm head (the embedding when tied) and, untied, one embedding row.
    /// A is counted as the f32 table the kernels read.
    pub decode_bytes_per_token: usize,
    /// `decode_bytes_per_token` per decode step, per second, in GB/s (1e9):
    /// a step reads the weights once whatever the batch.
    pub decode_gb_s: f64,
    /// Recurrent state of one sequence (independent of its length).
    pub state_bytes_per_seq: usize,
}

/// Weight bytes a decode step reads at batch 1 (see [`BenchReport::decode_bytes_per_token`]).
pub fn decode_bytes_per_token(model: &LoadedModel) -> Result<usize> {
    let v = model.view()?;
    let m = v.model();
    let b = |t: &Tensor<'_>| t.nbytes();
    let layers: usize = m.layers.iter().flat_map(|l| l.each()).map(Tensor::nbytes).sum();
    let lookup = if m.lm_head.is_some() { m.embedding.cols * m.embedding.dtype().size() } else { 0 };
    Ok(layers + b(&m.norm_f) + b(m.head()) + lookup)
}

fn median(mut t: Vec<Duration>) -> Duration {
    t.sort();
    let n = t.len();
    if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2
    }
}

fn per_sec(amount: f64, t: Duration) -> f64 {
    let s = t.as_secs_f64();
    if s > 0.0 {
        amount / s
    } else {
        f64::INFINITY
    }
}

/// Measure `model` on the CPU backend with `par`.
pub fn run(model: &LoadedModel, par: &dyn Parallel, cfg: &BenchConfig) -> Result<BenchReport> {
    if cfg.batch == 0 || cfg.prompt_tokens == 0 || cfg.repeats == 0 {
        return Err(Error::Input("bench: batch, prompt tokens and repeats must be at least 1".into()));
    }
    let vocab = model.sample_vocab();
    let mut rng = Rng::new(0x006d_616d_6261);
    let prompts: Vec<Vec<u32>> = (0..cfg.batch)
        .map(|_| (0..cfg.prompt_tokens).map(|_| (rng.next_u64() % vocab as u64) as u32).collect())
        .collect();
    let seqs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let slots: Vec<usize> = (0..cfg.batch).collect();
    let mut session = Session::new(model, par, cfg.batch)?;

    // Warm-up: a short prefill and a step touch every weight (page in a
    // memory-mapped checkpoint) before anything is timed.
    let short: Vec<&[u32]> = seqs.iter().map(|s| &s[..s.len().min(8)]).collect();
    session.prefill(&short, &slots, LogitsMode::Last)?;
    session.step(&vec![0; cfg.batch], &slots)?;

    let mut times = Vec::with_capacity(cfg.repeats);
    let mut last = vec![];
    for _ in 0..cfg.repeats {
        for &s in &slots {
            session.reset(s)?;
        }
        let t0 = Instant::now();
        last = session.prefill(&seqs, &slots, LogitsMode::Last)?;
        times.push(t0.elapsed());
    }
    let prefill = median(times);

    let mut next: Vec<u32> = last.iter().map(|row| argmax(&row[..vocab]) as u32).collect();
    let mut times = Vec::with_capacity(cfg.repeats);
    for _ in 0..cfg.repeats {
        let t0 = Instant::now();
        for _ in 0..cfg.gen_tokens {
            let logits = session.step(&next, &slots)?;
            let width = logits.len() / cfg.batch;
            for (t, row) in next.iter_mut().zip(logits.chunks_exact(width)) {
                *t = argmax(&row[..vocab]) as u32;
            }
        }
        times.push(t0.elapsed());
    }
    let decode = median(times);

    let bytes_per_step = decode_bytes_per_token(model)?;
    let (decode_tok_s, decode_gb_s) = if cfg.gen_tokens == 0 {
        (0.0, 0.0)
    } else {
        let steps = cfg.gen_tokens as f64;
        (per_sec(steps * cfg.batch as f64, decode), per_sec(steps * bytes_per_step as f64, decode) / 1e9)
    };
    Ok(BenchReport {
        model: model.dir.display().to_string(),
        dtype: model.dtype.name(),
        threads: par.threads(),
        prompt_tokens: cfg.prompt_tokens,
        gen_tokens: cfg.gen_tokens,
        batch: cfg.batch,
        prefill_tok_s: per_sec((cfg.batch * cfg.prompt_tokens) as f64, prefill),
        decode_tok_s,
        weight_bytes: model.weight_bytes(),
        decode_bytes_per_token: bytes_per_step,
        decode_gb_s,
        state_bytes_per_seq: model.cfg.footprint().state_bytes_per_seq(),
    })
}

impl BenchReport {
    /// Every field, by name.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "model": self.model,
            "dtype": self.dtype,
            "threads": self.threads,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "batch": self.batch,
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
            "weight_bytes": self.weight_bytes,
            "decode_bytes_per_token": self.decode_bytes_per_token,
            "decode_gb_s": self.decode_gb_s,
            "state_bytes_per_seq": self.state_bytes_per_seq,
        })
    }

    /// The column names of [`table_line`](Self::table_line).
    pub fn table_header() -> String {
        format!(
            "{:<24} {:>5} {:>3} {:>6} {:>5} {:>5} {:>12} {:>11} {:>11} {:>10} {:>9}",
            "model",
            "dtype",
            "thr",
            "prompt",
            "gen",
            "batch",
            "prefill t/s",
            "decode t/s",
            "decode GB/s",
            "weights MB",
            "state KiB"
        )
    }

    /// One row: the setup, both speeds and the sizes.
    pub fn table_line(&self) -> String {
        format!(
            "{:<24} {:>5} {:>3} {:>6} {:>5} {:>5} {:>12.1} {:>11.2} {:>11.2} {:>10.1} {:>9.1}",
            self.model,
            self.dtype,
            self.threads,
            self.prompt_tokens,
            self.gen_tokens,
            self.batch,
            self.prefill_tok_s,
            self.decode_tok_s,
            self.decode_gb_s,
            self.weight_bytes as f64 / 1e6,
            self.state_bytes_per_seq as f64 / 1024.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{synthetic_model, Shape};
    use mamba_core::{DType, Sequential};

    const TINY: Shape = Shape { name: "tiny", d_model: 32, n_layer: 2, vocab_size: 100 };

    #[test]
    fn bench_a_tiny_model() {
        let cfg = BenchConfig { prompt_tokens: 9, gen_tokens: 4, batch: 3, repeats: 2 };
        for dtype in [DType::F32, DType::BF16] {
            let m = synthetic_model(&TINY, dtype, 3).unwrap();
            let r = run(&m, &Sequential, &cfg).unwrap();
            assert_eq!((r.threads, r.batch, r.prompt_tokens, r.gen_tokens), (1, 3, 9, 4));
            assert_eq!(r.dtype, dtype.name());
            assert!(r.prefill_tok_s.is_finite() && r.prefill_tok_s > 0.0);
            assert!(r.decode_tok_s.is_finite() && r.decode_tok_s > 0.0);
            assert!(r.decode_gb_s > 0.0);
            // Tied: a step reads every weight, A as f32 (stored as A_log in `dtype`).
            let a_f32 = TINY.n_layer * TINY.d_inner() * 16 * 4;
            let a_stored = TINY.n_layer * TINY.d_inner() * 16 * dtype.size();
            assert_eq!(r.decode_bytes_per_token, r.weight_bytes - a_stored + a_f32);
            assert_eq!(r.weight_bytes, m.parameter_count() * dtype.size());
            assert_eq!(r.state_bytes_per_seq, 2 * 64 * (4 + 16) * 4);
            let j = r.to_json();
            assert_eq!(j["batch"], 3);
            assert_eq!(j["model"], "synthetic:tiny");
            assert!(j["decode_gb_s"].as_f64().unwrap() > 0.0);
            assert!(r.table_line().starts_with("synthetic:tiny"));
            assert_eq!(
                BenchReport::table_header().split_whitespace().count(),
                r.table_line().split_whitespace().count() + 5
            );
        }
    }

    #[test]
    fn zero_sizes_are_refused() {
        let m = synthetic_model(&TINY, DType::F32, 3).unwrap();
        let cfg = BenchConfig { batch: 0, ..BenchConfig::default() };
        assert!(run(&m, &Sequential, &cfg).is_err());
        let cfg = BenchConfig { gen_tokens: 0, prompt_tokens: 4, repeats: 1, batch: 1 };
        let r = run(&m, &Sequential, &cfg).unwrap();
        assert_eq!(r.decode_tok_s, 0.0);
    }
}
