//! `mamba-rs bench`: prefill and decode tokens/s of a checkpoint, or of
//! synthetic weights of a published shape built in memory.

use anyhow::{bail, Context, Result};
use clap::Args;
use mamba_core::{DType, Parallel};
use mamba_runtime::bench::{run, BenchConfig, BenchReport};
use mamba_runtime::device::{bench_cuda, Device};
use mamba_runtime::model::LoadedModel;
use mamba_runtime::synthetic;

use super::{DeviceArgs, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// With --device cuda: memory bandwidth in GB/s that sets the decode bound
    /// (weight bytes read per step at this rate).
    #[arg(long, default_value_t = 4300.0)]
    pub bandwidth_gb_s: f64,
    /// With --device cuda: also time decode through CUDA graphs (unverified path).
    #[arg(long)]
    pub cuda_graphs: bool,
    /// Synthetic weights of a published shape: 130m, 370m, 790m, 1.4b, 2.8b (instead of --model).
    #[arg(long, conflicts_with = "model")]
    pub shape: Option<String>,
    /// Weight dtype of the synthetic model: f32, bf16, f16 or q8 (Q8_0 matrices, the rest f32).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Batch sizes to measure, e.g. `1,8,32`.
    #[arg(long, default_value = "1")]
    pub batch: String,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    /// Decode steps.
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Timed runs of each phase (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// One JSON line per configuration.
    #[arg(long)]
    pub json: bool,
    /// Also time every op of one more prefill and of the decode steps, and
    /// report where the time goes (ms per pass, share, weight GB/s per op).
    #[arg(long)]
    pub profile: bool,
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "q8" | "q8_0" => DType::Q8_0,
        other => bail!("--dtype: unknown dtype `{other}` (f32, bf16, f16, q8)"),
    })
}

/// Peak resident memory of this process, from the kernel.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run_cmd(a: BenchArgs) -> Result<()> {
    let batches: Vec<usize> = a
        .batch
        .split(',')
        .map(|b| b.trim().parse::<usize>().with_context(|| format!("--batch: `{b}` is not a number")))
        .collect::<Result<_>>()?;
    if batches.contains(&0) {
        bail!("--batch sizes must be at least 1");
    }
    let device = a.device.device_for(&a.model)?;
    if a.profile && matches!(device, Device::Cuda(_)) {
        bail!("--profile times the CPU backend's ops; it has no CUDA version (the device runs them asynchronously)");
    }
    if let Device::Cuda(i) = device {
        // Before building weights: a missing device is a quick, clear error.
        mamba_runtime::device::open_cuda(i).context("--device")?;
    }
    let (model, shape_name) = match &a.shape {
        Some(s) => {
            let (shape, dtype) = (synthetic::shape(s)?, parse_dtype(&a.dtype)?);
            a.model.numerics(dtype)?;
            eprintln!("building synthetic {} weights in {}...", shape.name, a.dtype);
            (synthetic::synthetic_model(shape, dtype, 0)?, shape.name.to_string())
        }
        None => {
            let m = a.model.load()?;
            let name = m.dir.display().to_string();
            (m, name)
        }
    };
    if let Device::Cuda(index) = device {
        return run_cuda(&a, &model, &shape_name, index, &batches);
    }
    let par = a.model.parallel()?;
    let simd = match mamba_runtime::cpu::init_simd() {
        k if mamba_core::kernels::simd::bf16_dot_enabled() => format!("{k}+bf16dot"),
        k => k.to_string(),
    };
    if !a.json {
        eprintln!("kernels: {simd}; threads: {} ({} pool)", par.threads(), par.name());
        println!("{}", BenchReport::table_header());
    }
    for &batch in &batches {
        let cfg = BenchConfig {
            prompt_tokens: a.prompt_len,
            gen_tokens: a.gen_len,
            batch,
            repeats: a.repeat,
            profile: a.profile,
        };
        let r = run(&model, &par, &cfg).with_context(|| format!("benchmark at batch {batch}"))?;
        if a.json {
            let mut v = r.to_json();
            v["shape"] = shape_name.clone().into();
            v["prefill_tokens_per_s"] = r.prefill_tok_s.into();
            v["decode_tokens_per_s"] = r.decode_tok_s.into();
            v["time_to_first_token_s"] =
                (r.prompt_tokens as f64 * batch as f64 / r.prefill_tok_s.max(1e-9)).into();
            v["peak_rss_bytes"] = peak_rss_bytes().into();
            v["kernels"] = simd.clone().into();
            println!("{v}");
        } else {
            println!("{}", r.table_line());
            if let Some(p) = &r.profile {
                print!("{}", p.table());
            }
        }
    }
    Ok(())
}

/// `--device cuda`: prefill once (batch 1), decode at each batch size, with
/// greedy sampling on the device.
fn run_cuda(a: &BenchArgs, model: &LoadedModel, shape: &str, index: usize, batches: &[usize]) -> Result<()> {
    let bw = a.bandwidth_gb_s * 1e9;
    let reports = bench_cuda(model, index, batches, a.prompt_len, a.gen_len, a.repeat, bw, a.cuda_graphs)
        .context("benchmark on the device")?;
    if !a.json {
        println!(
            "device  shape  batch  prefill tok/s ({} tok)  decode tok/s  bound tok/s  of bound  graph decode tok/s",
            a.prompt_len
        );
    }
    for r in reports {
        if a.json {
            let mut v = r.to_json();
            v["shape"] = shape.into();
            v["dtype"] = model.dtype.name().into();
            v["bandwidth_gb_s"] = a.bandwidth_gb_s.into();
            println!("{v}");
        } else {
            println!(
                "{}  {shape}  {}  {:.0}  {:.1}  {:.1}  {:.0}%  {}",
                r.device,
                r.batch,
                r.prefill_tok_s,
                r.decode_tok_s,
                r.decode_bound_tok_s,
                100.0 * r.decode_tok_s / r.decode_bound_tok_s.max(1e-9),
                match &r.decode_graph {
                    None => "-".to_string(),
                    Some(Ok(v)) => format!("{v:.1}"),
                    Some(Err(e)) => format!("failed: {e}"),
                }
            );
        }
    }
    Ok(())
}
