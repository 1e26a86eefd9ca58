//! `mamba-rs convert` and `mamba-rs quantize`: a model directory rewritten
//! as one safetensors file whose tensors start on cache lines, as stored,
//! cast to another float dtype, or with Q8_0 matrices ([`crate::quantize`]).
//!
//! A Hugging Face file maps its tensors wherever its header ends (a
//! multiple of 8), so products over its weights load every other vector
//! across two cache lines (criterion: 6-15% slower where compute-bound).
//! The files written here start every tensor of a published shape on a
//! line. Any source the loader reads (sharded or not, `.bin` or
//! safetensors, either layout) comes out as one `model.safetensors` under
//! the source's own tensor names, with its config and tokenizer files.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use half::{bf16, f16};
use mamba_core::{DType, Tensor, Q8_BLOCK};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::config::{read_json_object, Q8_0_METHOD};
use crate::error::{Error, Result};
use crate::model::{LoadedModel, Q8_SCALE_SUFFIX};
use crate::quantize::{quantize_q8_0, QUANTIZED};

/// What [`convert_model`] makes of a checkpoint's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every tensor as stored (only the file changes).
    AsStored,
    /// Every float tensor cast to this float dtype (round to nearest even),
    /// as transformers' `model.to(dtype)` then `save_pretrained` would.
    Float(DType),
    /// The matrices that decode streams in Q8_0 blocks, the rest as stored.
    Q8_0,
}

/// What a conversion did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Tensors changed: quantized to Q8_0, or cast.
    pub converted: usize,
    /// Matrices left as they were because their rows are not whole blocks.
    pub skipped: Vec<String>,
    /// Tensors copied unchanged.
    pub kept: usize,
    /// Weight bytes before and after.
    pub bytes_in: usize,
    pub bytes_out: usize,
}

/// A tensor to write: dtype, shape and little-endian bytes.
pub(crate) struct Out {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::Q8_0 => safetensors::Dtype::I8,
    }
}

/// transformers' name of a float dtype (`torch_dtype` in config.json).
fn torch_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::Q8_0 => "int8",
    }
}

