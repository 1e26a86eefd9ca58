//! Where a model runs: the CPU backend or a CUDA device (crate `mamba-cuda`).
//!
//! [`AnySession`] has the CPU [`Session`]'s methods, so the engine (and
//! through it `generate` and `serve`) runs on either. [`bench_cuda`] times
//! prefill and decode on the device with sampling on the device.
//!
//! On a machine without CUDA, opening [`Device::Cuda`] is an error that
//! names what is missing (the driver, NVRTC, cuBLAS or the headers).

use std::time::{Duration, Instant};

use mamba_core::Parallel;
use mamba_cuda::{CudaBackend, CudaSession};
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::session::{LogitsMode, Session};

/// A place to run a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// CUDA device by index.
    Cuda(usize),
}

impl Device {
    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Device> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => t
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::Input(format!("--device `{s}`: expected cpu, cuda or cuda:N"))),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(i) => format!("cuda:{i}"),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

fn cuda_err(e: mamba_cuda::CudaError) -> Error {
    Error::Input(format!("CUDA: {e}"))
}

/// Open CUDA device `index` (driver, kernels, cuBLAS).
pub fn open_cuda(index: usize) -> Result<CudaBackend> {
    CudaBackend::new(index).map_err(cuda_err)
}

/// A CUDA session and the host copy of its last logits.
pub struct CudaRun {
    session: CudaSession,
    logits: Vec<f32>,
}

/// A [`Session`] on the CPU or a CUDA device, with the CPU session's methods.
// One per engine, built once and never moved in a loop: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
pub enum AnySession<'m> {
    Cpu(Session<'m>),
    Cuda(CudaRun),
}

impl<'m> AnySession<'m> {
    /// `n_slots` zeroed state slots for `model` on `device`.
    pub fn new(
        model: &'m LoadedModel,
        par: &'m dyn Parallel,
        n_slots: usize,
        device: Device,
    ) -> Result<Self> {
        match device {
            Device::Cpu => Ok(AnySession::Cpu(Session::new(model, par, n_slots)?)),
            Device::Cuda(i) => {
                let backend = open_cuda(i)?;
                let view = model.view()?;
                let session = CudaSession::new(backend, &view.model(), n_slots).map_err(cuda_err)?;
                Ok(AnySession::Cuda(CudaRun { session, logits: vec![] }))
            }
        }
    }

    pub fn cfg(&self) -> &mamba_core::MambaConfig {
        match self {
            AnySession::Cpu(s) => s.cfg(),
            AnySession::Cuda(c) => c.session.cfg(),
        }
    }

    /// Tokens per prefill chunk.
    pub fn set_chunk_tokens(&mut self, n: usize) {
        match self {
            AnySession::Cpu(s) => s.chunk_tokens = n,
            AnySession::Cuda(c) => c.session.chunk_tokens = n,
        }
    }

    pub fn reset(&mut self, slot: usize) -> Result<()> {
        match self {
            AnySession::Cpu(s) => s.reset(slot),
            AnySession::Cuda(c) => c.session.reset(slot).map_err(cuda_err),
        }
    }

    /// A copy of a slot's whole state.
    pub fn slot_state(&self, slot: usize) -> Result<Vec<f32>> {
        match self {
            AnySession::Cpu(s) => Ok(s.slot_state(slot)?.to_vec()),
            AnySession::Cuda(c) => c.session.slot_state(slot).map_err(cuda_err),
        }
    }

    pub fn set_slot_state(&mut self, slot: usize, state: &[f32]) -> Result<()> {
        match self {
            AnySession::Cpu(s) => s.set_slot_state(slot, state),
            AnySession::Cuda(c) => c.session.set_slot_state(slot, state).map_err(cuda_err),
        }
    }

    pub fn copy_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        match self {
            AnySession::Cpu(s) => s.copy_slot(src, dst),
            AnySession::Cuda(c) => c.session.copy_slot(src, dst).map_err(cuda_err),
        }
    }

    /// See [`Session::prefill`].
    pub fn prefill(&mut self, seqs: &[&[u32]], slots: &[usize], mode: LogitsMode) -> Result<Vec<Vec<f32>>> {
        match self {
            AnySession::Cpu(s) => s.prefill(seqs, slots, mode),
            AnySession::Cuda(c) => c.session.prefill(seqs, slots, mode).map_err(cuda_err),
        }
    }

    /// See [`Session::forward`].
    pub fn forward(
        &mut self,
        tokens: &[u32],
        offsets: &[usize],
        slots: &[usize],
        logit_rows: &[usize],
    ) -> Result<&[f32]> {
        match self {
            AnySession::Cpu(s) => s.forward(tokens, offsets, slots, logit_rows),
            AnySession::Cuda(c) => {
                c.logits = c.session.forward(tokens, offsets, slots, logit_rows).map_err(cuda_err)?;
                Ok(&c.logits)
            }
        }
    }

    /// See [`Session::step`].
    pub fn step(&mut self, tokens: &[u32], slots: &[usize]) -> Result<&[f32]> {
        match self {
            AnySession::Cpu(s) => s.step(tokens, slots),
            AnySession::Cuda(c) => {
                c.logits = c.session.step(tokens, slots).map_err(cuda_err)?;
                Ok(&c.logits)
            }
        }
    }
}

