//! Reading `config.json` in both checkpoint layouts.
//!
//! - Hugging Face `-hf` (`MambaForCausalLM`): `hidden_size`, `intermediate_size`,
//!   `state_size`, `num_hidden_layers`, `conv_kernel`, `expand`, `time_step_rank`
//!   (a number or `"auto"` = ceil(hidden_size / 16)), `vocab_size`,
//!   `layer_norm_epsilon`, `use_bias`, `use_conv_bias`, `residual_in_fp32`,
//!   `tie_word_embeddings`, `hidden_act`, token ids. Missing keys take
//!   transformers' class defaults.
//! - Original `state-spaces/mamba-*`: `d_model`, `n_layer`, `vocab_size`,
//!   `ssm_cfg`, `rms_norm`, `residual_in_fp32`, `fused_add_norm`,
//!   `pad_vocab_size_multiple`, `tie_embeddings`.
//!
//! The vocabulary size that counts for shapes comes later, from the
//! embedding tensor; `vocab_size` here is the real vocabulary, which the
//! sampler never exceeds.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Which checkpoint layout a directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `transformers`' `MambaForCausalLM` (`backbone.embeddings.weight`).
    HuggingFace,
    /// `state-spaces/mamba-*` (`backbone.embedding.weight`).
    Original,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::HuggingFace => "huggingface",
            Layout::Original => "original (state-spaces)",
        }
    }
}

/// The configuration as read from `config.json`, before the tensors are seen.
#[derive(Clone, Debug, PartialEq)]
pub struct FileConfig {
    pub layout: Layout,
    pub d_model: usize,
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
    pub n_layer: usize,
    /// The real vocabulary (ids the tokenizer produces and the sampler may pick).
    pub vocab_size: usize,
    /// Rows the embedding should have (original layout: padded up).
    pub padded_vocab_size: usize,
    pub eps: f32,
    pub use_bias: bool,
    pub use_conv_bias: bool,
    pub residual_in_fp32: bool,
    pub tie_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

struct Reader<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl<'a> Reader<'a> {
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::ConfigValue { path: self.path.to_path_buf(), key: key.to_string(), msg: msg.into() }
    }

    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| self.err(key, "missing")),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }

    /// A dimension: [`usize_or`](Self::usize_or), refusing 0 by the file's
    /// own key (a zero width would otherwise surface as a tensor of the
    /// wrong shape, or under the core's name for it).
    fn size_or(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.usize_or(key, default)? {
            0 => Err(self.err(key, "expected a positive integer, got 0")),
            n => Ok(n),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(|x| x as f32)
                .ok_or_else(|| self.err(key, format!("expected a non-negative number, got {v}"))),
        }
    }

    fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(key, format!("expected a string, got {v}"))),
        }
    }

    /// `a * b`, a size computed from the config; an overflow is `key`'s fault.
    fn product(&self, key: &str, a: usize, b: usize) -> Result<usize> {
        a.checked_mul(b).ok_or_else(|| self.err(key, format!("too large: {a} x {b} overflows")))
    }

    /// `"auto"` or a positive integer.
    fn dt_rank(&self, key: &str, d_model: usize) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(d_model.div_ceil(16)),
            Some(Value::String(s)) if s == "auto" => Ok(d_model.div_ceil(16)),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| self.err(key, format!("expected \"auto\" or a positive integer, got {v}"))),
        }
    }

    /// Like [`token_ids`](Self::token_ids), with transformers' default when the key is absent
    /// (an explicit `null` means none).
    fn token_ids_or(&self, key: &str, default: u32) -> Result<Vec<u32>> {
        if self.obj.contains_key(key) {
            self.token_ids(key)
        } else {
            Ok(vec![default])
        }
    }

    /// `ids` (read from `key`), each checked to name a token of a
    /// vocabulary of `vocab`: an eos id past it could never be sampled, so
    /// generation would never stop on it.
    fn in_vocab(&self, key: &str, ids: Vec<u32>, vocab: usize) -> Result<Vec<u32>> {
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(id) => {
                Err(self.err(key, format!("token id {id} is outside the vocabulary (vocab_size {vocab})")))
            }
            None => Ok(ids),
        }
    }

    /// A token id, or a list of them (eos may be a list).
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let one = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => {
                a.iter().map(|v| one(v).ok_or_else(|| self.err(key, format!("bad token id {v}")))).collect()
            }
            Some(v) => one(v).map(|n| vec![n]).ok_or_else(|| self.err(key, format!("bad token id {v}"))),
        }
    }
}

/// Read and parse a JSON object file.
/// The `quant_method` that `mamba-rs quantize` writes in `quantization_config`.
pub const Q8_0_METHOD: &str = "q8_0";

