//! `mamba-rs quantize`: a checkpoint with Q8_0 matrices.
//!
//! Q8_0 (GGUF's 8-bit blocks): each row of a matrix is cut into blocks of
//! 32 weights; a block stores one f16 scale `d = max|w| / 127` and 32 int8
//! quants `q = round(w / d)`, so a weight is `q * d` (1.0625 bytes instead of
//! 2 or 4). The matrices that decode streams are quantized: `in_proj`,
//! `x_proj`, `dt_proj`, `out_proj`, the embedding and an untied `lm_head`,
//! each when its rows are whole blocks. Everything else (norms, conv1d,
//! biases, A_log, D) is small and is kept as stored.
//!
//! The output is a model directory: `model.safetensors` with each quantized
//! weight as an `I8` tensor under its own name plus an `F16` tensor
//! `<name>_scale` (`[rows, cols / 32]`), and `config.json` with
//! `quantization_config = {"quant_method": "q8_0", ...}`; the tokenizer and
//! other files are copied. `--model` loads it like any checkpoint.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use half::f16;
use mamba_core::{DType, Tensor, Q8_BLOCK};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::config::{read_json_object, Q8_0_METHOD};
use crate::error::{Error, Result};
use crate::model::{LoadedModel, Q8_SCALE_SUFFIX};

/// Names (suffixes) of the matrices that are quantized.
const QUANTIZED: [&str; 7] = [
    ".in_proj.weight",
    ".x_proj.weight",
    ".dt_proj.weight",
    ".out_proj.weight",
    "backbone.embeddings.weight",
    "backbone.embedding.weight",
    "lm_head.weight",
];

/// What a quantization did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Tensors stored as Q8_0.
    pub quantized: usize,
    /// Matrices left as they were because their rows are not whole blocks.
    pub skipped: Vec<String>,
    /// Tensors copied unchanged.
    pub kept: usize,
    /// Weight bytes before and after.
    pub bytes_in: usize,
    pub bytes_out: usize,
}

/// The Q8_0 blocks of `w` (`[rows, cols]`, `cols` a multiple of 32):
/// quants `[rows * cols]` and scales `[rows * cols / 32]`.
pub fn quantize_q8_0(w: &Tensor<'_>) -> Result<(Vec<i8>, Vec<f16>)> {
    if !w.cols.is_multiple_of(Q8_BLOCK) {
        return Err(Error::Input(format!(
            "Q8_0 needs rows of whole {Q8_BLOCK}-weight blocks, got {}",
            w.cols
        )));
    }
    let blocks = w.len() / Q8_BLOCK;
    let mut q = vec![0i8; w.len()];
    let mut d = vec![f16::ZERO; blocks];
    q.par_chunks_mut(Q8_BLOCK).zip(d.par_iter_mut()).enumerate().try_for_each(|(b, (qb, db))| {
        let v: [f32; Q8_BLOCK] = std::array::from_fn(|j| w.data.get(b * Q8_BLOCK + j));
        let amax = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        if !amax.is_finite() || amax / 127.0 > f16::MAX.to_f32() {
            return Err(Error::Input(format!(
                "weight block {b} (row {}) holds {amax}, past what an f16 scale can express",
                b * Q8_BLOCK / w.cols
            )));
        }
        // The scale as stored (f16) is the one the quants are rounded to.
        *db = f16::from_f32(amax / 127.0);
        let s = db.to_f32();
        if s > 0.0 {
            for (qv, x) in qb.iter_mut().zip(v) {
                *qv = (x / s).round().clamp(-127.0, 127.0) as i8;
            }
        }
        Ok(())
    })?;
    Ok((q, d))
}

/// A tensor to write: dtype, shape and little-endian bytes.
struct Out {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::Q8_0 => safetensors::Dtype::I8,
    }
}

