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

use std::borrow::Cow;
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

/// A tensor of the copy as its header names it: dtype and shape. Its
/// bytes are made only when [`write_aligned`] writes it.
struct Entry<'m> {
    name: String,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    make: Make<'m>,
}

impl<'m> Entry<'m> {
    fn new(name: String, dtype: DType, shape: Vec<usize>, make: Make<'m>) -> Self {
        Entry { name, dtype: st_dtype(dtype), shape, make }
    }

    /// Its length in bytes.
    fn len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// How an [`Entry`]'s bytes are made from the source's.
#[derive(Clone, Copy)]
enum Make<'m> {
    /// The source's bytes as they are.
    Keep(&'m [u8]),
    /// Cast from `from` to `to`, value by value.
    Cast { from: DType, bytes: &'m [u8], to: DType },
    /// The quants (`scales: false`) or the scales of a `[rows, cols]`
    /// matrix's Q8_0 blocks.
    Q8 { from: DType, bytes: &'m [u8], rows: usize, cols: usize, scales: bool },
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
    // First the plan (names, dtypes, shapes: the header), then one tensor
    // at a time made and written: a copy never holds more than the
    // largest tensor, however large the model.
    let mut entries: Vec<Entry<'_>> = Vec::with_capacity(names.len() + 8);
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
                let q8 = |scales| Make::Q8 { from: t.dtype, bytes: t.bytes, rows, cols, scales };
                entries.push(Entry::new(name.to_string(), DType::Q8_0, t.shape.to_vec(), q8(false)));
                let (scales, shape) = (format!("{name}{Q8_SCALE_SUFFIX}"), vec![rows, cols / Q8_BLOCK]);
                entries.push(Entry::new(scales, DType::F16, shape, q8(true)));
                sum.converted += 1;
            }
            Target::Float(to) if to != t.dtype => {
                let make = Make::Cast { from: t.dtype, bytes: t.bytes, to };
                entries.push(Entry::new(name.to_string(), to, t.shape.to_vec(), make));
                sum.converted += 1;
            }
            _ => {
                if matrix && target == Target::Q8_0 {
                    sum.skipped.push(name.to_string());
                }
                let make = Make::Keep(t.bytes);
                entries.push(Entry::new(name.to_string(), t.dtype, t.shape.to_vec(), make));
                sum.kept += 1;
            }
        }
    }
    sum.bytes_out = entries.iter().map(Entry::len).sum();

    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // The weights go to a file of their own name first: a tensor that
    // cannot be cast (or quantized) halfway through leaves nothing behind,
    // and a model already in `out` (`force`) stays whole until then.
    let partial = out.join("model.safetensors.partial");
    let written = write_copy(model, out, target, &entries, &sum.skipped, &partial);
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written.map(|()| sum)
}

/// [`convert_model`]'s writing: the weights into `partial`, the side
/// files and config.json, then `partial` renamed into place.
fn write_copy(
    model: &LoadedModel,
    out: &Path,
    target: Target,
    entries: &[Entry<'_>],
    skipped: &[String],
    partial: &Path,
) -> Result<()> {
    let mut scales: HashMap<String, Vec<u8>> = HashMap::new();
    write_aligned(entries, &meta(target), partial, |e| make(e, &mut scales))?;
    copy_side_files(&model.dir, out, &card(&model.dir, target))?;
    let mut cfg = read_json_object(&model.dir.join("config.json"))?;
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
                    "modules_not_converted": skipped,
                }),
            );
        }
        Target::Float(to) => set_dtype(&mut cfg, to),
        Target::AsStored => {}
    }
    let cfg_path = out.join("config.json");
    let text = serde_json::to_string_pretty(&Value::Object(cfg)).map_err(|e| Error::Input(e.to_string()))?;
    std::fs::write(&cfg_path, text + "\n").map_err(|e| Error::io(&cfg_path, e))?;
    let path = out.join("model.safetensors");
    std::fs::rename(partial, &path).map_err(|e| Error::io(&path, e))
}

/// The safetensors metadata of a copy made for `target`.
fn meta(target: Target) -> HashMap<String, String> {
    let mut meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("converted_by".to_string(), format!("mamba-rs {}", env!("CARGO_PKG_VERSION"))),
    ]);
    if target == Target::Q8_0 {
        meta.insert("quantization".into(), Q8_0_METHOD.into());
    }
    meta
}

