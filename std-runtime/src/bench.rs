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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mamba_core::{Parallel, WData};
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::profile::{OpTime, Profile};
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
    /// After the timed runs, one more prefill and decode with every op
    /// timed ([`BenchReport::profile`]).
    pub profile: bool,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig { prompt_tokens: 128, gen_tokens: 32, batch: 1, repeats: 3, profile: false }
    }
}

/// Where the time of one prefill and of the decode steps went, op by op.
#[derive(Clone, Debug, PartialEq)]
pub struct OpProfile {
    pub prefill: Vec<OpTime>,
    pub decode: Vec<OpTime>,
    /// Decode steps the `decode` times are summed over.
    pub decode_steps: usize,
}

impl OpProfile {
    /// `[{op, calls, ms, share, gb_s}]` per op: milliseconds per pass (a
    /// prefill, or a decode step), share of the ops' total, and the rate the
    /// op read its weights at.
    fn rows(ops: &[OpTime], passes: usize) -> serde_json::Value {
        let total: f64 = ops.iter().map(|o| o.time.as_secs_f64()).sum();
        let passes = passes.max(1) as f64;
        ops.iter()
            .map(|o| {
                let t = o.time.as_secs_f64();
                json!({
                    "op": o.name,
                    "calls": o.calls as f64 / passes,
                    "ms": t * 1e3 / passes,
                    "share": if total > 0.0 { t / total } else { 0.0 },
                    "gb_s": if t > 0.0 { o.weight_bytes as f64 / t / 1e9 } else { 0.0 },
                })
            })
            .collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "prefill": Self::rows(&self.prefill, 1),
            "decode_step": Self::rows(&self.decode, self.decode_steps),
        })
    }

    /// A text table per phase.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for (phase, rows) in [
            ("prefill", Self::rows(&self.prefill, 1)),
            ("decode step", Self::rows(&self.decode, self.decode_steps)),
        ] {
            out += &format!("  {phase:<14} {:>9} {:>10} {:>7} {:>8}\n", "calls", "ms", "share", "GB/s");
            // Op names up to `dt_proj+scan`, aligned under the header.
            for r in rows.as_array().into_iter().flatten() {
                out += &format!(
                    "    {:<12} {:>9.0} {:>10.3} {:>6.1}% {:>8.1}\n",
                    r["op"].as_str().unwrap_or(""),
                    r["calls"].as_f64().unwrap_or(0.0),
                    r["ms"].as_f64().unwrap_or(0.0),
                    100.0 * r["share"].as_f64().unwrap_or(0.0),
                    r["gb_s"].as_f64().unwrap_or(0.0),
                );
            }
            let total: f64 =
                rows.as_array().into_iter().flatten().map(|r| r["ms"].as_f64().unwrap_or(0.0)).sum();
            out += &format!("    {:<12} {:>9} {:>10.3}\n", "total", "", total);
        }
        out
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
    /// How fast the same threads merely read those bytes, GB/s, measured in
    /// this run ([`read_rate_gb_s`]).
    pub read_gb_s: f64,
    /// The batch-1 decode bound that read rate sets: `read_gb_s / bytes per token`.
    pub decode_bound_tok_s: f64,
    /// Batch 1: the share of the bound a decode step reaches, each of
    /// `gen_tokens` more steps held against a read pass right after it
    /// (median over the pairs; `paired_bound_share`).
    pub decode_bound_share: Option<f64>,
    /// Time per op, when asked for ([`BenchConfig::profile`]).
    pub profile: Option<OpProfile>,
}

/// The bytes of every weight a decode step reads at batch 1: every layer,
/// norm_f, the lm head and, untied, one embedding row (the lookup); their
/// sum is [`BenchReport::decode_bytes_per_token`].
fn decode_weights(model: &LoadedModel) -> Result<Vec<&[u8]>> {
    let v = model.view()?;
    let m = v.model();
    let mut out: Vec<&[u8]> =
        m.layers.iter().flat_map(|l| l.each()).flat_map(|t| data_bytes(t.data)).collect();
    out.extend(data_bytes(m.norm_f.data));
    out.extend(data_bytes(m.head().data));
    if m.lm_head.is_some() {
        out.extend(data_bytes(m.embedding.row(0)));
    }
    Ok(out)
}

