//! `mamba-rs inspect`: the resolved configuration and memory figures.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::ModelArgs;

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also say how many sequences' states fit in this much memory.
    #[arg(long, default_value = "1GiB")]
    pub state_memory: String,
}

pub fn run(a: InspectArgs) -> Result<()> {
    let m = a.model.load()?;
    let c = &m.cfg;
    let fc = &m.file_config;
    let fp = c.footprint();
    let state = fp.state_bytes_per_seq();
    let files: Vec<String> = m.weight_files().iter().map(|p| p.display().to_string()).collect();
    let budget = super::parse_size(&a.state_memory)?;
    let info = json!({
        "model_dir": m.dir.display().to_string(),
        "layout": fc.layout.name(),
        "weight_files": files,
        "dtype": m.dtype.name(),
        "d_model": c.d_model,
        "d_inner": c.d_inner,
        "d_state": c.d_state,
        "d_conv": c.d_conv,
        "dt_rank": c.dt_rank,
        "n_layer": c.n_layer,
        "vocab_size": fc.vocab_size,
        "embedding_rows": c.vocab_size,
        "layer_norm_epsilon": c.eps.to_string().parse::<f64>().unwrap_or(c.eps as f64),
        "use_bias": c.use_bias,
        "use_conv_bias": c.use_conv_bias,
        "residual_in_fp32": c.residual_in_fp32,
        "tied_embeddings": c.tie_embeddings,
        "bos_token_id": fc.bos_token_id,
        "eos_token_ids": fc.eos_token_ids,
        "pad_token_id": fc.pad_token_id,
        "parameters": m.parameter_count(),
        "weight_bytes": m.weight_bytes(),
        "state_bytes_per_sequence": state,
        "conv_state_bytes_per_sequence": c.n_layer * c.d_inner * c.d_conv * 4,
        "ssm_state_bytes_per_sequence": c.n_layer * c.d_inner * c.d_state * 4,
        "state_memory_budget_bytes": budget,
        "sequences_fit_in_budget": budget / state.max(1),
        "prefill_scratch_bytes_512_tokens": fp.prefill_scratch_bytes(512, 1),
        "step_scratch_bytes_batch_1": fp.step_scratch_bytes(1),
    });
    if a.json {
        println!("{info}");
        return Ok(());
    }
    if let Some(obj) = info.as_object() {
        for (k, v) in obj {
            println!("{k:<34} {v}");
        }
    }
    Ok(())
}
