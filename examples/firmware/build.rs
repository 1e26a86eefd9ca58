//! Host-side build step: turn a Hugging Face Mamba directory into a weight
//! blob the firmware `include_bytes!`s, plus a generated `model.rs` that
//! names the configuration, where each tensor lies in the blob, the prompt
//! and the buffer sizes.
//!
//! Inputs (environment):
//! - `MAMBA_FIRMWARE_MODEL`: the model directory (`config.json` +
//!   `model.safetensors`); default `../../models/mamba-demo` when it exists,
//!   else `../../tests/fixtures/hf_f32_tied`. Relative paths are taken from
//!   this crate's directory.
//! - `MAMBA_FIRMWARE_PROMPT_IDS`: prompt token ids, `1,2,3`; default the ids
//!   of `And God said` from the model's `tokenizer.json`, else the list in
//!   `prompt_ids.txt`.
//! - `MAMBA_FIRMWARE_TOKENS`: tokens to generate (default 16).
//! - `MAMBA_FIRMWARE_WEIGHTS`: `flash`, `extram` or `auto` (default): where
//!   the blob goes. `auto` puts it in flash when it fits with room for the
//!   code, else in the board's 16 MiB RAM region at 0x2100_0000.
//!
//! Outputs in `OUT_DIR`: `weights.bin`, `model.rs`, `memory.x` (copied so
//! the linker finds it).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use mamba_core::MambaConfig;
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

/// The default prompt, tokenized with the model's own tokenizer.
const DEFAULT_PROMPT: &str = "And God said";
const DEFAULT_TOKENS: usize = 16;
/// Flash is 4 MiB; keep this much of it for code and constants.
const FLASH_BYTES: usize = 4 << 20;
const CODE_RESERVE: usize = 256 << 10;
/// The 16 MiB RAM region at 0x2100_0000.
const EXTRAM_BYTES: usize = 16 << 20;

type Res<T> = Result<T, String>;

fn main() {
    if let Err(e) = run() {
        // A panic message is the clearest a build script can fail with.
        panic!("\n\nmamba-firmware build: {e}\n\n");
    }
}

