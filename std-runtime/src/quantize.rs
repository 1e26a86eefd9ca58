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
//! The output ([`crate::convert`] writes it) is a model directory:
//! `model.safetensors` with each quantized weight as an `I8` tensor under
//! its own name plus an `F16` tensor `<name>_scale` (`[rows, cols / 32]`),
//! and `config.json` with `quantization_config = {"quant_method": "q8_0",
//! ...}`; the tokenizer and other files are copied. `--model` loads it like
//! any checkpoint.

use std::path::Path;

use half::f16;
use mamba_core::{Tensor, Q8_BLOCK};
use rayon::prelude::*;

use crate::convert::{convert_model, Target};
pub use crate::convert::{Summary, TENSOR_ALIGN};
use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// Names (suffixes) of the matrices that are quantized.
pub(crate) const QUANTIZED: [&str; 7] = [
    ".in_proj.weight",
    ".x_proj.weight",
    ".dt_proj.weight",
    ".out_proj.weight",
    "backbone.embeddings.weight",
    "backbone.embedding.weight",
    "lm_head.weight",
];

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

/// Write `model` with Q8_0 matrices into the directory `out` (created if
/// missing); see [`convert_model`].
pub fn quantize_model(model: &LoadedModel, out: &Path, force: bool) -> Result<Summary> {
    convert_model(model, out, Target::Q8_0, force)
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
}