/// One `mamba-rs bench --device cuda` measurement.
#[derive(Clone, Debug)]
pub struct CudaBenchReport {
    pub device: String,
    pub batch: usize,
    /// Tokens of the prefill prompt (one sequence).
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Prompt tokens per second of one `prompt_tokens` prefill.
    pub prefill_tok_s: f64,
    /// Generated tokens (all sequences) per second, greedy sampling on the device.
    pub decode_tok_s: f64,
    /// The same through CUDA graphs ([`CudaSession::step_greedy_graph`]), when asked for:
    /// tokens/s, or why it failed.
    pub decode_graph: Option<std::result::Result<f64, String>>,
    /// Weight bytes one decode step reads (every layer and the head).
    pub step_weight_bytes: usize,
    /// `batch * bandwidth / step_weight_bytes`: decode tokens/s if a step cost only its weight reads.
    pub decode_bound_tok_s: f64,
}

impl CudaBenchReport {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "device": self.device,
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "prefill_tokens_per_s": self.prefill_tok_s,
            "decode_tokens_per_s": self.decode_tok_s,
            "step_weight_bytes": self.step_weight_bytes,
            "decode_bound_tokens_per_s": self.decode_bound_tok_s,
            "decode_fraction_of_bound": self.decode_tok_s / self.decode_bound_tok_s.max(1e-9),
            "decode_graph_tokens_per_s": self.decode_graph.as_ref().and_then(|r| r.as_ref().ok()),
            "decode_graph_error": self.decode_graph.as_ref().and_then(|r| r.as_ref().err()),
        })
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(0.0, Duration::as_secs_f64)
}

/// Bench `model` on CUDA device `index` for each of `batches`: one prefill of
/// `prompt_tokens` (batch 1, measured once per call and reported on every
/// line), then `gen_tokens` greedy steps of `batch` sequences, each phase
/// `repeats` times (median). `bandwidth` (bytes/s) sets the decode bound.
/// Decode sequences start from copies of the prefilled state (a step costs
/// the same at any position). With `graphs`, decode is timed a second time
/// through CUDA graphs.
#[allow(clippy::too_many_arguments)]
pub fn bench_cuda(
    model: &LoadedModel,
    index: usize,
    batches: &[usize],
    prompt_tokens: usize,
    gen_tokens: usize,
    repeats: usize,
    bandwidth: f64,
    graphs: bool,
) -> Result<Vec<CudaBenchReport>> {
    let max_batch = batches.iter().copied().max().unwrap_or(1).max(1);
    if prompt_tokens == 0 || repeats == 0 {
        return Err(Error::Input("bench: prompt tokens and repeats must be at least 1".into()));
    }
    let backend = open_cuda(index)?;
    let device = format!("{} ({})", backend.device_name(), backend.arch());
    let view = model.view()?;
    let mut s = CudaSession::new(backend, &view.model(), max_batch).map_err(cuda_err)?;
    s.chunk_tokens = prompt_tokens.clamp(1, 8192);
    let vocab = model.sample_vocab();
    let prompt: Vec<u32> =
        (0..prompt_tokens as u64).map(|i| ((i * 7919 + 13) % vocab as u64) as u32).collect();
    // Warm-up: kernels loaded, cuBLAS heuristics and scratch at their largest.
    s.prefill(&[&prompt[..prompt.len().min(16)]], &[0], mamba_cuda::LogitsMode::Last).map_err(cuda_err)?;
    let mut times = vec![];
    for _ in 0..repeats {
        s.reset(0).map_err(cuda_err)?;
        let t0 = Instant::now();
        s.prefill(&[&prompt], &[0], mamba_cuda::LogitsMode::Last).map_err(cuda_err)?;
        times.push(t0.elapsed());
    }
    let prefill_tok_s = prompt_tokens as f64 / median(times).max(1e-12);
    let first = s.argmax_last_logits(1, vocab).map_err(cuda_err)?[0];
    let step_bytes = s.model().step_weight_bytes();
    let mut out = vec![];
    for &batch in batches {
        let slots: Vec<usize> = (0..batch).collect();
        for &slot in &slots[1..] {
            s.copy_slot(0, slot).map_err(cuda_err)?;
        }
        let mut next = vec![first; batch];
        next = s.step_greedy(&next, &slots, vocab).map_err(cuda_err)?; // warm-up at this batch
        let mut times = vec![];
        for _ in 0..repeats {
            let t0 = Instant::now();
            for _ in 0..gen_tokens {
                next = s.step_greedy(&next, &slots, vocab).map_err(cuda_err)?;
            }
            times.push(t0.elapsed());
        }
        let decode = median(times);
        let rate = |secs: f64| if secs > 0.0 { (gen_tokens * batch) as f64 / secs } else { 0.0 };
        let decode_graph = graphs.then(|| {
            let mut times = vec![];
            // Two warm-up steps: the eager one that captures, then a first replay.
            for _ in 0..2 {
                next = s.step_greedy_graph(&next, &slots, vocab).map_err(|e| e.to_string())?;
            }
            for _ in 0..repeats {
                let t0 = Instant::now();
                for _ in 0..gen_tokens {
                    next = s.step_greedy_graph(&next, &slots, vocab).map_err(|e| e.to_string())?;
                }
                times.push(t0.elapsed());
            }
            Ok(rate(median(times)))
        });
        out.push(CudaBenchReport {
            device: device.clone(),
            batch,
            prompt_tokens,
            gen_tokens,
            prefill_tok_s,
            decode_tok_s: rate(decode),
            decode_graph,
            step_weight_bytes: step_bytes,
            decode_bound_tok_s: batch as f64 * bandwidth / step_bytes.max(1) as f64,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse(" CUDA ").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = Device::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }
}
