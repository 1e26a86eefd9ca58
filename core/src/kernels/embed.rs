//! Embedding lookup.

use crate::tensor::Tensor;

/// `out[t, :] = table[tokens[t], :]` widened to f32.
/// `table`: `[vocab, d_model]`; `out`: `[tokens.len(), d_model]`. Ids must be in range.
pub fn embed_rows(table: &Tensor<'_>, tokens: &[u32], out: &mut [f32]) {
    let d = table.cols;
    for (&tok, row) in tokens.iter().zip(out.chunks_exact_mut(d)) {
        table.row(tok as usize).widen_into(0, row);
    }
}
