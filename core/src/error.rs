//! Errors of the core: every one names what was wrong and the numbers.

use core::fmt;

/// An error from the core math: bad shapes, bad batch descriptions, buffers
/// too small, token ids out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreError {
    /// A token id is not a row of the embedding table.
    TokenOutOfRange { token: u32, vocab: usize },
    /// A caller buffer is shorter than the operation needs.
    BufferTooSmall { what: &'static str, need: usize, got: usize },
    /// A weight does not have the shape the configuration implies.
    BadShape { what: &'static str, expected: (usize, usize), got: (usize, usize) },
    /// Byte length or alignment of a weight does not fit its dtype.
    BadWeightBytes { what: &'static str, len: usize, elem: usize },
    /// A Q8_0 weight whose rows are not whole blocks, or whose scales do
    /// not number one per block.
    BadQ8 { what: &'static str, cols: usize, scales: usize },
    /// A weight stored in a dtype its kernel does not read (Q8_0 is for
    /// the matrices of linear layers and the embedding only).
    BadDType { what: &'static str, dtype: &'static str },
    /// The ragged batch description is inconsistent.
    BadBatch(&'static str),
    /// A state slot index is past the end of the state pool.
    SlotOutOfRange { slot: usize, slots: usize },
    /// A configuration value the core cannot run.
    BadConfig(&'static str),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CoreError::TokenOutOfRange { token, vocab } => {
                write!(f, "token id {token} is out of range for a vocabulary of {vocab}")
            }
            CoreError::BufferTooSmall { what, need, got } => {
                write!(f, "buffer `{what}` too small: need {need} elements, got {got}")
            }
            CoreError::BadShape { what, expected, got } => write!(
                f,
                "weight `{what}` has shape [{}, {}], expected [{}, {}]",
                got.0, got.1, expected.0, expected.1
            ),
            CoreError::BadWeightBytes { what, len, elem } => write!(
                f,
                "weight `{what}`: {len} bytes are not a whole, aligned number of {elem}-byte elements"
            ),
            CoreError::BadQ8 { what, cols, scales } => write!(
                f,
                "weight `{what}`: Q8_0 needs rows of whole 32-weight blocks and one scale per block \
                 (row length {cols}, {scales} scales)"
            ),
            CoreError::BadDType { what, dtype } => {
                write!(f, "weight `{what}` is stored as {dtype}, which its kernel does not read")
            }
            CoreError::BadBatch(why) => write!(f, "bad batch: {why}"),
            CoreError::SlotOutOfRange { slot, slots } => {
                write!(f, "state slot {slot} out of range: the pool has {slots} slots")
            }
            CoreError::BadConfig(why) => write!(f, "unsupported configuration: {why}"),
        }
    }
}

impl core::error::Error for CoreError {}