/// The stored bytes of `d` (Q8_0: the quants, then the scales).
pub(crate) fn data_bytes(d: WData<'_>) -> impl Iterator<Item = &[u8]> {
    let (a, b): (&[u8], &[u8]) = match d {
        WData::F32(d) => (bytemuck::cast_slice(d), &[]),
        WData::F16(d) => (bytemuck::cast_slice(d), &[]),
        WData::BF16(d) => (bytemuck::cast_slice(d), &[]),
        WData::Q8_0 { q, d } => (bytemuck::cast_slice(q), bytemuck::cast_slice(d)),
    };
    [a, b].into_iter().filter(|s| !s.is_empty())
}

/// The rate, in GB/s (1e9), at which the pool's threads can merely read the
/// bytes a decode step reads: the memory-bandwidth bound of batch-1 decode
/// on this machine, measured now (median of three passes).
pub fn read_rate_gb_s(model: &LoadedModel, par: &dyn Parallel) -> Result<f64> {
    Ok(ReadPass::new(model)?.rate_gb_s(par))
}

/// One streaming read of the bytes a decode step reads: each of the pool's
/// threads takes an equal, contiguous share of the pieces (as the products
/// split their rows), cut into [`STREAMS`] runs read side by side, 64
/// bytes of each in turn.
struct ReadPass<'m> {
    pieces: Vec<&'m [u8]>,
    total: usize,
}

/// Runs a thread reads side by side in a [`ReadPass`]: the pattern that
/// read fastest, so the bound is one. Measured (bf16 130m, 258 MB, 2
/// threads, five alternated rounds, GB/s): the threads taking 256 KiB
/// pieces in turn (this pass before) 51.1-52.3, one run each 58.1-68.9,
/// two 63.7-69.4, four 53.3-64.9 (a slow minute: 37.4, 37.3, 38.5, 34.3).
/// Eight or more read slower still. The batch-1 products stream two runs
/// a thread too ([`mamba_core::kernels::linear`]).
const STREAMS: usize = 2;

impl<'m> ReadPass<'m> {
    fn new(model: &'m LoadedModel) -> Result<Self> {
        const PIECE: usize = 256 * 1024;
        let pieces: Vec<&[u8]> = decode_weights(model)?.into_iter().flat_map(|w| w.chunks(PIECE)).collect();
        let total = pieces.iter().map(|p| p.len()).sum();
        Ok(ReadPass { pieces, total })
    }

    fn time(&self, par: &dyn Parallel) -> Duration {
        let sink = AtomicU64::new(0);
        let (n, threads) = (self.pieces.len(), par.threads().max(1));
        let t0 = Instant::now();
        par.for_each_thread(&|t| {
            let mine = &self.pieces[t * n / threads..(t + 1) * n / threads];
            sink.fetch_xor(fold_share(mine), Ordering::Relaxed);
        });
        let t = t0.elapsed();
        std::hint::black_box(sink.load(Ordering::Relaxed));
        t
    }

    /// [`read_rate_gb_s`] over these pieces.
    fn rate_gb_s(&self, par: &dyn Parallel) -> f64 {
        let times: Vec<Duration> = (0..3).map(|_| self.time(par)).collect();
        per_sec(self.total as f64, median(times)) / 1e9
    }
}

