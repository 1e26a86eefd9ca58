//! Generating a continuation of one prompt: prefill, then sample and step
//! until a stop token or the token budget.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::sampling::{Sampler, SamplingParams};
use crate::session::{LogitsMode, Session};

/// What ends a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end the generation (EOS); the stop token is kept in the output.
    pub stop_ids: Vec<u32>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was produced.
    Stop,
    /// `max_tokens` were produced.
    Length,
    /// The caller cancelled the request.
    Cancelled,
    /// The request failed; the error says why.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Error => "error",
        }
    }
}

/// The result of [`generate`], with timings.
#[derive(Clone, Debug)]
pub struct GenerateOutput {
    pub generated: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Seconds of the prompt prefill (and first token's sampling).
    pub prefill_secs: f64,
    /// Seconds of the decode steps after the first token.
    pub decode_secs: f64,
    pub prompt_tokens: usize,
}

impl GenerateOutput {
    /// Prompt tokens per second.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }
    /// Decode steps per second (tokens after the first).
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.generated.len().saturating_sub(1), self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Generate from `prompt` in `slot` of `session` (the slot is reset first).
/// `on_token` sees each token as it is produced.
pub fn generate(
    session: &mut Session<'_>,
    slot: usize,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerateOutput> {
    if prompt.is_empty() {
        return Err(Error::Input("the prompt is empty: give at least one token".into()));
    }
    params.sampling.validate().map_err(Error::Input)?;
    let vocab = session.model().sample_vocab();
    let mut sampler = Sampler::new(params.sampling.clone());
    session.reset(slot)?;
    let t0 = Instant::now();
    let mut generated = Vec::with_capacity(params.max_tokens);
    let mut finish = FinishReason::Length;
    if params.max_tokens == 0 {
        return Ok(GenerateOutput {
            generated,
            finish_reason: finish,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            prompt_tokens: prompt.len(),
        });
    }
    let last = session.prefill(&[prompt], &[slot], LogitsMode::Last)?;
    let mut tok = sampler.sample(&last[0], vocab);
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        generated.push(tok);
        on_token(tok)?;
        if params.stop_ids.contains(&tok) {
            finish = FinishReason::Stop;
            break;
        }
        if generated.len() >= params.max_tokens {
            break;
        }
        let logits = session.step(&[tok], &[slot])?;
        tok = sampler.sample(logits, vocab);
    }
    Ok(GenerateOutput {
        generated,
        finish_reason: finish,
        prefill_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
        prompt_tokens: prompt.len(),
    })
}
