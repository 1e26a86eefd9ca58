//! `mamba-rs generate`: one or many prompts run as one continuous batch,
//! streaming text for a single sequence, or JSON lines in input order.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use mamba_runtime::engine::{Engine, EngineConfig, Event, RequestParams, TokenLogprob};
use mamba_runtime::generate::FinishReason;
use mamba_runtime::model::LoadedModel;
use mamba_runtime::sampling::SamplingParams;
use mamba_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};

use super::{parse_ids, DeviceArgs, ModelArgs, StateArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub state: StateArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Prompt text (needs the model's tokenizer.json); repeat for several prompts.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Prompt as token ids, e.g. `1,2,3`; repeat for several prompts.
    #[arg(long)]
    pub ids: Vec<String>,
    /// A file with one text prompt per line.
    #[arg(long)]
    pub prompts_file: Option<std::path::PathBuf>,
    /// Most tokens to generate per sequence.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens below P times the top token's probability.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalise tokens already seen (HF semantics; 1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Penalise tokens already generated (OpenAI semantics).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Penalise tokens by how often they were generated (OpenAI semantics).
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed (default: from the clock; printed with --json). Sample i uses seed + i.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); the text is cut before it.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Stop at this token id (repeatable), besides EOS.
    #[arg(long)]
    pub stop_id: Vec<u32>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Samples per prompt (they share one prefill through a forked state).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Report the log-prob and the top N alternatives of every generated token (N <= 20).
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// With --logprobs: also the prompt tokens' log-probs.
    #[arg(long, requires = "logprobs")]
    pub echo: bool,
    /// Print one JSON line per sequence, in input order, instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// What the command collects for one sequence.
#[derive(Default)]
struct SeqOut {
    ids: Vec<u32>,
    text: String,
    logprobs: Vec<Value>,
    reason: Option<FinishReason>,
    error: Option<String>,
    first_token: Option<Instant>,
    finished: Option<Instant>,
}

fn lp_json(lp: &TokenLogprob) -> Value {
    let top: Vec<Value> = lp.top.iter().map(|&(t, l)| json!({"token": t, "logprob": l})).collect();
    json!({"token": lp.token, "logprob": lp.logprob, "top": top})
}

/// EOS ids from the configuration, else the tokenizer's end-of-text token
/// (original-layout checkpoints name none in their config).
fn eos_ids(model: &LoadedModel, tok: Option<&Tokenizer>) -> Vec<u32> {
    let from_config = &model.file_config.eos_token_ids;
    if !from_config.is_empty() {
        return from_config.clone();
    }
    let names = ["<|endoftext|>", "</s>", "<eos>"];
    tok.and_then(|t| names.iter().find_map(|n| t.token_id(n))).into_iter().collect()
}

/// The prompts in input order: texts, then id lists, then the file's lines.
fn prompts(
    a: &GenerateArgs,
    tok: Option<&Tokenizer>,
    model: &LoadedModel,
) -> Result<Vec<(Vec<u32>, Option<String>)>> {
    let mut texts = a.prompt.clone();
    if let Some(f) = &a.prompts_file {
        let body =
            std::fs::read_to_string(f).with_context(|| format!("reading --prompts-file {}", f.display()))?;
        texts.extend(body.lines().filter(|l| !l.trim().is_empty()).map(String::from));
    }
    let mut out = vec![];
    if !texts.is_empty() {
        let Some(t) = tok else {
            bail!("--prompt needs a tokenizer, and {} has no tokenizer.json: pass --ids", model.dir.display())
        };
        for text in texts {
            let ids = t.encode(&text)?;
            if ids.is_empty() {
                bail!("the prompt {text:?} encodes to no tokens");
            }
            out.push((ids, Some(text)));
        }
    }
    for s in &a.ids {
        out.push((parse_ids(s)?, None));
    }
    if out.is_empty() {
        bail!("give a prompt: --prompt TEXT or --ids 1,2,3 (repeatable), or --prompts-file FILE");
    }
    Ok(out)
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let device = a.device.device_for(&a.model)?;
    let model = a.model.load()?;
    let par = a.model.parallel()?;
    let tok = Tokenizer::from_dir(&model.dir)?;
    let prompts = prompts(&a, tok.as_ref(), &model)?;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let mut stop_ids = a.stop_id.clone();
    if !a.ignore_eos {
        stop_ids.extend(eos_ids(&model, tok.as_ref()));
    }
    let params = RequestParams {
        max_tokens: a.max_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            seed,
        },
        stop_ids,
        stop: a.stop.clone(),
        logprobs: a.logprobs,
        echo: a.echo,
        n: a.n,
    };
    let total_seqs = prompts.len() * a.n;
    let slots = a.state.slots(&model, total_seqs)?;
    let cfg = EngineConfig { slots, device, ..Default::default() };
    let mut engine = Engine::new(&model, &par, tok.as_ref(), cfg)?;
    let mut ids = Vec::with_capacity(prompts.len());
    for (i, (p, _)) in prompts.iter().enumerate() {
        ids.push(engine.add(p.clone(), params.clone()).with_context(|| format!("prompt {i}"))?);
    }
    // Streaming text is for one sequence; several print when done.
    let stream = !a.json && total_seqs == 1;
    let mut out = std::io::stdout().lock();
    if stream {
        if let Some(text) = &prompts[0].1 {
            write!(out, "{text}")?;
            out.flush()?;
        }
    }
    let mut seqs: std::collections::HashMap<(u64, u32), SeqOut> = Default::default();
    let mut prompt_lps: std::collections::HashMap<u64, Value> = Default::default();
    let t0 = Instant::now();
    engine.run_to_completion(|ev| match ev {
        Event::Token { request, index, token, text, logprob } => {
            let s = seqs.entry((request, index)).or_default();
            s.first_token.get_or_insert_with(Instant::now);
            s.ids.push(token);
            s.text += &text;
            if let Some(lp) = &logprob {
                s.logprobs.push(lp_json(lp));
            }
            if stream {
                let piece = if tok.is_some() { text } else { format!("{token} ") };
                // A closed pipe ends the output, not the program.
                let _ = write!(out, "{piece}").and_then(|_| out.flush());
            }
        }
        Event::Finished { request, index, reason, text, error, .. } => {
            let s = seqs.entry((request, index)).or_default();
            s.text += &text;
            if stream {
                let _ = write!(out, "{text}");
            }
            s.reason = Some(reason);
            s.error = error;
            s.finished = Some(Instant::now());
        }
        Event::PromptLogprobs { request, logprobs } => {
            let v: Vec<Value> = logprobs.iter().map(|l| l.as_ref().map_or(Value::Null, lp_json)).collect();
            prompt_lps.insert(request, Value::Array(v));
        }
    })?;
    let wall = t0.elapsed().as_secs_f64();
    if stream {
        writeln!(out)?;
    }
    let mut generated = 0;
    for (pi, ((prompt, text), id)) in prompts.iter().zip(&ids).enumerate() {
        for i in 0..a.n as u32 {
            let s = seqs.remove(&(*id, i)).unwrap_or_default();
            generated += s.ids.len();
            let ttft = s.first_token.map_or(0.0, |t| (t - t0).as_secs_f64());
            let decode_secs = match (s.first_token, s.finished) {
                (Some(f), Some(e)) => (e - f).as_secs_f64(),
                _ => 0.0,
            };
            let rate = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
            let reason = s.reason.map_or("error", FinishReason::as_str);
            if a.json {
                let mut line = json!({
                    "prompt_index": pi,
                    "index": i,
                    "prompt_ids": prompt,
                    "generated_ids": s.ids,
                    "text": tok.as_ref().map(|_| s.text.clone()),
                    "finish_reason": reason,
                    "seed": seed.wrapping_add(i as u64),
                    "prompt_tokens": prompt.len(),
                    "generated_tokens": s.ids.len(),
                    "time_to_first_token_s": ttft,
                    "prefill_tokens_per_s": rate(prompt.len(), ttft),
                    "decode_tokens_per_s": rate(s.ids.len().saturating_sub(1), decode_secs),
                });
                if a.logprobs.is_some() {
                    line["logprobs"] = Value::Array(s.logprobs);
                }
                if let Some(p) = prompt_lps.get(id) {
                    line["prompt_logprobs"] = p.clone();
                }
                if let Some(e) = &s.error {
                    line["error"] = Value::String(e.clone());
                }
                writeln!(out, "{line}")?;
            } else if !stream {
                let head = text.clone().unwrap_or_else(|| format!("{prompt:?}"));
                let body = if tok.is_some() {
                    s.text
                } else {
                    s.ids.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(" ")
                };
                writeln!(out, "[{pi}.{i}] {head}{body}")?;
                writeln!(out, "[{pi}.{i}] finish: {reason}")?;
            }
            if stream {
                eprintln!(
                    "prefill: {} tokens, {:.1} tokens/s | decode: {} tokens, {:.1} tokens/s | finish: {reason}",
                    prompt.len(),
                    rate(prompt.len(), ttft),
                    s.ids.len(),
                    rate(s.ids.len().saturating_sub(1), decode_secs)
                );
            }
            if let Some(e) = &s.error {
                eprintln!("sequence {pi}.{i} failed: {e}");
            }
        }
    }
    if !stream {
        let prompt_tokens: usize = prompts.iter().map(|p| p.0.len()).sum();
        eprintln!(
            "{total_seqs} sequences in {wall:.2}s: {prompt_tokens} prompt tokens, {generated} generated, {:.1} generated tokens/s",
            generated as f64 / wall.max(1e-9)
        );
    }
    Ok(())
}