/// A checkpoint quantized some other way (GPTQ, AWQ, bitsandbytes, ...) has
/// tensors this loader cannot read: say so by name rather than report
/// missing tensors.
fn check_quantization(path: &Path, obj: &Map<String, Value>) -> Result<()> {
    let Some(q) = obj.get("quantization_config") else { return Ok(()) };
    let method = q.get("quant_method").and_then(Value::as_str);
    match method {
        Some(Q8_0_METHOD) => Ok(()),
        other => Err(Error::Unsupported {
            path: path.to_path_buf(),
            msg: format!(
                "quantization_config.quant_method {}: mamba-rs reads \"{Q8_0_METHOD}\" checkpoints \
                 (made by `mamba-rs quantize`) and unquantized f32/f16/bf16 ones",
                other.map_or("is missing".to_string(), |m| format!("\"{m}\"")),
            ),
        }),
    }
}

pub fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound { path: path.to_path_buf(), what: "file not found".into() }
        } else {
            Error::io(path, e)
        }
    })?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::ConfigValue {
            path: path.to_path_buf(),
            key: "(top level)".into(),
            msg: "expected a JSON object".into(),
        }),
        Err(source) => Err(Error::Json { path: path.to_path_buf(), source }),
    }
}

impl FileConfig {
    /// Read `dir/config.json` (and `dir/generation_config.json` for token ids).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
                what: "no config.json in the model directory".into(),
            });
        }
        let obj = read_json_object(&path)?;
        let mut cfg = Self::from_json(&path, &obj)?;
        let gen = dir.join("generation_config.json");
        if gen.is_file() {
            let g = read_json_object(&gen)?;
            let r = Reader { path: &gen, obj: &g };
            let ids = |key| r.in_vocab(key, r.token_ids(key)?, cfg.vocab_size);
            if let Some(b) = ids("bos_token_id")?.first() {
                cfg.bos_token_id = Some(*b);
            }
            let eos = ids("eos_token_id")?;
            if !eos.is_empty() {
                cfg.eos_token_ids = eos;
            }
            if let Some(p) = ids("pad_token_id")?.first() {
                cfg.pad_token_id = Some(*p);
            }
        }
        Ok(cfg)
    }

    /// Parse a config object; the layout is told by its keys.
    pub fn from_json(path: &Path, obj: &Map<String, Value>) -> Result<Self> {
        check_quantization(path, obj)?;
        let r = Reader { path, obj };
        // transformers always writes `hidden_size`; the original layout never does.
        let original = ["d_model", "n_layer", "ssm_cfg"].iter().any(|k| obj.contains_key(*k));
        if original && !obj.contains_key("hidden_size") {
            Self::original(&r)
        } else {
            Self::hugging_face(&r)
        }
    }

    fn hugging_face(r: &Reader<'_>) -> Result<Self> {
        if let Some(mt) = r.obj.get("model_type").and_then(Value::as_str) {
            if mt != "mamba" {
                return Err(Error::Unsupported {
                    path: r.path.to_path_buf(),
                    msg: format!("model_type \"{mt}\" (only \"mamba\", Mamba-1, is supported)"),
                });
            }
        }
        let act = r.str_or("hidden_act", "silu")?;
        if act != "silu" && act != "swish" {
            return Err(Error::Unsupported {
                path: r.path.to_path_buf(),
                msg: format!("hidden_act \"{act}\" (only \"silu\" is supported)"),
            });
        }
        let d_model = r.size_or("hidden_size", Some(768))?;
        let expand = r.size_or("expand", Some(2))?;
        let d_inner = r.size_or("intermediate_size", Some(r.product("expand", expand, d_model)?))?;
        let vocab_size = r.size_or("vocab_size", Some(50280))?;
        let ids = |key| r.in_vocab(key, r.token_ids_or(key, 0)?, vocab_size);
        Ok(FileConfig {
            layout: Layout::HuggingFace,
            d_model,
            d_inner,
            d_state: r.size_or("state_size", Some(16))?,
            d_conv: r.size_or("conv_kernel", Some(4))?,
            dt_rank: r.dt_rank("time_step_rank", d_model)?,
            n_layer: r.size_or("num_hidden_layers", Some(32))?,
            vocab_size,
            padded_vocab_size: vocab_size,
            eps: r.f32_or("layer_norm_epsilon", 1e-5)?,
            use_bias: r.bool_or("use_bias", false)?,
            use_conv_bias: r.bool_or("use_conv_bias", true)?,
            residual_in_fp32: r.bool_or("residual_in_fp32", true)?,
            tie_embeddings: r.bool_or("tie_word_embeddings", true)?,
            bos_token_id: ids("bos_token_id")?.first().copied(),
            eos_token_ids: ids("eos_token_id")?,
            pad_token_id: ids("pad_token_id")?.first().copied(),
        })
    }

    fn original(r: &Reader<'_>) -> Result<Self> {
        let unsupported = |msg: String| Error::Unsupported { path: r.path.to_path_buf(), msg };
        if !r.bool_or("rms_norm", true)? {
            return Err(unsupported("rms_norm = false (LayerNorm blocks)".into()));
        }
        if r.usize_or("d_intermediate", Some(0))? != 0 {
            return Err(unsupported("d_intermediate > 0 (MLP blocks)".into()));
        }
        if r.obj.get("attn_layer_idx").and_then(Value::as_array).is_some_and(|a| !a.is_empty()) {
            return Err(unsupported("attention layers (attn_layer_idx)".into()));
        }
        let empty = Map::new();
        let ssm = match r.obj.get("ssm_cfg") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(m)) => m,
            Some(v) => return Err(r.err("ssm_cfg", format!("expected an object, got {v}"))),
        };
        let s = Reader { path: r.path, obj: ssm };
        let layer = s.str_or("layer", "Mamba1")?;
        if layer != "Mamba1" {
            return Err(unsupported(format!("ssm_cfg.layer \"{layer}\" (only Mamba1)")));
        }
        let d_model = r.size_or("d_model", None)?;
        let expand = s.size_or("expand", Some(2))?;
        let vocab_size = r.size_or("vocab_size", None)?;
        let multiple = r.usize_or("pad_vocab_size_multiple", Some(8))?.max(1);
        let padded_vocab_size = r.product("vocab_size", vocab_size.div_ceil(multiple), multiple)?;
        Ok(FileConfig {
            layout: Layout::Original,
            d_model,
            d_inner: r.product("ssm_cfg.expand", expand, d_model)?,
            d_state: s.size_or("d_state", Some(16))?,
            d_conv: s.size_or("d_conv", Some(4))?,
            dt_rank: s.dt_rank("dt_rank", d_model)?,
            n_layer: r.size_or("n_layer", None)?,
            vocab_size,
            padded_vocab_size,
            eps: r.f32_or("norm_epsilon", 1e-5)?,
            use_bias: s.bool_or("bias", false)?,
            use_conv_bias: s.bool_or("conv_bias", true)?,
            residual_in_fp32: r.bool_or("residual_in_fp32", true)?,
            tie_embeddings: r.bool_or("tie_embeddings", true)?,
            bos_token_id: None,
            eos_token_ids: vec![],
            pad_token_id: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig> {
        let v: Value = serde_json::from_str(text).unwrap();
        FileConfig::from_json(Path::new("config.json"), v.as_object().unwrap())
    }

    #[test]
    fn hf_auto_dt_rank_is_ceil_of_d_model_over_16() {
        let c = parse(r#"{"hidden_size": 768, "num_hidden_layers": 24, "time_step_rank": "auto"}"#).unwrap();
        assert_eq!((c.dt_rank, c.d_inner, c.d_state, c.d_conv), (48, 1536, 16, 4));
        let c = parse(r#"{"hidden_size": 20, "num_hidden_layers": 1}"#).unwrap();
        assert_eq!(c.dt_rank, 2);
    }

    #[test]
    fn token_ids_default_as_transformers_and_accept_lists() {
        let c = parse(r#"{"hidden_size": 16}"#).unwrap();
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id), (Some(0), vec![0], Some(0)));
        let c = parse(r#"{"hidden_size": 16, "eos_token_id": null}"#).unwrap();
        assert!(c.eos_token_ids.is_empty());
        let c = parse(r#"{"hidden_size": 16, "eos_token_id": [2, 3]}"#).unwrap();
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        let e = parse(r#"{"hidden_size": 16, "eos_token_id": -1}"#).unwrap_err().to_string();
        assert!(e.contains("eos_token_id"), "{e}");
    }

    #[test]
    fn original_layout_pads_vocab() {
        let c = parse(r#"{"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "pad_vocab_size_multiple": 8}"#)
            .unwrap();
        assert_eq!(c.layout, Layout::Original);
        assert_eq!((c.vocab_size, c.padded_vocab_size), (50277, 50280));
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse(r#"{"hidden_size": "big"}"#).unwrap_err().to_string();
        assert!(e.contains("hidden_size") && e.contains("integer"), "{e}");
        let e = parse(r#"{"hidden_size": 16, "hidden_act": "gelu"}"#).unwrap_err().to_string();
        assert!(e.contains("gelu"), "{e}");
        let e = parse(r#"{"hidden_size": 16, "time_step_rank": "wide"}"#).unwrap_err().to_string();
        assert!(e.contains("time_step_rank"), "{e}");
        let e = parse(r#"{"d_model": 16, "n_layer": 2, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Mamba2"), "{e}");
    }
}
