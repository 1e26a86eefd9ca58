//! Borrowed weight views in their stored dtype.
//!
//! A [`Tensor`] is a 2-D row-major view `[rows, cols]` over f32, f16 or bf16
//! elements. Vectors are `[1, n]`. Nothing is converted: the kernels widen
//! to f32 in registers as they read.

use crate::error::CoreError;
use half::{bf16, f16};

/// Element type of stored weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// Lower-case name as used in file formats and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// The elements of a weight, in their stored type.
#[derive(Clone, Copy, Debug)]
pub enum WData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> WData<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WData::F32(s) => s.len(),
            WData::F16(s) => s.len(),
            WData::BF16(s) => s.len(),
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
        }
    }
    /// Element `i` widened to f32. Panics past the end (callers check shapes first).
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            WData::F32(s) => s[i],
            WData::F16(s) => s[i].to_f32(),
            WData::BF16(s) => bf16_to_f32(s[i]),
        }
    }
    /// Elements `start..end`.
    #[inline]
    pub fn slice(&self, start: usize, end: usize) -> WData<'a> {
        match *self {
            WData::F32(s) => WData::F32(&s[start..end]),
            WData::F16(s) => WData::F16(&s[start..end]),
            WData::BF16(s) => WData::BF16(&s[start..end]),
        }
    }
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
    pub fn new(data: WData<'a>, rows: usize, cols: usize, what: &'static str) -> Result<Self, CoreError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(CoreError::BadShape { what, expected: (rows, cols), got: (1, data.len()) });
        }
        Ok(Tensor { data, rows, cols })
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

    /// Stored bytes.
    pub fn nbytes(&self) -> usize {
        self.len() * self.dtype().size()
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
