//! Borrowed weight views in their stored dtype.
//!
//! A [`Tensor`] is a 2-D row-major view `[rows, cols]` over f32, f16 or bf16
//! elements, or over 8-bit blocks ([`DType::Q8_0`]). Vectors are `[1, n]`.
//! Nothing is converted: the kernels widen to f32 in registers as they read.

use crate::error::CoreError;
use half::{bf16, f16};

/// Element type of stored weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Blocks of [`Q8_BLOCK`] int8 weights along a row, each block with one
    /// f16 scale (GGUF's Q8_0): weight = `q * d`. A row's length is a whole
    /// number of blocks.
    Q8_0,
}

/// Weights per block of [`DType::Q8_0`].
pub const Q8_BLOCK: usize = 32;

impl DType {
    /// Bytes per element (Q8_0: the int8 quants; its scales come on top,
    /// see [`DType::bytes_for`]).
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 1,
        }
    }
    /// Stored bytes of `n` elements, Q8_0 scales included.
    pub const fn bytes_for(self, n: usize) -> usize {
        match self {
            DType::Q8_0 => n + 2 * n.div_ceil(Q8_BLOCK),
            _ => n * self.size(),
        }
    }
    /// Lower-case name as used in file formats and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
        }
    }
}

/// The elements of a weight, in their stored type.
#[derive(Clone, Copy, Debug)]
pub enum WData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Q8_0: `q` the int8 quants, `d` one scale per [`Q8_BLOCK`] of them
    /// (`d.len() * Q8_BLOCK == q.len()`; views start on a block).
    Q8_0 {
        q: &'a [i8],
        d: &'a [f16],
    },
}

impl<'a> WData<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WData::F32(s) => s.len(),
            WData::F16(s) => s.len(),
            WData::BF16(s) => s.len(),
            WData::Q8_0 { q, .. } => q.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            WData::F32(_) => DType::F32,
            WData::F16(_) => DType::F16,
            WData::BF16(_) => DType::BF16,
            WData::Q8_0 { .. } => DType::Q8_0,
        }
    }
    /// Element `i` widened to f32. Panics past the end (callers check shapes first).
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WData::F32(s) => s[i],
            WData::F16(s) => s[i].to_f32(),
            WData::BF16(s) => bf16_to_f32(s[i]),
            WData::Q8_0 { q, d } => q8_weight(q[i], d[i / Q8_BLOCK]),
        }
    }
    /// `out[i] = self[start + i]` widened to f32, the dtype matched once
    /// (not per element, as [`WData::get`] in a loop).
    #[inline(always)]
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            WData::F32(v) => out.copy_from_slice(&v[start..end]),
            WData::F16(v) => crate::kernels::simd::widen_f16(&v[start..end], out),
            WData::BF16(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, &h)| *o = bf16_to_f32(h)),
            WData::Q8_0 { .. } => out.iter_mut().enumerate().for_each(|(i, o)| *o = self.get(start + i)),
        }
    }
    /// Elements `start..end` (for Q8_0, `start` on a block boundary).
    #[inline]
    pub fn slice(&self, start: usize, end: usize) -> WData<'a> {
        match *self {
            WData::F32(s) => WData::F32(&s[start..end]),
            WData::F16(s) => WData::F16(&s[start..end]),
            WData::BF16(s) => WData::BF16(&s[start..end]),
            WData::Q8_0 { q, d } => {
                debug_assert!(start.is_multiple_of(Q8_BLOCK), "Q8_0 view starts mid-block");
                WData::Q8_0 { q: &q[start..end], d: &d[start / Q8_BLOCK..end.div_ceil(Q8_BLOCK)] }
            }
        }
    }
    /// Stored bytes, Q8_0 scales included.
    pub fn nbytes(&self) -> usize {
        match self {
            WData::Q8_0 { q, d } => q.len() + 2 * d.len(),
            _ => self.len() * self.dtype().size(),
        }
    }
}

/// One Q8_0 weight: `q * d`. Exact in f32 (8 bits times 11 bits of
/// mantissa), so a Q8_0 product equals the f32 product over the
/// dequantized weights, bit for bit, in every kernel but AVX-512 VNNI's,
/// which rounds the activations to int8 ([`crate::kernels::q8_avx512`]).
#[inline(always)]
pub fn q8_weight(q: i8, d: f16) -> f32 {
    q as f32 * d.to_f32()
}

/// bf16 to f32 is a shift: exact and cheap.
#[inline(always)]
pub fn bf16_to_f32(v: bf16) -> f32 {
    f32::from_bits((v.to_bits() as u32) << 16)
}

