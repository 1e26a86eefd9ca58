//! `mamba-rs generate`: stream a continuation of a prompt.

use std::io::Write;

use anyhow::{bail, Context, Result};
use clap::Args;
use mamba_runtime::generate::{generate, GenerateParams};
use mamba_runtime::sampling::SamplingParams;
use mamba_runtime::session::Session;
use mamba_runtime::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::json;

use super::{parse_ids, ModelArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "ids")]
    pub prompt: Option<String>,
    /// Prompt as token ids, e.g. `1,2,3`.
    #[arg(long)]
    pub ids: Option<String>,
    /// Most tokens to generate.
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
    /// Random seed (default: from the clock; printed with --json).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Do not stop at the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON line with ids, text and speeds at the end instead of streaming.
    #[arg(long)]
    pub json: bool,
}

/// EOS ids from the configuration, else the tokenizer's end-of-text token
/// (original-layout checkpoints name none in their config).
fn eos_ids(model: &mamba_runtime::model::LoadedModel, tok: Option<&Tokenizer>) -> Vec<u32> {
    let from_config = &model.file_config.eos_token_ids;
    if !from_config.is_empty() {
        return from_config.clone();
    }
    let names = ["<|endoftext|>", "</s>", "<eos>"];
    tok.and_then(|t| names.iter().find_map(|n| t.token_id(n))).into_iter().collect()
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let model = a.model.load()?;
    let par = a.model.parallel()?;
    let tok = Tokenizer::from_dir(&model.dir)?;
    let prompt = match (&a.prompt, &a.ids) {
        (Some(text), None) => {
            let Some(t) = &tok else {
                bail!(
                    "--prompt needs a tokenizer, and {} has no tokenizer.json: pass --ids",
                    model.dir.display()
                )
            };
            t.encode(text)?
        }
        (None, Some(ids)) => parse_ids(ids)?,
        _ => bail!("give a prompt: --prompt TEXT or --ids 1,2,3"),
    };
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        sampling: SamplingParams { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed },
        stop_ids: if a.ignore_eos { vec![] } else { eos_ids(&model, tok.as_ref()) },
    };
    let mut session = Session::new(&model, &par, 1)?;
    let mut out = std::io::stdout().lock();
    let mut stream = tok.as_ref().map(|t| StreamDecoder::new(t, &prompt));
    if !a.json {
        if let Some(text) = &a.prompt {
            write!(out, "{text}")?;
            out.flush()?;
        }
    }
    let result = generate(&mut session, 0, &prompt, &params, |id| {
        if a.json {
            return Ok(());
        }
        let piece = match stream.as_mut() {
            Some(s) => s.push(id)?,
            None => Some(format!("{id} ")),
        };
        if let Some(p) = piece {
            // A closed pipe ends the output, not the program with a panic.
            let _ = write!(out, "{p}").and_then(|_| out.flush());
        }
        Ok(())
    })
    .context("generating")?;
    let (pf, dc) = (result.prefill_tokens_per_s(), result.decode_tokens_per_s());
    if a.json {
        let text = match &tok {
            Some(t) => Some(t.decode(&result.generated)?),
            None => None,
        };
        let line = json!({
            "prompt_ids": prompt,
            "generated_ids": result.generated,
            "text": text,
            "finish_reason": result.finish_reason.as_str(),
            "seed": seed,
            "prompt_tokens": result.prompt_tokens,
            "generated_tokens": result.generated.len(),
            "prefill_tokens_per_s": pf,
            "decode_tokens_per_s": dc,
        });
        writeln!(out, "{line}")?;
    } else {
        writeln!(out)?;
    }
    eprintln!(
        "prefill: {} tokens, {pf:.1} tokens/s | decode: {} tokens, {dc:.1} tokens/s | finish: {}",
        result.prompt_tokens,
        result.generated.len(),
        result.finish_reason.as_str()
    );
    Ok(())
}