/// Write `model` with Q8_0 matrices into the directory `out` (created if
/// missing). Refuses to overwrite a model there unless `force`.
pub fn quantize_model(model: &LoadedModel, out: &Path, force: bool) -> Result<Summary> {
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
    let mut sum = Summary { quantized: 0, skipped: vec![], kept: 0, bytes_in: 0, bytes_out: 0 };
    for name in names {
        let t = store.get(name)?;
        if t.dtype == DType::Q8_0 {
            return Err(Error::Input(format!("{}: tensor `{name}` is already Q8_0", model.dir.display())));
        }
        sum.bytes_in += t.bytes.len();
        let matrix = QUANTIZED.iter().any(|s| name.ends_with(s)) && t.shape.len() == 2;
        if matrix && t.shape[1] % Q8_BLOCK == 0 {
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
            sum.quantized += 1;
        } else {
            if matrix {
                sum.skipped.push(name.to_string());
            }
            let kept = Out { dtype: st_dtype(t.dtype), shape: t.shape.to_vec(), bytes: t.bytes.to_vec() };
            tensors.push((name.to_string(), kept));
            sum.kept += 1;
        }
    }
    sum.bytes_out = tensors.iter().map(|(_, t)| t.bytes.len()).sum();

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    copy_side_files(&model.dir, out)?;
    write_config(&model.dir.join("config.json"), &out.join("config.json"), &sum)?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("quantization".to_string(), Q8_0_METHOD.to_string()),
        ("quantized_by".to_string(), format!("mamba-rs {}", env!("CARGO_PKG_VERSION"))),
    ]);
    let path = out.join("model.safetensors");
    write_aligned(&tensors, &meta, &path)?;
    Ok(sum)
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

/// The source config with `quantization_config` added.
fn write_config(src: &Path, dst: &Path, sum: &Summary) -> Result<()> {
    let mut cfg = read_json_object(src)?;
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
    let text = serde_json::to_string_pretty(&Value::Object(cfg)).map_err(|e| Error::Input(e.to_string()))?;
    std::fs::write(dst, text + "\n").map_err(|e| Error::io(dst, e))
}

/// Copy the tokenizer and the other small files: everything but weights,
/// shard indexes, config.json and the source's model card (it describes
/// other weights), which becomes a note of where these came from.
fn copy_side_files(src: &Path, dst: &Path) -> Result<()> {
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
    let card = dst.join("README.md");
    let note = format!(
        "# Q8_0 copy of `{}`\n\nMade by `mamba-rs quantize` (mamba-rs {}): the linear layers' matrices and the \
         embedding in 8-bit blocks of 32 weights with one f16 scale each (`<name>_scale`); everything else as \
         stored in the source. See `quantization_config` in config.json.\n",
        src.display(),
        env!("CARGO_PKG_VERSION")
    );
    std::fs::write(&card, note).map_err(|e| Error::io(&card, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamba_core::WData;

    #[test]
    fn blocks_round_to_the_stored_scale_and_keep_zero_blocks_zero() {
        let cols = 64;
        let mut v: Vec<f32> = (0..2 * cols).map(|i| ((i as f32) * 0.731).sin() * 0.05).collect();
        v[cols..cols + 32].iter_mut().for_each(|x| *x = 0.0);
        v[5] = -0.2; // the block's max magnitude, negative
        let w = Tensor::new(WData::F32(&v), 2, cols, "w").unwrap();
        let (q, d) = quantize_q8_0(&w).unwrap();
        assert_eq!((q.len(), d.len()), (128, 4));
        assert_eq!(q[5], -127);
        assert_eq!(d[0], f16::from_f32(0.2 / 127.0));
        assert_eq!(d[2], f16::ZERO);
        assert!(q[cols..cols + 32].iter().all(|&x| x == 0));
        let t = Tensor::new(WData::Q8_0 { q: &q, d: &d }, 2, cols, "q").unwrap();
        for (i, &x) in v.iter().enumerate() {
            let s = d[i / 32].to_f32();
            assert!((t.data.get(i) - x).abs() <= 0.5 * s + 1e-9, "{i}: {} vs {x}", t.data.get(i));
        }
        let odd = Tensor::new(WData::F32(&v[..48]), 1, 48, "odd").unwrap();
        assert!(quantize_q8_0(&odd).unwrap_err().to_string().contains("whole 32-weight blocks"));
        let big = [1e9f32; 32];
        let t = Tensor::new(WData::F32(&big), 1, 32, "big").unwrap();
        assert!(quantize_q8_0(&t).unwrap_err().to_string().contains("f16 scale"));
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
