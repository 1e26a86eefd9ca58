//! `mamba-rs convert` (another dtype, or the same one on cache lines),
//! `mamba-rs quantize` (Q8_0 checkpoint) and `mamba-rs perplexity`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use mamba_core::DType;
use mamba_runtime::convert::{convert_model, Summary, Target};
use mamba_runtime::eval::{self, Comparison, DEFAULT_WINDOW};
use mamba_runtime::model::LoadedModel;
use mamba_runtime::sampling::Rng;
use mamba_runtime::session::Session;
use mamba_runtime::tokenizer::Tokenizer;
use serde_json::json;

use super::ModelArgs;

/// Where to write a copy of a model, and what to check it on.
#[derive(Args, Debug)]
pub struct WriteArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Directory to write the model into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite a model already in --out.
    #[arg(long)]
    pub force: bool,
    /// Held-out text to report perplexity on, before and after (tokenized with
    /// the model's tokenizer). Without it, the logits are compared on seeded
    /// random token ids.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Score at most this many tokens of the evaluation text.
    #[arg(long, default_value_t = 4096)]
    pub eval_tokens: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub write: WriteArgs,
    /// Cast every float tensor to f32, f16 or bf16 (default: keep each tensor's dtype).
    #[arg(long)]
    pub dtype: Option<String>,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to score (tokenized with the model's tokenizer).
    #[arg(long)]
    pub file: PathBuf,
    /// Score at most this many tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
    /// Tokens per prefill window; the state carries across windows.
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    pub window: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The token ids of `file` under `model`'s tokenizer, at most `max` (0 = all).
fn text_ids(model: &LoadedModel, file: &Path, max: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let Some(tok) = Tokenizer::from_dir(&model.dir)? else {
        bail!("{}: no tokenizer.json, so text cannot be scored", model.dir.display());
    };
    let mut ids = tok.encode(&text)?;
    if max > 0 {
        ids.truncate(max);
    }
    if ids.len() < 2 {
        bail!("{}: {} token(s); scoring needs at least 2", file.display(), ids.len());
    }
    Ok(ids)
}

pub fn run_quantize(a: QuantizeArgs) -> Result<()> {
    write_copy(&a.write, Target::Q8_0)
}

pub fn run_convert(a: ConvertArgs) -> Result<()> {
    let target = match a.dtype.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Target::AsStored,
        Some("f32" | "float32") => Target::Float(DType::F32),
        Some("f16" | "float16") => Target::Float(DType::F16),
        Some("bf16" | "bfloat16") => Target::Float(DType::BF16),
        Some("q8" | "q8_0") => bail!("--dtype q8: use `mamba-rs quantize` for Q8_0"),
        Some(other) => bail!("--dtype: unknown dtype `{other}` (f32, f16, bf16)"),
    };
    write_copy(&a.write, target)
}

/// Write the copy, load it back, and compare its logits with the source's.
fn write_copy(a: &WriteArgs, target: Target) -> Result<()> {
    let src = a.model.load()?;
    let t0 = std::time::Instant::now();
    let sum = convert_model(&src, &a.out, target, a.force).context("writing the copy")?;
    let secs = t0.elapsed().as_secs_f64();
    let q = LoadedModel::load_dir(&a.out)
        .with_context(|| format!("loading the result from {}", a.out.display()))?;
    let (ids, what) = match &a.eval {
        Some(f) => (text_ids(&src, f, a.eval_tokens)?, f.display().to_string()),
        None => {
            let mut rng = Rng::new(0);
            let v = src.sample_vocab() as u64;
            ((0..256).map(|_| (rng.next_u64() % v) as u32).collect(), "256 seeded random token ids".into())
        }
    };
    let par = a.model.parallel()?;
    let mut s_src = Session::new(&src, &par, 1)?;
    let mut s_q = Session::new(&q, &par, 1)?;
    let c = eval::compare(&mut s_src, &mut s_q, &ids, DEFAULT_WINDOW)?;
    report(a, target, &sum, secs, &what, &c)
}

fn report(a: &WriteArgs, target: Target, sum: &Summary, secs: f64, what: &str, c: &Comparison) -> Result<()> {
    let (p0, p1) = (c.reference.perplexity(), c.other.perplexity());
    if a.json {
        let key = if target == Target::Q8_0 { "quantized_tensors" } else { "converted_tensors" };
        let mut v = json!({
            "out": a.out.display().to_string(),
            "kept_tensors": sum.kept,
            "not_quantized_matrices": sum.skipped,
            "bytes_in": sum.bytes_in,
            "bytes_out": sum.bytes_out,
            "seconds": secs,
            "eval": what,
            "eval_tokens": c.reference.tokens,
            "perplexity_before": p0,
            "perplexity_after": p1,
            "perplexity_change": p1 / p0 - 1.0,
            "max_abs_logit_diff": c.max_abs_logit_diff,
            "mean_abs_logit_diff": c.mean_abs_logit_diff,
            "top1_agreement": c.top1_agree as f64 / c.reference.tokens.max(1) as f64,
        });
        v[key] = sum.converted.into();
        println!("{v}");
        return Ok(());
    }
    let mb = |b: usize| b as f64 / 1e6;
    let done = match target {
        Target::Q8_0 => format!("{} matrices as Q8_0, {} tensors kept", sum.converted, sum.kept),
        Target::Float(to) => format!("{} tensors cast to {}, {} kept", sum.converted, to.name(), sum.kept),
        Target::AsStored => format!("{} tensors as stored, on cache lines", sum.kept),
    };
    println!(
        "wrote {}: {done}, {:.1} MB -> {:.1} MB in {secs:.1} s",
        a.out.display(),
        mb(sum.bytes_in),
        mb(sum.bytes_out)
    );
    if !sum.skipped.is_empty() {
        println!("not quantized (rows not whole 32-weight blocks): {}", sum.skipped.join(", "));
    }
    println!(
        "on {what} ({} positions): perplexity {p0:.4} -> {p1:.4} ({:+.3}%); |logit diff| max {:.4}, mean {:.5}; \
         top-1 agreement {:.2}%",
        c.reference.tokens,
        (p1 / p0 - 1.0) * 100.0,
        c.max_abs_logit_diff,
        c.mean_abs_logit_diff,
        100.0 * c.top1_agree as f64 / c.reference.tokens.max(1) as f64
    );
    Ok(())
}

pub fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    let m = a.model.load()?;
    let ids = text_ids(&m, &a.file, a.max_tokens)?;
    let par = a.model.parallel()?;
    let mut s = Session::new(&m, &par, 1)?;
    let t0 = std::time::Instant::now();
    let sc = eval::score(&mut s, &ids, a.window)?;
    let secs = t0.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0);
    if a.json {
        let v = json!({
            "file": a.file.display().to_string(),
            "tokens_scored": sc.tokens,
            "nats": sc.nats,
            "perplexity": sc.perplexity(),
            "dtype": m.dtype.name(),
            "seconds": secs,
        });
        println!("{v}");
    } else {
        println!(
            "{}: {} tokens scored ({} bytes of text), perplexity {:.4} ({:.4} nats/token), {} weights, {secs:.1} s",
            a.file.display(),
            sc.tokens,
            bytes,
            sc.perplexity(),
            sc.nats / sc.tokens.max(1) as f64,
            m.dtype.name()
        );
    }
    Ok(())
}