/// Batch 1: `steps` decode steps of `session`'s slot 0 from token `next`,
/// each followed by one [`ReadPass`]; the median over the pairs of read
/// time / step time, the share of the bound a step reaches. The bandwidth
/// of a shared machine drifts by a third within minutes (27-41 GB/s), so a
/// bound read once, seconds from the timed steps, moves the share as much;
/// paired, each step is held against a read of the same bytes made
/// milliseconds after it.
fn paired_bound_share(
    session: &mut Session<'_>,
    mut next: u32,
    vocab: usize,
    read: &ReadPass<'_>,
    par: &dyn Parallel,
    steps: usize,
) -> Result<f64> {
    let mut shares = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        let logits = session.step(&[next], &[0])?;
        let step = t0.elapsed();
        next = argmax(&logits[..vocab]) as u32;
        shares.push(read.time(par).as_secs_f64() / step.as_secs_f64().max(1e-12));
    }
    shares.sort_by(f64::total_cmp);
    Ok(shares.get(shares.len() / 2).copied().unwrap_or(0.0))
}

/// XOR of the bytes as 8-byte words: one cheap operation per load, so the
/// loop runs at the speed of memory.
fn fold_words(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    let mut blocks = bytes.chunks_exact(64);
    for b in &mut blocks {
        fold_block(&mut acc, b);
    }
    let tail = blocks.remainder().iter().fold(0u64, |a, &b| a.rotate_left(8) ^ b as u64);
    acc.iter().fold(tail, |a, &b| a ^ b)
}

/// XOR a 64-byte block's eight words into `acc`.
#[inline(always)]
fn fold_block(acc: &mut [u64; 8], block: &[u8]) {
    for (a, w) in acc.iter_mut().zip(block.chunks_exact(8)) {
        *a ^= u64::from_le_bytes(w.try_into().unwrap_or_default());
    }
}

/// A thread's share of a [`ReadPass`]: its pieces cut into [`STREAMS`]
/// runs read side by side, then the pieces left over one by one.
fn fold_share(mine: &[&[u8]]) -> u64 {
    let run = mine.len() / STREAMS;
    let mut acc = 0;
    for j in 0..run {
        acc ^= fold_side_by_side(core::array::from_fn::<_, STREAMS, _>(|r| mine[r * run + j]));
    }
    mine[STREAMS * run..].iter().fold(acc, |a, p| a ^ fold_words(p))
}

/// [`fold_words`] of each of `pieces`, XORed, reading them side by side:
/// 64 bytes of each in turn over their common length, then each one's rest.
fn fold_side_by_side<const S: usize>(pieces: [&[u8]; S]) -> u64 {
    let common = pieces.iter().map(|p| p.len()).min().unwrap_or(0) / 64 * 64;
    let mut acc = [[0u64; 8]; S];
    for at in (0..common).step_by(64) {
        for (a, p) in acc.iter_mut().zip(&pieces) {
            fold_block(a, &p[at..at + 64]);
        }
    }
    let rest = pieces.iter().fold(0, |a, p| a ^ fold_words(&p[common..]));
    acc.iter().flatten().fold(rest, |a, &b| a ^ b)
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
    // The bytes a step reads, gathered once for the paired steps and the bound.
    let read = ReadPass::new(model)?;
    let decode_bound_share = if cfg.batch == 1 && cfg.gen_tokens > 0 {
        Some(paired_bound_share(&mut session, next[0], vocab, &read, par, cfg.gen_tokens)?)
    } else {
        None
    };
    let profile =
        if cfg.profile { Some(profile_passes(&mut session, &seqs, &slots, cfg.gen_tokens)?) } else { None };

    let bytes_per_step = read.total;
    let read_gb_s = read.rate_gb_s(par);
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
        read_gb_s,
        decode_bound_tok_s: read_gb_s * 1e9 / bytes_per_step.max(1) as f64,
        decode_bound_share,
        profile,
    })
}

