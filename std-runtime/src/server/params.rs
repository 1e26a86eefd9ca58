//! Reading request bodies field by field, so every error names its field.

use std::hash::{BuildHasher, Hasher};

use serde_json::{Map, Value};

use super::error::ApiError;
use super::ModelInfo;
use super::ServerConfig;
use crate::engine::MAX_TOP_LOGPROBS;
use crate::sampling::SamplingParams;

/// Most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 16;

/// A request body: a JSON object.
#[derive(Debug)]
pub struct Fields(pub Map<String, Value>);

/// Parse a body; anything but a JSON object is a 400.
pub fn parse_body(bytes: &[u8]) -> Result<Fields, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::bad_request(format!("the request body is not valid JSON: {e}")).with_code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(Fields(m)),
        other => Err(ApiError::bad_request(format!(
            "the request body must be a JSON object, not {}",
            type_name(&other)
        ))),
    }
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(name: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(name, format!("`{name}` must be {want}, not {}", type_name(got)))
}

/// An integer value, if `v` is one (`3` or `3.0`).
pub fn as_integer(v: &Value) -> Option<i128> {
    if let Some(i) = v.as_i64() {
        return Some(i as i128);
    }
    if let Some(u) = v.as_u64() {
        return Some(u as i128);
    }
    v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e30).map(|f| f as i128)
}

impl Fields {
    /// The value of `name`; a JSON null counts as absent.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(name, "a boolean", v)),
        }
    }

    pub fn string(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(name, "a string", v)),
        }
    }

    /// A number in `lo..=hi` (`lo` excluded when `lo_open`).
    pub fn number(&self, name: &str, default: f32, lo: f32, hi: f32, lo_open: bool) -> Result<f32, ApiError> {
        let Some(v) = self.get(name) else { return Ok(default) };
        let Some(x) = v.as_f64() else { return Err(wrong_type(name, "a number", v)) };
        let ok = x <= hi as f64 && if lo_open { x > lo as f64 } else { x >= lo as f64 };
        if !ok || !x.is_finite() {
            let open = if lo_open { "(" } else { "[" };
            return Err(ApiError::invalid(name, format!("`{name}` must be in {open}{lo}, {hi}], got {x}")));
        }
        Ok(x as f32)
    }

    /// An integer in `lo..=hi`.
    pub fn integer(&self, name: &str, lo: i128, hi: i128) -> Result<Option<i128>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        let Some(x) = as_integer(v) else { return Err(wrong_type(name, "an integer", v)) };
        if x < lo || x > hi {
            return Err(ApiError::invalid(name, format!("`{name}` must be in {lo}..={hi}, got {x}")));
        }
        Ok(Some(x))
    }

    /// Refuse a field this server does not implement, unless it is absent or empty.
    pub fn unsupported(&self, name: &str, why: &str) -> Result<(), ApiError> {
        let empty = match self.get(name) {
            None => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            Some(_) => false,
        };
        if empty {
            Ok(())
        } else {
            Err(ApiError::invalid(name, format!("`{name}` is not supported by this server: {why}")))
        }
    }
}