/// `e`'s bytes. A matrix is quantized once: the scales made with its
/// quants wait in `scales` (under the scales' name) until they are written.
/// `write_aligned`'s order always puts the quants first (`x` sorts before
/// `x_scale`, and scales fill whole lines only when their quants do); scales
/// met first would be made from a quantization of their own, the same bytes.
fn make<'m>(e: &Entry<'m>, scales: &mut HashMap<String, Vec<u8>>) -> Result<Cow<'m, [u8]>> {
    match e.make {
        Make::Keep(bytes) => Ok(Cow::Borrowed(bytes)),
        Make::Cast { from, bytes, to } => {
            Ok(cast(&e.name, from, bytes, e.shape.iter().product(), to)?.into())
        }
        Make::Q8 { from, bytes, rows, cols, scales: want_scales } => {
            if let Some(d) = want_scales.then(|| scales.remove(&e.name)).flatten() {
                return Ok(d.into());
            }
            let w = Tensor::from_bytes(from, bytes, rows, cols, "weight to quantize")?;
            let (q, d) = quantize_q8_0(&w)?;
            let d: Vec<u8> = bytemuck::cast_slice(&d).to_vec();
            if want_scales {
                return Ok(d.into());
            }
            scales.insert(format!("{}{Q8_SCALE_SUFFIX}", e.name), d);
            Ok(q.into_iter().map(|x| x as u8).collect::<Vec<u8>>().into())
        }
    }
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

/// Where a tensor's bytes start in the files `write_aligned` makes.
pub const TENSOR_ALIGN: usize = 64;

/// A safetensors file whose tensors start on [`TENSOR_ALIGN`] bytes (a
/// cache line) when mapped: the header is padded with spaces (as the format
/// allows) so the data starts there, and tensors whose sizes are whole
/// cache lines come first. Products over weights that start mid-line load
/// every other vector across two lines (criterion, Q8_0: 7-15% slower);
/// `serialize_to_file` aligns to 8 only.
fn write_aligned<'m>(
    entries: &[Entry<'m>],
    meta: &HashMap<String, String>,
    path: &Path,
    mut bytes: impl FnMut(&Entry<'m>) -> Result<Cow<'m, [u8]>>,
) -> Result<()> {
    let odd = |e: &Entry<'_>| !e.len().is_multiple_of(TENSOR_ALIGN);
    let mut order: Vec<&Entry<'_>> = entries.iter().collect();
    order.sort_by(|a, b| (odd(a), &a.name).cmp(&(odd(b), &b.name)));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!(meta));
    let mut offset = 0;
    for e in &order {
        let end = offset + e.len();
        header.insert(
            e.name.clone(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    // 8 bytes of length, then the header: the data starts at a multiple of the alignment.
    text.resize((8 + text.len()).next_multiple_of(TENSOR_ALIGN) - 8, b' ');
    let io = |e| Error::io(path, e);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&text).map_err(io)?;
    for e in &order {
        let b = bytes(e)?;
        if b.len() != e.len() {
            return Err(Error::Input(format!(
                "tensor `{}`: made {} bytes, planned {}",
                e.name,
                b.len(),
                e.len()
            )));
        }
        f.write_all(&b).map_err(io)?;
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
        let data: Vec<Vec<u8>> =
            [30usize, 128, 256, 7].iter().map(|&n| (0..n).map(|i| i as u8).collect()).collect();
        let entry = |name: &str, dtype, shape: Vec<usize>, bytes: &'static [u8]| Entry {
            name: name.to_string(),
            dtype,
            shape,
            make: Make::Keep(bytes),
        };
        let data: &'static [Vec<u8>] = Vec::leak(data);
        // An odd-sized tensor first by name: it must go last.
        let tensors = vec![
            entry("a.odd", Dtype::F16, vec![3, 5], &data[0]),
            entry("b.q", Dtype::I8, vec![2, 64], &data[1]),
            entry("c.scale", Dtype::F16, vec![2, 64], &data[2]),
            entry("d.tail", Dtype::I8, vec![7], &data[3]),
        ];
        let meta = HashMap::from([("quantization".to_string(), "q8_0".to_string())]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut none = HashMap::new();
        write_aligned(&tensors, &meta, &path, |e| make(e, &mut none)).unwrap();
        // A tensor whose bytes do not come out as planned is an error.
        let short = [entry("x", Dtype::I8, vec![9], &data[3])];
        let bad = dir.path().join("bad.safetensors");
        let e = write_aligned(&short, &meta, &bad, |e| make(e, &mut none)).unwrap_err().to_string();
        assert!(e.contains("`x`") && e.contains("planned 9"), "{e}");
        let bytes = std::fs::read(&path).unwrap();
        let (n, parsed) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let data = 8 + n;
        assert!(data.is_multiple_of(TENSOR_ALIGN), "data at {data}");
        assert_eq!(
            parsed.metadata().as_ref().and_then(|m| m.get("quantization")).map(String::as_str),
            Some("q8_0")
        );
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for t in &tensors {
            let (name, Make::Keep(want)) = (&t.name, t.make) else { unreachable!() };
            let v = st.tensor(name).unwrap();
            assert_eq!((v.dtype(), v.shape(), v.data()), (t.dtype, &t.shape[..], want), "{name}");
            let at = v.data().as_ptr() as usize - bytes.as_ptr() as usize;
            // The whole-line tensors, then the first odd one, start on a line.
            let on_line = t.len().is_multiple_of(TENSOR_ALIGN) || name == "a.odd";
            assert_eq!(at.is_multiple_of(TENSOR_ALIGN), on_line, "{name} at {at}");
        }
    }
}