/// The `n` values of `bytes` (stored as `from`) as `to`'s little-endian bytes.
fn cast(name: &str, from: DType, bytes: &[u8], n: usize, to: DType) -> Result<Vec<u8>> {
    let src = Tensor::from_bytes(from, bytes, 1, n, "tensor to cast")?;
    let per = to.size();
    let mut out = vec![0u8; n * per];
    out.par_chunks_mut(per * 4096).enumerate().try_for_each(|(c, dst)| {
        for (j, d) in dst.chunks_exact_mut(per).enumerate() {
            let v = src.data.get(c * 4096 + j);
            match to {
                DType::F32 => d.copy_from_slice(&v.to_le_bytes()),
                DType::BF16 => d.copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
                DType::F16 => {
                    let h = f16::from_f32(v);
                    if h.is_infinite() && v.is_finite() {
                        return Err(Error::Input(format!(
                            "tensor `{name}` holds {v}, past f16's range (65504): convert to bf16 instead"
                        )));
                    }
                    d.copy_from_slice(&h.to_le_bytes())
                }
                DType::Q8_0 => unreachable!("Q8_0 goes through quantize_q8_0"),
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Write `model` into the directory `out` (created if missing) as `target`
/// says. Refuses to overwrite a model there unless `force`, to write into
/// the model's own directory, and to convert a Q8_0 model (convert its
/// source instead: the Q8_0 rounding is already in it).
pub fn convert_model(model: &LoadedModel, out: &Path, target: Target, force: bool) -> Result<Summary> {
    if let Target::Float(DType::Q8_0) = target {
        return Err(Error::Input("Q8_0 is not a float dtype: quantize instead".into()));
    }
    let same = out.canonicalize().ok().zip(model.dir.canonicalize().ok()).is_some_and(|(a, b)| a == b);
    if same {
        return Err(Error::Input(format!("--out {} is the model's own directory", out.display())));
    }
    if out.join("config.json").exists() && !force {
        return Err(Error::Input(format!(
            "{} already holds a model (config.json); pass --force to overwrite it",
            out.display()
        )));
    }
    let store = model.tensors();
    let mut names: Vec<&str> = store.names().collect();
    names.sort_unstable();
    let mut tensors: Vec<(String, Out)> = Vec::with_capacity(names.len() + 8);
    let mut sum = Summary { converted: 0, skipped: vec![], kept: 0, bytes_in: 0, bytes_out: 0 };
    for name in names {
        let t = store.get(name)?;
        if t.dtype == DType::Q8_0 {
            return Err(Error::Input(format!("{}: tensor `{name}` is already Q8_0", model.dir.display())));
        }
        sum.bytes_in += t.bytes.len();
        let matrix = QUANTIZED.iter().any(|s| name.ends_with(s)) && t.shape.len() == 2;
        match target {
            Target::Q8_0 if matrix && t.shape[1] % Q8_BLOCK == 0 => {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                let w = Tensor::from_bytes(t.dtype, t.bytes, rows, cols, "weight to quantize")?;
                let (q, d) = quantize_q8_0(&w)?;
                let scale = Out {
                    dtype: safetensors::Dtype::F16,
                    shape: vec![rows, cols / Q8_BLOCK],
                    bytes: bytemuck::cast_slice(&d).to_vec(),
                };
                tensors.push((format!("{name}{Q8_SCALE_SUFFIX}"), scale));
                let quants = Out {
                    dtype: safetensors::Dtype::I8,
                    shape: t.shape.to_vec(),
                    bytes: q.iter().map(|&x| x as u8).collect(),
                };
                tensors.push((name.to_string(), quants));
                sum.converted += 1;
            }
            Target::Float(to) if to != t.dtype => {
                let n = t.shape.iter().product();
                let bytes = cast(name, t.dtype, t.bytes, n, to)?;
                tensors.push((name.to_string(), Out { dtype: st_dtype(to), shape: t.shape.to_vec(), bytes }));
                sum.converted += 1;
            }
            _ => {
                if matrix && target == Target::Q8_0 {
                    sum.skipped.push(name.to_string());
                }
                let kept = Out { dtype: st_dtype(t.dtype), shape: t.shape.to_vec(), bytes: t.bytes.to_vec() };
                tensors.push((name.to_string(), kept));
                sum.kept += 1;
            }
        }
    }
    sum.bytes_out = tensors.iter().map(|(_, t)| t.bytes.len()).sum();

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    copy_side_files(&model.dir, out, &card(&model.dir, target))?;
    let mut cfg = read_json_object(&model.dir.join("config.json"))?;
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("converted_by".to_string(), format!("mamba-rs {}", env!("CARGO_PKG_VERSION"))),
    ]);
    match target {
        Target::Q8_0 => {
            cfg.insert(
                "quantization_config".into(),
                json!({
                    "quant_method": Q8_0_METHOD,
                    "bits": 8,
                    "group_size": Q8_BLOCK,
                    "scale_dtype": "float16",
                    "scale_suffix": Q8_SCALE_SUFFIX,
                    "modules_not_converted": sum.skipped,
                }),
            );
            meta.insert("quantization".into(), Q8_0_METHOD.into());
        }
        Target::Float(to) => set_dtype(&mut cfg, to),
        Target::AsStored => {}
    }
    let cfg_path = out.join("config.json");
    let text = serde_json::to_string_pretty(&Value::Object(cfg)).map_err(|e| Error::Input(e.to_string()))?;
    std::fs::write(&cfg_path, text + "\n").map_err(|e| Error::io(&cfg_path, e))?;
    write_aligned(&tensors, &meta, &out.join("model.safetensors"))?;
    Ok(sum)
}

/// Name `to` as the model's dtype: in `torch_dtype` (and in transformers
/// 5's `dtype`, where the config has it).
fn set_dtype(cfg: &mut Map<String, Value>, to: DType) {
    if cfg.contains_key("dtype") {
        cfg.insert("dtype".into(), torch_name(to).into());
    }
    if cfg.contains_key("torch_dtype") || !cfg.contains_key("dtype") {
        cfg.insert("torch_dtype".into(), torch_name(to).into());
    }
}

/// The model card of the copy: where it came from and what was done.
fn card(src: &Path, target: Target) -> String {
    let what = match target {
        Target::AsStored => {
            "every tensor as stored in the source, each starting on a 64-byte cache line".to_string()
        }
        Target::Float(to) => format!("every float tensor cast to {} (round to nearest even)", to.name()),
        Target::Q8_0 => {
            "the linear layers' matrices and the embedding in 8-bit blocks of 32 weights with one f16 \
                         scale each (`<name>_scale`); everything else as stored in the source. See \
                         `quantization_config` in config.json"
                .to_string()
        }
    };
    let title = match target {
        Target::AsStored => "Copy".to_string(),
        Target::Float(to) => format!("{} copy", to.name()),
        Target::Q8_0 => "Q8_0 copy".to_string(),
    };
    format!("# {title} of `{}`\n\nMade by `mamba-rs` {}: {what}.\n", src.display(), env!("CARGO_PKG_VERSION"))
}

/// Where a tensor's bytes start in the files [`write_aligned`] makes.
pub const TENSOR_ALIGN: usize = 64;

/// A safetensors file whose tensors start on [`TENSOR_ALIGN`] bytes (a
/// cache line) when mapped: the header is padded with spaces (as the format
/// allows) so the data starts there, and tensors whose sizes are whole
/// cache lines come first. Products over weights that start mid-line load
/// every other vector across two lines (criterion, Q8_0: 7-15% slower);
/// `serialize_to_file` aligns to 8 only.
fn write_aligned(tensors: &[(String, Out)], meta: &HashMap<String, String>, path: &Path) -> Result<()> {
    let odd = |t: &Out| !t.bytes.len().is_multiple_of(TENSOR_ALIGN);
    let mut order: Vec<&(String, Out)> = tensors.iter().collect();
    order.sort_by(|(a, s), (b, t)| (odd(s), a).cmp(&(odd(t), b)));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!(meta));
    let mut offset = 0;
    for (name, t) in &order {
        let end = offset + t.bytes.len();
        header
            .insert(name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    // 8 bytes of length, then the header: the data starts at a multiple of the alignment.
    text.resize((8 + text.len()).next_multiple_of(TENSOR_ALIGN) - 8, b' ');
    let io = |e| Error::io(path, e);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&text).map_err(io)?;
    for (_, t) in &order {
        f.write_all(&t.bytes).map_err(io)?;
    }
    f.flush().map_err(io)
}

/// Copy the tokenizer and the other small files: everything but weights,
/// shard indexes, config.json and the source's model card (it describes
/// other weights), which becomes `card`: where these came from.
fn copy_side_files(src: &Path, dst: &Path, card: &str) -> Result<()> {
    let weights = |n: &str| {
        n == "config.json"
            || n == "README.md"
            || n.ends_with(".safetensors")
            || n.ends_with(".bin")
            || n.ends_with(".index.json")
            || n.ends_with(".pt")
            || n.ends_with(".pth")
    };
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let p = e.map_err(|e| Error::io(src, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_file() && !weights(name) && !name.starts_with('.') {
            std::fs::copy(&p, dst.join(name)).map_err(|e| Error::io(&p, e))?;
        }
    }
    let path = dst.join("README.md");
    std::fs::write(&path, card).map_err(|e| Error::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts_round_to_nearest_even_and_refuse_what_f16_cannot_hold() {
        let v = [1.0f32, -2.5, 1.0 + 1.0 / 256.0 + 1e-7, f32::NAN, 65504.0, 0.0];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let b = cast("w", DType::F32, &bytes, v.len(), DType::BF16).unwrap();
        let got: Vec<bf16> = b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(got[2], bf16::from_f32(1.0 + 1.0 / 128.0), "rounds up past the tie");
        assert!(got[3].is_nan() && got[..2] == [bf16::from_f32(1.0), bf16::from_f32(-2.5)]);
        let h = cast("w", DType::F32, &bytes, v.len(), DType::F16).unwrap();
        assert_eq!(f16::from_le_bytes([h[8], h[9]]), f16::MAX);
        let wide = cast("w", DType::BF16, &b, v.len(), DType::F32).unwrap();
        assert_eq!(&wide[..4], &1.0f32.to_le_bytes());
        let big: Vec<u8> = 1e6f32.to_le_bytes().to_vec();
        let e = cast("layers.0.w", DType::F32, &big, 1, DType::F16).unwrap_err().to_string();
        assert!(e.contains("layers.0.w") && e.contains("f16's range"), "{e}");
    }

    #[test]
    fn written_tensors_start_on_cache_lines_and_read_back() {
        use safetensors::Dtype;
        let out = |dtype, shape: Vec<usize>, n: usize| Out {
            dtype,
            shape,
            bytes: (0..n).map(|i| i as u8).collect(),
        };
        // An odd-sized tensor first by name: it must go last.
        let tensors = vec![
            ("a.odd".to_string(), out(Dtype::F16, vec![3, 5], 30)),
            ("b.q".to_string(), out(Dtype::I8, vec![2, 64], 128)),
            ("c.scale".to_string(), out(Dtype::F16, vec![2, 64], 256)),
            ("d.tail".to_string(), out(Dtype::I8, vec![7], 7)),
        ];
        let meta = HashMap::from([("quantization".to_string(), "q8_0".to_string())]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        write_aligned(&tensors, &meta, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (n, parsed) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let data = 8 + n;
        assert!(data.is_multiple_of(TENSOR_ALIGN), "data at {data}");
        assert_eq!(
            parsed.metadata().as_ref().and_then(|m| m.get("quantization")).map(String::as_str),
            Some("q8_0")
        );
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in &tensors {
            let v = st.tensor(name).unwrap();
            assert_eq!((v.dtype(), v.shape(), v.data()), (t.dtype, &t.shape[..], &t.bytes[..]), "{name}");
            let at = v.data().as_ptr() as usize - bytes.as_ptr() as usize;
            // The whole-line tensors, then the first odd one, start on a line.
            let on_line = t.bytes.len().is_multiple_of(TENSOR_ALIGN) || name == "a.odd";
            assert_eq!(at.is_multiple_of(TENSOR_ALIGN), on_line, "{name} at {at}");
        }
    }
}