/// A row-major `[rows, cols]` weight view.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a> {
    pub data: WData<'a>,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> Tensor<'a> {
    /// View over `data` with shape `[rows, cols]`; the length must match.
    /// Q8_0 rows must be whole blocks, with one scale per block.
    pub fn new(data: WData<'a>, rows: usize, cols: usize, what: &'static str) -> Result<Self, CoreError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(CoreError::BadShape { what, expected: (rows, cols), got: (1, data.len()) });
        }
        if let WData::Q8_0 { q, d } = data {
            if !cols.is_multiple_of(Q8_BLOCK) || d.len() * Q8_BLOCK != q.len() {
                return Err(CoreError::BadQ8 { what, cols, scales: d.len() });
            }
        }
        Ok(Tensor { data, rows, cols })
    }

    /// A Q8_0 view over the int8 quants `q` (`[rows, cols]`) and the
    /// little-endian f16 scales `d` (`[rows, cols / Q8_BLOCK]`).
    pub fn from_q8_bytes(
        q: &'a [u8],
        d: &'a [u8],
        rows: usize,
        cols: usize,
        what: &'static str,
    ) -> Result<Self, CoreError> {
        let d = bytemuck::try_cast_slice(d).map_err(|_| CoreError::BadWeightBytes {
            what,
            len: d.len(),
            elem: 2,
        })?;
        Self::new(WData::Q8_0 { q: bytemuck::cast_slice(q), d }, rows, cols, what)
    }

    /// View over little-endian bytes in `dtype`. The bytes must be aligned to
    /// the element size (memory-mapped files are page-aligned; the loader
    /// copies a misaligned tensor once, keeping its dtype).
    pub fn from_bytes(
        dtype: DType,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
        what: &'static str,
    ) -> Result<Self, CoreError> {
        let bad = CoreError::BadWeightBytes { what, len: bytes.len(), elem: dtype.size() };
        let data = match dtype {
            DType::F32 => WData::F32(bytemuck::try_cast_slice(bytes).map_err(|_| bad)?),
            DType::F16 => WData::F16(bytemuck::try_cast_slice(bytes).map_err(|_| bad)?),
            DType::BF16 => WData::BF16(bytemuck::try_cast_slice(bytes).map_err(|_| bad)?),
            // The scales live apart: see `from_q8_bytes`.
            DType::Q8_0 => return Err(CoreError::BadQ8 { what, cols, scales: 0 }),
        };
        Self::new(data, rows, cols, what)
    }

    /// A 1-D view `[1, n]` over f32 values.
    pub fn vector_f32(v: &'a [f32]) -> Self {
        Tensor { data: WData::F32(v), rows: 1, cols: v.len() }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `r` as its stored elements.
    #[inline]
    pub fn row(&self, r: usize) -> WData<'a> {
        self.data.slice(r * self.cols, (r + 1) * self.cols)
    }

    /// Stored bytes (Q8_0 scales included).
    pub fn nbytes(&self) -> usize {
        self.data.nbytes()
    }

    /// Check the weight is stored in a float type (element-wise kernels do
    /// not read Q8_0).
    pub fn expect_float(&self, what: &'static str) -> Result<(), CoreError> {
        match self.dtype() {
            DType::Q8_0 => Err(CoreError::BadDType { what, dtype: DType::Q8_0.name() }),
            _ => Ok(()),
        }
    }

    /// Check the shape is `[rows, cols]`.
    pub fn expect_shape(&self, what: &'static str, rows: usize, cols: usize) -> Result<(), CoreError> {
        if self.rows == rows && self.cols == cols {
            Ok(())
        } else {
            Err(CoreError::BadShape { what, expected: (rows, cols), got: (self.rows, self.cols) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widen_into_gives_what_get_gives_in_every_dtype() {
        let v: [f32; 64] = core::array::from_fn(|i| (i as f32 * 0.37).sin() * 3.0);
        let h: [f16; 64] = core::array::from_fn(|i| f16::from_f32(v[i]));
        let b: [bf16; 64] = core::array::from_fn(|i| bf16::from_f32(v[i]));
        let q: [i8; 64] = core::array::from_fn(|i| (i as i8).wrapping_mul(37));
        let d = [f16::from_f32(0.5), f16::from_f32(-0.25)];
        for w in [WData::F32(&v), WData::F16(&h), WData::BF16(&b), WData::Q8_0 { q: &q, d: &d }] {
            for (start, n) in [(0, 64), (5, 20), (31, 2), (64, 0)] {
                let mut out = [f32::NAN; 64];
                w.widen_into(start, &mut out[..n]);
                for (i, &o) in out[..n].iter().enumerate() {
                    assert_eq!(o.to_bits(), w.get(start + i).to_bits(), "{:?} at {}", w.dtype(), start + i);
                }
            }
        }
    }
}