fn run() -> Res<()> {
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(env("OUT_DIR")?);
    for var in [
        "MAMBA_FIRMWARE_MODEL",
        "MAMBA_FIRMWARE_PROMPT_IDS",
        "MAMBA_FIRMWARE_TOKENS",
        "MAMBA_FIRMWARE_WEIGHTS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=memory.x");
    println!("cargo::rerun-if-changed=prompt_ids.txt");
    println!("cargo::rustc-check-cfg=cfg(weights_in_extram)");

    // memory.x where the linker looks (cortex-m-rt's link.x INCLUDEs it).
    fs::copy(manifest.join("memory.x"), out.join("memory.x")).map_err(|e| format!("memory.x: {e}"))?;
    println!("cargo::rustc-link-search={}", out.display());

    let dir = model_dir(&manifest)?;
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        println!("cargo::rerun-if-changed={}", dir.join(f).display());
    }
    let fc = FileConfig::read(&dir)?;
    let st_path = dir.join("model.safetensors");
    let bytes = fs::read(&st_path).map_err(|e| {
        format!("{}: {e} (only a single, unsharded model.safetensors is supported)", st_path.display())
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", st_path.display()))?;
    let mut blob = Blob::new(&st, &st_path);

    let (dm, di, n, k, r) = (fc.d_model, fc.d_inner, fc.d_state, fc.d_conv, fc.dt_rank);
    let emb = blob.add("backbone.embeddings.weight", &[None, Some(dm)], 2)?;
    let vocab_rows = emb.rows;
    let cfg = MambaConfig {
        d_model: dm,
        d_inner: di,
        d_state: n,
        d_conv: k,
        dt_rank: r,
        n_layer: fc.n_layer,
        vocab_size: vocab_rows,
        eps: fc.eps,
        use_bias: fc.use_bias,
        use_conv_bias: fc.use_conv_bias,
        residual_in_fp32: fc.residual_in_fp32,
        tie_embeddings: fc.tie_embeddings,
    };
    cfg.validate().map_err(|e| format!("{}: {e}", dir.join("config.json").display()))?;
    let xp = cfg.x_proj_dim();
    let mut layers = String::new();
    for i in 0..cfg.n_layer {
        let p = format!("backbone.layers.{i}");
        let m = format!("{p}.mixer");
        let bias = |b: &mut Blob<'_>, name: String, len: usize, want: bool| -> Res<String> {
            Ok(if want { format!("Some({})", b.add(&name, &[Some(len)], 1)?.lit()) } else { "None".into() })
        };
        let l = [
            ("norm", blob.add(&format!("{p}.norm.weight"), &[Some(dm)], 1)?.lit()),
            ("in_proj", blob.add(&format!("{m}.in_proj.weight"), &[Some(2 * di), Some(dm)], 2)?.lit()),
            ("in_proj_bias", bias(&mut blob, format!("{m}.in_proj.bias"), 2 * di, cfg.use_bias)?),
            ("conv_w", blob.add(&format!("{m}.conv1d.weight"), &[Some(di), Some(1), Some(k)], 2)?.lit()),
            ("conv_b", bias(&mut blob, format!("{m}.conv1d.bias"), di, cfg.use_conv_bias)?),
            ("x_proj", blob.add(&format!("{m}.x_proj.weight"), &[Some(xp), Some(di)], 2)?.lit()),
            ("dt_proj", blob.add(&format!("{m}.dt_proj.weight"), &[Some(di), Some(r)], 2)?.lit()),
            ("dt_bias", blob.add(&format!("{m}.dt_proj.bias"), &[Some(di)], 1)?.lit()),
            ("a_log", blob.add(&format!("{m}.A_log"), &[Some(di), Some(n)], 2)?.lit()),
            ("d", blob.add(&format!("{m}.D"), &[Some(di)], 1)?.lit()),
            ("out_proj", blob.add(&format!("{m}.out_proj.weight"), &[Some(dm), Some(di)], 2)?.lit()),
            ("out_proj_bias", bias(&mut blob, format!("{m}.out_proj.bias"), dm, cfg.use_bias)?),
        ];
        layers.push_str("    LayerRefs {\n");
        for (name, lit) in l {
            let _ = writeln!(layers, "        {name}: {lit},");
        }
        layers.push_str("    },\n");
    }
    let norm_f = blob.add("backbone.norm_f.weight", &[Some(dm)], 1)?.lit();
    // As the std runtime: untied means the checkpoint must carry its own head.
    let lm_head = if cfg.tie_embeddings {
        "None".to_string()
    } else {
        format!("Some({})", blob.add("lm_head.weight", &[Some(vocab_rows), Some(dm)], 2)?.lit())
    };

    let prompt = prompt_ids(&manifest, &dir)?;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab_rows) {
        return Err(format!(
            "prompt token id {bad} is out of range: the model has {vocab_rows} embedding rows"
        ));
    }
    let gen_tokens: usize = match std::env::var("MAMBA_FIRMWARE_TOKENS") {
        Ok(s) => s.trim().parse().map_err(|_| format!("MAMBA_FIRMWARE_TOKENS={s:?} is not a number"))?,
        Err(_) => DEFAULT_TOKENS,
    };
    if gen_tokens == 0 {
        return Err("MAMBA_FIRMWARE_TOKENS must be at least 1".into());
    }

    let blob_len = blob.data.len();
    let extram = match std::env::var("MAMBA_FIRMWARE_WEIGHTS").as_deref().unwrap_or("auto") {
        "flash" => false,
        "extram" => true,
        "auto" => blob_len + CODE_RESERVE > FLASH_BYTES,
        other => return Err(format!("MAMBA_FIRMWARE_WEIGHTS={other:?}: expected flash, extram or auto")),
    };
    if extram && blob_len > EXTRAM_BYTES {
        return Err(format!("the weights take {blob_len} bytes: more than the 16 MiB RAM region"));
    }
    if extram {
        println!("cargo::rustc-cfg=weights_in_extram");
    }

    let fp = cfg.footprint();
    let state_floats = cfg.state_layout().slot_len();
    let a_floats = cfg.n_layer * cfg.d_inner * cfg.d_state;
    let scratch_floats = fp.prefill_scratch_floats(prompt.len(), 1).max(fp.prefill_scratch_floats(1, 1));
    let sample_vocab = fc.vocab_size.clamp(1, vocab_rows);

    fs::write(out.join("weights.bin"), &blob.data).map_err(|e| format!("weights.bin: {e}"))?;
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let mut src = String::new();
    let _ = write!(
        src,
        "// Generated by build.rs from {dir:?}. Do not edit.\n\
         pub const CFG: MambaConfig = {cfg:?};\n\
         /// Ids the sampler may pick (the real vocabulary; padded rows never win).\n\
         pub const SAMPLE_VOCAB: usize = {sample_vocab};\n\
         pub const PROMPT_IDS: [u32; {np}] = [{ids}];\n\
         pub const GEN_TOKENS: usize = {gen_tokens};\n\
         pub const BLOB_LEN: usize = {blob_len};\n\
         pub const STATE_FLOATS: usize = {state_floats};\n\
         pub const A_FLOATS: usize = {a_floats};\n\
         pub const SCRATCH_FLOATS: usize = {scratch_floats};\n\
         pub const EMBEDDING: TensorRef = {emb};\n\
         pub const NORM_F: TensorRef = {norm_f};\n\
         pub const LM_HEAD: Option<TensorRef> = {lm_head};\n\
         pub const LAYERS: [LayerRefs; {nl}] = [\n{layers}];\n",
        dir = dir.display().to_string(),
        cfg = CfgLit(&cfg),
        np = prompt.len(),
        ids = ids.join(", "),
        emb = emb.lit(),
        nl = cfg.n_layer,
    );
    fs::write(out.join("model.rs"), src).map_err(|e| format!("model.rs: {e}"))?;
    Ok(())
}