/// The parameters completions and chat share.
#[derive(Clone, Debug)]
pub struct Common {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub n: usize,
    pub stop: Vec<String>,
    pub stop_ids: Vec<u32>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A seed from the process's random hasher keys, for requests that give none.
fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Check `model` names the served model.
pub fn check_model(f: &Fields, cfg: &ServerConfig) -> Result<(), ApiError> {
    if let Some(m) = f.string("model")? {
        if !cfg.model_names.iter().any(|n| n == m) {
            return Err(ApiError::invalid(
                "model",
                format!(
                    "the model `{m}` does not exist on this server; it serves `{}`",
                    cfg.model_names.first().map_or("", String::as_str)
                ),
            )
            .with_code("model_not_found"));
        }
    }
    Ok(())
}

/// Parse the shared fields. `max_tokens_fields` are the names accepted for the
/// token budget, in order of precedence.
pub fn common(
    f: &Fields,
    cfg: &ServerConfig,
    info: &ModelInfo,
    default_max_tokens: usize,
    max_tokens_fields: &[&str],
) -> Result<Common, ApiError> {
    check_model(f, cfg)?;
    let mut max_tokens = default_max_tokens.min(cfg.max_tokens_limit);
    for name in max_tokens_fields {
        if let Some(m) = f.integer(name, 0, cfg.max_tokens_limit as i128)? {
            max_tokens = m as usize;
            break;
        }
    }
    let top_k = match f.integer("top_k", -1, u32::MAX as i128)? {
        None | Some(-1) => 0,
        Some(k) => k as usize,
    };
    let seed = match f.get("seed") {
        None => random_seed(),
        Some(v) => match as_integer(v) {
            Some(s) if s >= i64::MIN as i128 && s <= u64::MAX as i128 => s as u64,
            Some(s) => return Err(ApiError::invalid("seed", format!("`seed` is out of range: {s}"))),
            None => return Err(wrong_type("seed", "an integer", v)),
        },
    };
    let sampling = SamplingParams {
        temperature: f.number("temperature", 1.0, 0.0, 2.0, false)?,
        top_k,
        top_p: f.number("top_p", 1.0, 0.0, 1.0, true)?,
        min_p: f.number("min_p", 0.0, 0.0, 1.0, false)?,
        repetition_penalty: f.number("repetition_penalty", 1.0, 0.0, 10.0, true)?,
        presence_penalty: f.number("presence_penalty", 0.0, -2.0, 2.0, false)?,
        frequency_penalty: f.number("frequency_penalty", 0.0, -2.0, 2.0, false)?,
        seed,
    };
    let n = f.integer("n", 1, info.slots as i128).map_err(|mut e| {
        e.message += &format!(" (n is at most the server's {} state slots)", info.slots);
        e
    })?;
    let n = n.unwrap_or(1) as usize;
    if let Some(b) = f.integer("best_of", 1, i128::MAX)? {
        if b as usize != n {
            return Err(ApiError::invalid("best_of", "`best_of` other than `n` is not supported"));
        }
    }
    let stop = match f.get("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > MAX_STOP_STRINGS {
                return Err(ApiError::invalid(
                    "stop",
                    format!("`stop` has {} strings, more than {MAX_STOP_STRINGS}", a.len()),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(ApiError::invalid(
                        "stop",
                        format!("`stop[{i}]` must be a string, not {}", type_name(v)),
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    let mut stop_ids = match f.get("stop_token_ids") {
        None => vec![],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                as_integer(v).filter(|&t| t >= 0 && t < info.vocab as i128).map(|t| t as u32).ok_or_else(
                    || {
                        ApiError::invalid(
                            "stop_token_ids",
                            format!("`stop_token_ids` holds {v}, not a token id"),
                        )
                    },
                )
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong_type("stop_token_ids", "an array of token ids", v)),
    };
    if !f.bool("ignore_eos")?.unwrap_or(false) {
        stop_ids.extend(&info.eos);
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(wrong_type("stream_options.include_usage", "a boolean", v)),
        },
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    f.unsupported("logit_bias", "no logit biases")?;
    Ok(Common { max_tokens, sampling, n, stop, stop_ids, stream, include_usage })
}

/// `logprobs` of the completions API: an integer in 0..=20, or absent.
pub fn completion_logprobs(f: &Fields) -> Result<Option<usize>, ApiError> {
    Ok(f.integer("logprobs", 0, MAX_TOP_LOGPROBS as i128)?.map(|n| n as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Value) -> Fields {
        match v {
            Value::Object(m) => Fields(m),
            _ => unreachable!(),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let f = fields(serde_json::json!({"a": "x", "b": 3.5, "c": 7, "d": null, "e": 2.0}));
        assert_eq!(f.integer("a", 0, 10).unwrap_err().param.as_deref(), Some("a"));
        assert!(f.integer("b", 0, 10).unwrap_err().message.contains("an integer"));
        assert!(f.integer("c", 0, 5).unwrap_err().message.contains("0..=5"));
        assert_eq!(f.integer("d", 0, 5).unwrap(), None, "null is absent");
        assert_eq!(f.integer("e", 0, 5).unwrap(), Some(2));
        assert!(f.number("c", 0.0, 0.0, 2.0, false).unwrap_err().message.contains("[0, 2]"));
        assert!(parse_body(b"[1]").unwrap_err().message.contains("JSON object"));
        assert_eq!(parse_body(b"{").unwrap_err().code, Some("invalid_json"));
    }
}
