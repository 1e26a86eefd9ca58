//! `mamba-rs logits`: logits of several sequences, run as one ragged batch,
//! through the prefill path or (`--step`) the single-token step path.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Args;
use mamba_runtime::device::AnySession;
use mamba_runtime::session::LogitsMode;
use serde_json::json;

use super::{parse_ids, DeviceArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// A sequence of token ids, e.g. `1,2,3`; repeat for more sequences.
    #[arg(long, required = true)]
    pub ids: Vec<String>,
    /// One row per position instead of the last position only.
    #[arg(long, conflicts_with = "last")]
    pub all: bool,
    /// The rows of the last N positions.
    #[arg(long)]
    pub last: Option<usize>,
    /// Feed every token through the single-token step path.
    #[arg(long)]
    pub step: bool,
    /// Prefill chunk size in tokens (all sequences together).
    #[arg(long, default_value_t = mamba_runtime::session::DEFAULT_CHUNK_TOKENS)]
    pub chunk: usize,
}

pub fn run(a: LogitsArgs) -> Result<()> {
    let seqs = a.ids.iter().map(|s| parse_ids(s)).collect::<Result<Vec<_>>>()?;
    let device = a.device.device_for(&a.model)?;
    let model = a.model.load()?;
    let par = a.model.parallel()?;
    let n = seqs.len();
    let mut session = AnySession::new(&model, &par, n, device)?;
    session.set_chunk_tokens(a.chunk.max(1));
    let v = model.cfg.vocab_size;
    let slots: Vec<usize> = (0..n).collect();
    let mode = match (a.all, a.last) {
        (true, _) => LogitsMode::All,
        (false, Some(0)) => anyhow::bail!("--last must be at least 1"),
        (false, Some(n)) => LogitsMode::LastN(n),
        (false, None) => LogitsMode::Last,
    };
    let rows: Vec<Vec<f32>> = if a.step {
        step_all(&mut session, &seqs, mode)?
    } else {
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        session.prefill(&refs, &slots, mode).context("prefill")?
    };
    let mut out = std::io::stdout().lock();
    for (ids, flat) in seqs.iter().zip(rows) {
        let logits: Vec<&[f32]> = flat.chunks(v).collect();
        writeln!(out, "{}", json!({ "ids": ids, "logits": logits }))?;
    }
    Ok(())
}

/// Feed position `t` of every sequence still running as one batched step.
fn step_all(session: &mut AnySession<'_>, seqs: &[Vec<u32>], mode: LogitsMode) -> Result<Vec<Vec<f32>>> {
    let v = session.cfg().vocab_size;
    let mut out: Vec<Vec<f32>> = vec![vec![]; seqs.len()];
    let longest = seqs.iter().map(Vec::len).max().unwrap_or(0);
    for t in 0..longest {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| t < seqs[i].len()).collect();
        let toks: Vec<u32> = live.iter().map(|&i| seqs[i][t]).collect();
        let logits = session.step(&toks, &live).with_context(|| format!("step at position {t}"))?;
        for (row, &i) in live.iter().enumerate() {
            let keep = match mode {
                LogitsMode::All => true,
                LogitsMode::Last => t + 1 == seqs[i].len(),
                LogitsMode::LastN(n) => t + n >= seqs[i].len(),
            };
            if keep {
                out[i].extend_from_slice(&logits[row * v..(row + 1) * v]);
            }
        }
    }
    Ok(out)
}
