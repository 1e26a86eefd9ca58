//! Command-line interface: argument parsing and one module per subcommand.

mod bench;
mod generate;
mod inspect;
mod logits;
mod quantize;
mod serve;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mamba_core::DType;
use mamba_runtime::device::Device;
use mamba_runtime::model::LoadedModel;
use mamba_runtime::parallel::CpuPool;

/// Run Mamba selective state-space language models.
#[derive(Parser, Debug)]
#[command(name = "mamba-rs", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate text (or token ids) from a prompt, streaming as it goes.
    Generate(Box<generate::GenerateArgs>),
    /// Print logits of one or more sequences as JSON lines (one ragged batch).
    Logits(logits::LogitsArgs),
    /// Measure prefill and decode tokens/s (a checkpoint, or synthetic weights of a published shape).
    Bench(bench::BenchArgs),
    /// Show a model's resolved configuration, size and state memory.
    Inspect(inspect::InspectArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(Box<serve::ServeArgs>),
    /// Write a copy of a model with 8-bit (Q8_0) matrices and report its accuracy.
    Quantize(quantize::QuantizeArgs),
    /// Write a copy of a model as one safetensors file with its tensors on cache lines,
    /// optionally cast to another float dtype, and report its accuracy.
    Convert(quantize::ConvertArgs),
    /// Perplexity of a model on a text file.
    Perplexity(quantize::PerplexityArgs),
}

/// Options shared by every command that loads a model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory, or a Hugging Face repo id (ORG/NAME) already in the local cache.
    /// Defaults to the demo model shipped in `models/`.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Worker threads (0 = one per physical core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// CPU, bf16 weights: multiply with the BF16 dot-product instructions (AVX-512 BF16),
    /// activations rounded to bf16. Faster prefill and batches, at bf16's precision instead
    /// of f32's (the README gives the cost in accuracy).
    #[arg(long)]
    pub bf16_dot: bool,
}

/// Where to run the model.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu`, `cuda` (device 0) or `cuda:N`. CUDA needs the NVIDIA driver, and NVRTC and
    /// cuBLAS 13 on the loader path (LD_LIBRARY_PATH) with the CUDA headers (MAMBA_CUDA_INCLUDE).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArgs {
    pub fn device(&self) -> Result<Device> {
        Ok(Device::parse(&self.device)?)
    }

    /// [`Self::device`], refusing CPU-only options that `model` asks for on
    /// another device (they would change nothing there).
    pub fn device_for(&self, model: &ModelArgs) -> Result<Device> {
        let device = self.device()?;
        if model.bf16_dot && device != Device::Cpu {
            bail!(
                "--bf16-dot switches the CPU's products; --device {} runs its own kernels, which it does not change",
                self.device
            );
        }
        Ok(device)
    }
}

/// How many state slots to keep (one per running sequence).
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// State memory budget, e.g. `512MiB`, `2GiB` (slots = budget / state bytes per sequence).
    #[arg(long)]
    pub state_memory: Option<String>,
    /// State slots, i.e. sequences running at once (default: what the run needs, at most 256).
    #[arg(long, conflicts_with = "state_memory")]
    pub slots: Option<usize>,
}

impl StateArgs {
    /// Slots for a run of `wanted` sequences.
    pub fn slots(&self, model: &LoadedModel, wanted: usize) -> Result<usize> {
        let per = model.cfg.footprint().state_bytes_per_seq();
        let n = match (&self.state_memory, self.slots) {
            (Some(m), _) => {
                let bytes = parse_size(m)?;
                let n = bytes / per.max(1);
                if n == 0 {
                    bail!("--state-memory {m} holds no sequence: one needs {per} bytes");
                }
                n
            }
            (None, Some(0)) => bail!("--slots must be at least 1"),
            (None, Some(n)) => n,
            (None, None) => wanted.clamp(1, 256),
        };
        Ok(n)
    }
}

/// Parse `2GiB`, `512MiB`, `64MB`, `1000000` into bytes.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().with_context(|| format!("`{s}` is not a size like 2GiB or 512MB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        u => bail!("`{s}`: unknown size unit `{u}` (use B, KB, KiB, MB, MiB, GB, GiB)"),
    };
    Ok((v * mult) as usize)
}

/// The demo model's folder in this repository.
fn demo_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("models").join("mamba-demo")
}

impl ModelArgs {
    pub fn load(&self) -> Result<LoadedModel> {
        let spec = match &self.model {
            Some(m) => m.clone(),
            None => {
                let dir = demo_model_dir();
                if !dir.join("config.json").is_file() {
                    bail!("no --model given and the demo model is not at {}", dir.display());
                }
                dir.to_string_lossy().into_owned()
            }
        };
        let model = LoadedModel::load(&spec).with_context(|| format!("loading model `{spec}`"))?;
        self.numerics(model.dtype)?;
        Ok(model)
    }

    /// Switch on the products the options ask for (failing early where
    /// the CPU cannot run them).
    pub fn switch_products(&self) -> Result<()> {
        if self.bf16_dot {
            mamba_runtime::cpu::enable_bf16_dot().context("--bf16-dot")?;
        }
        Ok(())
    }

    /// [`Self::switch_products`] for a model whose matrices are `dtype`.
    pub fn numerics(&self, dtype: DType) -> Result<()> {
        self.switch_products()?;
        if self.bf16_dot && dtype != DType::BF16 {
            eprintln!(
                "note: --bf16-dot changes bf16 products only; this model's matrices are {}",
                dtype.name()
            );
        }
        Ok(())
    }

    pub fn parallel(&self) -> Result<CpuPool> {
        CpuPool::new(self.threads).context("starting the thread pool")
    }
}

/// Parse `1,2,3` into token ids.
pub fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--ids: `{t}` is not a token id (a non-negative integer)"))
        })
        .collect::<Result<Vec<u32>>>()?;
    if ids.is_empty() {
        bail!("--ids: no token ids in `{s}`");
    }
    Ok(ids)
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(*a),
        Command::Logits(a) => logits::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run_cmd(a),
        Command::Serve(a) => serve::run(*a),
        Command::Quantize(a) => quantize::run_quantize(a),
        Command::Convert(a) => quantize::run_convert(a),
        Command::Perplexity(a) => quantize::run_perplexity(a),
    }
}
