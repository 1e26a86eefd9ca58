//! Command-line interface: argument parsing and one module per subcommand.

mod generate;
mod inspect;
mod logits;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mamba_runtime::model::LoadedModel;
use mamba_runtime::parallel::RayonParallel;

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
    Generate(generate::GenerateArgs),
    /// Print logits of one or more sequences as JSON lines (one ragged batch).
    Logits(logits::LogitsArgs),
    /// Show a model's resolved configuration, size and state memory.
    Inspect(inspect::InspectArgs),
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
        LoadedModel::load(&spec).with_context(|| format!("loading model `{spec}`"))
    }

    pub fn parallel(&self) -> Result<RayonParallel> {
        RayonParallel::new(self.threads).context("starting the thread pool")
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
        Command::Generate(a) => generate::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Inspect(a) => inspect::run(a),
    }
}