/// One prefill of `seqs` and `steps` decode steps with every op timed.
fn profile_passes(
    session: &mut Session<'_>,
    seqs: &[&[u32]],
    slots: &[usize],
    steps: usize,
) -> Result<OpProfile> {
    let p = Arc::new(Profile::new());
    session.set_profile(Some(p.clone()));
    let out = (|| {
        for &s in slots {
            session.reset(s)?;
        }
        session.prefill(seqs, slots, LogitsMode::Last)?;
        let prefill = p.ops();
        p.clear();
        let tokens = vec![0; slots.len()];
        for _ in 0..steps {
            session.step(&tokens, slots)?;
        }
        Ok(OpProfile { prefill, decode: p.ops(), decode_steps: steps })
    })();
    session.set_profile(None);
    out
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
            "read_gb_s": self.read_gb_s,
            "decode_bound_tokens_per_s": self.decode_bound_tok_s,
            "decode_bound_share_paired": self.decode_bound_share,
            "profile": self.profile.as_ref().map(OpProfile::to_json),
        })
    }

    /// The column names of [`table_line`](Self::table_line).
    pub fn table_header() -> String {
        format!(
            "{:<24} {:>5} {:>3} {:>6} {:>5} {:>5} {:>12} {:>11} {:>11} {:>9} {:>10} {:>6} {:>10} {:>9}",
            "model",
            "dtype",
            "thr",
            "prompt",
            "gen",
            "batch",
            "prefill t/s",
            "decode t/s",
            "decode GB/s",
            "read GB/s",
            "bound t/s",
            "paired",
            "weights MB",
            "state KiB"
        )
    }

    /// One row: the setup, both speeds and the sizes.
    pub fn table_line(&self) -> String {
        format!(
            "{:<24} {:>5} {:>3} {:>6} {:>5} {:>5} {:>12.1} {:>11.2} {:>11.2} {:>9.2} {:>10.1} {:>6} {:>10.1} {:>9.1}",
            self.model,
            self.dtype,
            self.threads,
            self.prompt_tokens,
            self.gen_tokens,
            self.batch,
            self.prefill_tok_s,
            self.decode_tok_s,
            self.decode_gb_s,
            self.read_gb_s,
            self.decode_bound_tok_s,
            self.decode_bound_share.map_or("-".to_string(), |s| format!("{s:.3}")),
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
        let cfg = BenchConfig { prompt_tokens: 9, gen_tokens: 4, batch: 3, repeats: 2, profile: false };
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
                r.table_line().split_whitespace().count() + 7
            );
            // The bound is the measured read rate over the same bytes.
            assert!(r.read_gb_s > 0.0);
            let bound = r.read_gb_s * 1e9 / r.decode_bytes_per_token as f64;
            assert!((r.decode_bound_tok_s - bound).abs() <= 1e-9 * bound);
            // Steps paired with read passes are a batch-1 measure.
            assert_eq!(
                (r.decode_bound_share, &j["decode_bound_share_paired"]),
                (None, &serde_json::Value::Null)
            );
            let one = run(&m, &Sequential, &BenchConfig { batch: 1, ..cfg }).unwrap();
            let share = one.decode_bound_share.unwrap();
            assert!(share.is_finite() && share > 0.0, "{share}");
            assert_eq!(one.to_json()["decode_bound_share_paired"].as_f64(), Some(share));
            assert!(one.table_line().contains(&format!("{share:.3}")));
            assert!(r.table_line().split_whitespace().any(|c| c == "-"));
        }
    }

    #[test]
    fn a_read_pass_reads_every_byte_of_every_piece() {
        // Pieces of lengths around the 64-byte blocks and none, read side by
        // side: the same words as one piece after another.
        let bytes: Vec<u8> = (0..40_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let lens = [1000, 64, 0, 129, 5000, 63, 7777, 640];
        let mut pieces = Vec::new();
        let mut at = 0;
        for len in lens {
            pieces.push(&bytes[at..at + len]);
            at += len;
        }
        let one_by_one = pieces.iter().fold(0, |a, p| a ^ fold_words(p));
        assert_eq!(fold_side_by_side::<8>(pieces[..].try_into().unwrap()), one_by_one);
        let pair = fold_side_by_side([pieces[4], pieces[6]]);
        assert_eq!(pair, fold_words(pieces[4]) ^ fold_words(pieces[6]));
        // A byte left out changes the fold.
        assert_ne!(fold_side_by_side([pieces[4], &pieces[6][1..]]), pair);
        assert_ne!(fold_side_by_side([pieces[4], &pieces[6][..7776]]), pair);
        // Shares of any count of pieces, as the threads cut them: each piece once.
        for n in 0..=lens.len() {
            let all = pieces[..n].iter().fold(0, |a, p| a ^ fold_words(p));
            for threads in 1..=3 {
                let shares =
                    (0..threads).map(|t| fold_share(&pieces[t * n / threads..(t + 1) * n / threads]));
                assert_eq!(shares.fold(0, |a, f| a ^ f), all, "{n} pieces, {threads} threads");
            }
        }
    }

    #[test]
    fn a_profile_times_every_op_of_a_prefill_and_the_decode_steps() {
        let m = synthetic_model(&TINY, DType::F32, 3).unwrap();
        let cfg = BenchConfig { prompt_tokens: 9, gen_tokens: 5, batch: 2, repeats: 1, profile: true };
        let r = run(&m, &Sequential, &cfg).unwrap();
        let p = r.profile.as_ref().expect("asked for a profile");
        assert_eq!(p.decode_steps, 5);
        let calls = |ops: &[OpTime], name: &str| ops.iter().find(|o| o.name == name).map(|o| o.calls);
        let layers = TINY.n_layer as u64;
        for name in ["in_proj", "conv1d", "x_proj", "dt_proj", "scan", "out_proj"] {
            assert_eq!(calls(&p.prefill, name), Some(layers), "prefill {name}");
        }
        // A step's dt_proj and scan are one op (a backend may run them at once).
        for name in ["in_proj", "conv1d", "x_proj", "dt_proj+scan", "out_proj"] {
            assert_eq!(calls(&p.decode, name), Some(5 * layers), "decode {name}");
        }
        assert_eq!(calls(&p.decode, "scan"), None);
        assert_eq!(calls(&p.prefill, "lm_head"), Some(1));
        assert_eq!(calls(&p.decode, "lm_head"), Some(5));
        assert_eq!(calls(&p.decode, "embed"), Some(5));
        // The products read their whole matrix each call.
        let view = m.view().unwrap();
        let in_proj = view.model().layers[0].in_proj.data.len() as u64 * 4;
        let op = p.decode.iter().find(|o| o.name == "in_proj").unwrap();
        assert_eq!(op.weight_bytes, 5 * layers * in_proj);
        let j = r.to_json();
        let rows = j["profile"]["decode_step"].as_array().unwrap();
        let share: f64 = rows.iter().map(|r| r["share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 1e-9, "shares sum to {share}");
        assert_eq!(rows.iter().find(|r| r["op"] == "in_proj").unwrap()["calls"], layers as f64);
        let table = p.table();
        assert!(table.contains("decode step") && table.contains("lm_head") && table.contains("dt_proj+scan"));
        // The header and every op's row are as long: the columns line up.
        let widths: Vec<usize> = table
            .lines()
            .filter(|l| !l.trim_start().starts_with("total"))
            .map(|l| l.chars().count())
            .collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{table}");
        // Without the flag, no profile.
        let plain = run(&m, &Sequential, &BenchConfig { profile: false, ..cfg }).unwrap();
        assert!(plain.profile.is_none() && plain.to_json()["profile"].is_null());
    }

    #[test]
    fn zero_sizes_are_refused() {
        let m = synthetic_model(&TINY, DType::F32, 3).unwrap();
        let cfg = BenchConfig { batch: 0, ..BenchConfig::default() };
        assert!(run(&m, &Sequential, &cfg).is_err());
        let cfg = BenchConfig { gen_tokens: 0, prompt_tokens: 4, repeats: 1, batch: 1, profile: false };
        let r = run(&m, &Sequential, &cfg).unwrap();
        assert_eq!(r.decode_tok_s, 0.0);
    }
}
