//! `mamba-rs serve`: an OpenAI-compatible HTTP server (see `mamba_runtime::server`).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use mamba_core::DType;
use mamba_runtime::device::Device;
use mamba_runtime::server::{shutdown_signal, Loader, Server, ServerConfig};
use mamba_runtime::synthetic;

use super::{parse_size, DeviceArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Serve random weights of a published shape instead of a checkpoint
    /// (`130m`, `370m`, ...; bf16, no tokenizer: token-id prompts only). For load tests.
    #[arg(long, conflicts_with = "model")]
    pub shape: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences running at once (state slots); more requests wait.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// State memory budget, e.g. `512MiB` (slots = the lesser of this / state bytes and --max-batch).
    #[arg(long)]
    pub state_memory: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/* requests.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Memory for cached prompt states, e.g. `1GiB` (0: no prefix cache).
    #[arg(long, default_value = "0")]
    pub prefix_cache: String,
    /// The model name clients use (default: the --model argument, or the shape's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Longest prompt accepted, in tokens.
    #[arg(long, default_value_t = 32768)]
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 32768)]
    pub max_tokens_limit: usize,
    /// Prompt tokens prefilled per engine step, all requests together.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Largest request body, e.g. `4MiB`.
    #[arg(long, default_value = "4MiB")]
    pub body_limit: String,
    /// Seconds running requests may go on after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10.0)]
    pub shutdown_grace: f64,
    /// Seed of the --shape weights.
    #[arg(long, default_value_t = 0)]
    pub shape_seed: u64,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if !(a.shutdown_grace.is_finite() && a.shutdown_grace >= 0.0) {
        bail!("--shutdown-grace must be a number of seconds >= 0");
    }
    let device = a.device.device_for(&a.model)?;
    if let Device::Cuda(i) = device {
        // Fail here, before listening, when the device cannot be opened.
        mamba_runtime::device::open_cuda(i).context("--device")?;
    }
    // Before listening: a CPU that cannot run them is a quick, clear error.
    a.model.switch_products()?;
    let (names, loader): (Vec<String>, Loader) = match &a.shape {
        Some(s) => {
            let shape = synthetic::shape(s)?;
            let seed = a.shape_seed;
            let loader: Loader = Box::new(move || {
                synthetic::synthetic_model(shape, DType::BF16, seed).map_err(|e| format!("{e}"))
            });
            (vec![shape.name.to_string()], loader)
        }
        None => {
            let spec = a.model.model.clone().unwrap_or_else(|| "mamba-demo".into());
            let mut names = vec![spec.clone()];
            let base = std::path::Path::new(&spec).file_name().map(|b| b.to_string_lossy().into_owned());
            names.extend(base.filter(|b| *b != spec));
            let model = a.model.clone();
            (names, Box::new(move || model.load().map_err(|e| format!("{e:#}"))))
        }
    };
    let model_names = match &a.served_model_name {
        Some(n) => vec![n.clone()],
        None => names,
    };
    let cfg = ServerConfig {
        host: a.host.clone(),
        port: a.port,
        model_names,
        max_batch: a.max_batch,
        state_memory: a.state_memory.as_deref().map(parse_size).transpose()?,
        prefill_chunk: a.prefill_chunk,
        max_prompt_tokens: a.max_prompt_tokens,
        max_tokens_limit: a.max_tokens_limit,
        api_key: a.api_key.clone(),
        prefix_cache_bytes: parse_size(&a.prefix_cache).context("--prefix-cache")?,
        body_limit: parse_size(&a.body_limit).context("--body-limit")?,
        shutdown_grace: Duration::from_secs_f64(a.shutdown_grace),
        threads: a.model.threads,
        log: true,
        device,
        ..ServerConfig::default()
    };
    if cfg.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    rt.block_on(async move {
        let server = Server::bind(cfg, loader).await?;
        eprintln!("mamba-rs serve: listening on http://{} (loading the model)", server.local_addr()?);
        let handle = server.shutdown_handle();
        tokio::spawn(async move {
            shutdown_signal().await;
            eprintln!("mamba-rs serve: shutting down: finishing running requests");
            handle.shutdown();
        });
        server.run().await?;
        eprintln!("mamba-rs serve: stopped");
        Ok(())
    })
}