fn env(name: &str) -> Res<String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

/// The model directory from `MAMBA_FIRMWARE_MODEL`, or the default.
fn model_dir(manifest: &Path) -> Res<PathBuf> {
    let dir = match std::env::var("MAMBA_FIRMWARE_MODEL") {
        Ok(d) if !d.is_empty() => manifest.join(d),
        _ => {
            // Watch the models folder so the demo model is picked up when it lands.
            let models = manifest.join("../../models");
            if models.is_dir() {
                println!("cargo::rerun-if-changed={}", models.display());
            }
            let demo = models.join("mamba-demo");
            if demo.join("config.json").is_file() && demo.join("model.safetensors").is_file() {
                demo
            } else {
                manifest.join("../../tests/fixtures/hf_f32_tied")
            }
        }
    };
    let dir = dir.canonicalize().map_err(|e| format!("model directory {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Prompt ids: the environment, else the tokenizer on the default prompt, else `prompt_ids.txt`.
fn prompt_ids(manifest: &Path, dir: &Path) -> Res<Vec<u32>> {
    if let Ok(s) = std::env::var("MAMBA_FIRMWARE_PROMPT_IDS") {
        return parse_ids(&s).map_err(|e| format!("MAMBA_FIRMWARE_PROMPT_IDS: {e}"));
    }
    let tok = dir.join("tokenizer.json");
    if tok.is_file() {
        match tokenizers::Tokenizer::from_file(&tok).and_then(|t| t.encode(DEFAULT_PROMPT, false)) {
            Ok(enc) if !enc.get_ids().is_empty() => return Ok(enc.get_ids().to_vec()),
            Ok(_) => println!("cargo::warning={DEFAULT_PROMPT:?} encodes to no tokens; using prompt_ids.txt"),
            Err(e) => println!("cargo::warning={}: {e}; using prompt_ids.txt", tok.display()),
        }
    }
    let path = manifest.join("prompt_ids.txt");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
    parse_ids(line).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_ids(s: &str) -> Res<Vec<u32>> {
    let ids = s
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u32>().map_err(|_| format!("{t:?} is not a token id")))
        .collect::<Res<Vec<u32>>>()?;
    if ids.is_empty() {
        return Err("no token ids".into());
    }
    Ok(ids)
}

/// `MambaConfig` as a Rust expression.
struct CfgLit<'a>(&'a MambaConfig);

impl std::fmt::Debug for CfgLit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.0;
        write!(
            f,
            "MambaConfig {{ d_model: {}, d_inner: {}, d_state: {}, d_conv: {}, dt_rank: {}, n_layer: {}, \
             vocab_size: {}, eps: {:?}f32, use_bias: {}, use_conv_bias: {}, residual_in_fp32: {}, \
             tie_embeddings: {} }}",
            c.d_model,
            c.d_inner,
            c.d_state,
            c.d_conv,
            c.dt_rank,
            c.n_layer,
            c.vocab_size,
            c.eps,
            c.use_bias,
            c.use_conv_bias,
            c.residual_in_fp32,
            c.tie_embeddings
        )
    }
}

/// Where a tensor lies in the blob.
struct Placed {
    offset: usize,
    rows: usize,
    cols: usize,
    dtype: &'static str,
}

impl Placed {
    fn lit(&self) -> String {
        format!(
            "TensorRef {{ offset: {}, rows: {}, cols: {}, dtype: DType::{} }}",
            self.offset, self.rows, self.cols, self.dtype
        )
    }
}

/// The blob being built: tensors in their stored dtype, each 4-byte aligned.
struct Blob<'a> {
    st: &'a SafeTensors<'a>,
    path: &'a Path,
    data: Vec<u8>,
}

impl<'a> Blob<'a> {
    fn new(st: &'a SafeTensors<'a>, path: &'a Path) -> Self {
        Blob { st, path, data: Vec::new() }
    }

    /// Append tensor `name`, checking its shape against `shape` (`None`: any),
    /// and view it as `[rows, cols]`: a vector is `[1, n]`, a matrix its
    /// first dimension by the product of the others.
    fn add(&mut self, name: &str, shape: &[Option<usize>], dims: usize) -> Res<Placed> {
        let t = self.st.tensor(name).map_err(|_| format!("{}: no tensor {name}", self.path.display()))?;
        let got = t.shape();
        let ok = got.len() == shape.len() && got.iter().zip(shape).all(|(&g, w)| w.is_none_or(|w| w == g));
        if !ok {
            return Err(format!("{}: {name} has shape {got:?}, expected {shape:?}", self.path.display()));
        }
        let dtype = match t.dtype() {
            Dtype::F32 => "F32",
            Dtype::BF16 => "BF16",
            Dtype::F16 => "F16",
            d => return Err(format!("{}: {name} is {d:?}; only F32, BF16, F16", self.path.display())),
        };
        let (rows, cols) = if dims == 1 { (1, got[0]) } else { (got[0], got[1..].iter().product()) };
        let offset = self.data.len().next_multiple_of(4);
        self.data.resize(offset, 0);
        self.data.extend_from_slice(t.data());
        Ok(Placed { offset, rows, cols, dtype })
    }
}

/// The parts of a Hugging Face `config.json` the firmware needs, with
/// transformers' defaults for missing keys (as the std runtime reads it).
struct FileConfig {
    d_model: usize,
    d_inner: usize,
    d_state: usize,
    d_conv: usize,
    dt_rank: usize,
    n_layer: usize,
    vocab_size: usize,
    eps: f32,
    use_bias: bool,
    use_conv_bias: bool,
    residual_in_fp32: bool,
    tie_embeddings: bool,
}

impl FileConfig {
    fn read(dir: &Path) -> Res<Self> {
        let path = dir.join("config.json");
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let obj: Map<String, Value> =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let err = |k: &str, m: &str| format!("{}: {k}: {m}", path.display());
        if obj.contains_key("d_model") && !obj.contains_key("hidden_size") {
            return Err(err("d_model", "original (state-spaces) layout; the firmware reads the HF layout"));
        }
        if let Some(mt) = obj.get("model_type").and_then(Value::as_str) {
            if mt != "mamba" {
                return Err(err("model_type", "only \"mamba\" (Mamba-1) is supported"));
            }
        }
        let usize_or = |k: &str, d: usize| -> Res<usize> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| err(k, "expected an integer")),
            }
        };
        let bool_or = |k: &str, d: bool| -> Res<bool> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(v) => v.as_bool().ok_or_else(|| err(k, "expected true or false")),
            }
        };
        let d_model = usize_or("hidden_size", 768)?;
        let expand = usize_or("expand", 2)?;
        let dt_rank = match obj.get("time_step_rank") {
            None | Some(Value::Null) => d_model.div_ceil(16),
            Some(Value::String(s)) if s == "auto" => d_model.div_ceil(16),
            Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| err("time_step_rank", "bad value"))?,
        };
        let eps = match obj.get("layer_norm_epsilon") {
            None | Some(Value::Null) => 1e-5,
            Some(v) => v.as_f64().ok_or_else(|| err("layer_norm_epsilon", "expected a number"))? as f32,
        };
        Ok(FileConfig {
            d_model,
            d_inner: usize_or("intermediate_size", expand * d_model)?,
            d_state: usize_or("state_size", 16)?,
            d_conv: usize_or("conv_kernel", 4)?,
            dt_rank,
            n_layer: usize_or("num_hidden_layers", 32)?,
            vocab_size: usize_or("vocab_size", 50280)?,
            eps,
            use_bias: bool_or("use_bias", false)?,
            use_conv_bias: bool_or("use_conv_bias", true)?,
            residual_in_fp32: bool_or("residual_in_fp32", true)?,
            tie_embeddings: bool_or("tie_word_embeddings", true)?,
        })
    }
}
