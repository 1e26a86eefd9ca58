//! The model driver: the layer loop, written once over [`MambaOps`].
//!
//! - [`prefill`]: a ragged batch of prompts (flat tokens + row offsets), each
//!   sequence starting from its own slot's state (zero or saved) and leaving
//!   its final conv and SSM states there for the step path.
//! - [`step`]: one token for each of B sequences, each with its own slot.
//!
//! Logits are produced only for the rows asked for (last token, all, or any
//! set), so a long prefill does not pay for a `[tokens, vocab]` head.

use crate::config::MambaConfig;
use crate::error::CoreError;
use crate::model::Model;
use crate::ops::{Layer, MambaOps, ScanBufs};

pub use crate::ops::Ragged;

/// Working buffers of one prefill or step. Shapes for `T` token rows and
/// `R` logits rows:
#[derive(Debug)]
pub struct Scratch<'s, B: ?Sized> {
    /// `[T, d_model]` the residual stream, f32.
    pub residual: &'s mut B,
    /// `[T, d_model]` normed input of a layer, then its mixer output.
    pub normed: &'s mut B,
    /// `[T, 2*d_inner]` in_proj output: x then z.
    pub xz: &'s mut B,
    /// `[T, d_inner]` conv + SiLU output.
    pub xc: &'s mut B,
    /// `[T, dt_rank + 2*d_state]` x_proj output.
    pub dbc: &'s mut B,
    /// `[T, d_inner]` softplus(dt).
    pub dt: &'s mut B,
    /// `[T, d_inner]` gated scan output.
    pub y: &'s mut B,
    /// `[R, d_model]` residual rows picked for the head.
    pub head_in: &'s mut B,
    /// `[R, vocab_size]` logits.
    pub logits: &'s mut B,
}

/// Sizes (f32 values) of every [`Scratch`] buffer for `T` tokens, `R` logits rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchPlan {
    pub residual: usize,
    pub normed: usize,
    pub xz: usize,
    pub xc: usize,
    pub dbc: usize,
    pub dt: usize,
    pub y: usize,
    pub head_in: usize,
    pub logits: usize,
}

impl ScratchPlan {
    pub fn new(cfg: &MambaConfig, tokens: usize, logit_rows: usize) -> Self {
        let t = tokens;
        ScratchPlan {
            residual: t * cfg.d_model,
            normed: t.max(logit_rows) * cfg.d_model,
            xz: t * 2 * cfg.d_inner,
            xc: t * cfg.d_inner,
            dbc: t * cfg.x_proj_dim(),
            dt: t * cfg.d_inner,
            y: t * cfg.d_inner,
            head_in: logit_rows * cfg.d_model,
            logits: logit_rows * cfg.vocab_size,
        }
    }

    fn sizes(&self) -> [usize; 9] {
        [self.residual, self.normed, self.xz, self.xc, self.dbc, self.dt, self.y, self.head_in, self.logits]
    }

    /// Total f32 values.
    pub fn total(&self) -> usize {
        self.sizes().iter().sum()
    }

    /// Cut one caller buffer of at least [`total`](Self::total) values into a [`Scratch`].
    pub fn split<'s>(&self, buf: &'s mut [f32]) -> Result<Scratch<'s, [f32]>, CoreError> {
        if buf.len() < self.total() {
            return Err(CoreError::BufferTooSmall { what: "scratch", need: self.total(), got: buf.len() });
        }
        let (residual, rest) = buf.split_at_mut(self.residual);
        let (normed, rest) = rest.split_at_mut(self.normed);
        let (xz, rest) = rest.split_at_mut(self.xz);
        let (xc, rest) = rest.split_at_mut(self.xc);
        let (dbc, rest) = rest.split_at_mut(self.dbc);
        let (dt, rest) = rest.split_at_mut(self.dt);
        let (y, rest) = rest.split_at_mut(self.y);
        let (head_in, rest) = rest.split_at_mut(self.head_in);
        let (logits, _) = rest.split_at_mut(self.logits);
        Ok(Scratch { residual, normed, xz, xc, dbc, dt, y, head_in, logits })
    }
}

/// Which logits a prefill returns for each sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// Only the last position's row.
    Last,
    /// One row per position.
    All,
    /// The rows of the last `n` positions (fewer when the sequence is shorter).
    LastN(usize),
}

impl LogitsMode {
    /// The first position whose row is kept, of a sequence of `len >= 1` positions.
    pub fn first_kept(self, len: usize) -> usize {
        match self {
            LogitsMode::Last => len - 1,
            LogitsMode::All => 0,
            LogitsMode::LastN(n) => len.saturating_sub(n),
        }
    }
}

/// One sequence's piece of a prefill chunk (see [`next_chunk`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPiece {
    /// Index of the sequence.
    pub seq: usize,
    /// Its positions `start..start + len` ...
    pub start: usize,
    pub len: usize,
    /// ... sit at chunk rows `row0..row0 + len`.
    pub row0: usize,
    /// The first of those positions whose logits are kept.
    pub keep_from: usize,
}

impl ChunkPiece {
    /// The positions of the piece, in the sequence.
    pub fn positions(&self) -> core::ops::Range<usize> {
        self.start..self.start + self.len
    }
    /// The chunk rows whose logits the piece keeps.
    pub fn logit_rows(&self) -> core::ops::Range<usize> {
        self.row0 + (self.keep_from - self.start)..self.row0 + self.len
    }
}

/// Plan the next chunk of a prefill of `seqs` cut into chunks of at most
/// `chunk` tokens: a piece of every unfinished sequence, in order, until the
/// chunk is full. `done[i]` (positions of sequence `i` already run) is
/// advanced; `piece` gets each piece in row order. Returns the chunk's token
/// count, 0 when every sequence is done.
pub fn next_chunk(
    seqs: &[&[u32]],
    done: &mut [usize],
    chunk: usize,
    mode: LogitsMode,
    mut piece: impl FnMut(ChunkPiece),
) -> usize {
    let chunk = chunk.max(1);
    let mut rows = 0;
    for (i, s) in seqs.iter().enumerate() {
        if rows == chunk {
            break;
        }
        let len = (s.len() - done[i]).min(chunk - rows);
        if len == 0 {
            continue;
        }
        let start = done[i];
        let keep_from = mode.first_kept(s.len()).clamp(start, start + len);
        piece(ChunkPiece { seq: i, start, len, row0: rows, keep_from });
        done[i] += len;
        rows += len;
    }
    rows
}

fn check_model<W>(model: &Model<'_, W>) -> Result<(), CoreError> {
    model.cfg.validate()?;
    if model.layers.len() != model.cfg.n_layer {
        return Err(CoreError::BadConfig("the number of layer weights differs from n_layer"));
    }
    Ok(())
}

/// Run a ragged prefill of `tokens` (sequences as in `batch`), leaving each
/// sequence's final state in its slot of `states`, and write the logits of
/// token rows `logit_rows` to `scratch.logits` (`[logit_rows.len(), vocab_size]`).
pub fn prefill<O: MambaOps>(
    ops: &O,
    model: &Model<'_, O::Weight>,
    tokens: &[u32],
    batch: Ragged<'_>,
    logit_rows: &[usize],
    states: &mut O::Buf,
    s: &mut Scratch<'_, O::Buf>,
) -> Result<(), O::Error> {
    check_model(model)?;
    batch.validate(tokens.len())?;
    if logit_rows.iter().any(|&r| r >= tokens.len()) {
        return Err(CoreError::BadBatch("a logits row is past the last token").into());
    }
    let cfg = &model.cfg;
    let t = tokens.len();
    ops.embed(&model.embedding, tokens, s.residual)?;
    for (index, lw) in model.layers.iter().enumerate() {
        let layer = Layer { cfg, w: lw, index };
        ops.rms_norm(s.residual, t, &lw.norm, cfg.eps, s.normed)?;
        ops.in_proj(layer, s.normed, t, s.xz)?;
        ops.conv1d_prefill(layer, batch, s.xz, states, s.xc)?;
        ops.linear(s.xc, t, &lw.x_proj, None, s.dbc)?;
        ops.dt_proj_softplus(layer, s.dbc, t, s.dt)?;
        let act = ScanBufs { x: &*s.xc, dt: &*s.dt, dbc: &*s.dbc, xz: &*s.xz };
        ops.scan_prefill(layer, batch, act, states, s.y)?;
        ops.linear(s.y, t, &lw.out_proj, lw.out_proj_bias.as_ref(), s.normed)?;
        ops.add_assign(s.residual, s.normed, t * cfg.d_model)?;
    }
    if !logit_rows.is_empty() {
        ops.gather_rows(s.residual, cfg.d_model, logit_rows, s.head_in)?;
        head(ops, model, logit_rows.len(), s)?;
    }
    Ok(())
}

/// One token for each sequence: `tokens[i]` continues the sequence in slot
/// `slots[i]`. Writes `[B, vocab_size]` logits to `scratch.logits`.
pub fn step<O: MambaOps>(
    ops: &O,
    model: &Model<'_, O::Weight>,
    tokens: &[u32],
    slots: &[usize],
    states: &mut O::Buf,
    s: &mut Scratch<'_, O::Buf>,
) -> Result<(), O::Error> {
    check_model(model)?;
    if tokens.len() != slots.len() {
        return Err(CoreError::BadBatch("a step needs one token per slot").into());
    }
    let cfg = &model.cfg;
    let b = tokens.len();
    ops.embed(&model.embedding, tokens, s.residual)?;
    // Each layer's input norm is in `normed` when it starts: the first from
    // the embedding, the others from the previous layer's add_rms_norm.
    let first_norm = model.layers.first().map_or(&model.norm_f, |l| &l.norm);
    ops.rms_norm(s.residual, b, first_norm, cfg.eps, s.normed)?;
    for (index, lw) in model.layers.iter().enumerate() {
        let layer = Layer { cfg, w: lw, index };
        ops.in_proj(layer, s.normed, b, s.xz)?;
        ops.conv1d_step(layer, slots, s.xz, states, s.xc)?;
        ops.linear(s.xc, b, &lw.x_proj, None, s.dbc)?;
        ops.dt_scan_step(layer, slots, s.xc, s.dbc, s.xz, s.dt, states, s.y)?;
        ops.linear(s.y, b, &lw.out_proj, lw.out_proj_bias.as_ref(), s.normed)?;
        // The residual add, then the next layer's norm (the final norm after the last).
        let next_norm = model.layers.get(index + 1).map_or(&model.norm_f, |l| &l.norm);
        ops.add_rms_norm(s.residual, s.normed, b, cfg.d_model, next_norm, cfg.eps)?;
    }
    if b > 0 {
        // Every row wants logits: `normed` holds the final norm of the residual.
        ops.linear(s.normed, b, model.head(), None, s.logits)?;
    }
    Ok(())
}

/// Final norm and lm head over the `rows` gathered rows in `head_in`.
fn head<O: MambaOps>(
    ops: &O,
    model: &Model<'_, O::Weight>,
    rows: usize,
    s: &mut Scratch<'_, O::Buf>,
) -> Result<(), O::Error> {
    ops.rms_norm(s.head_in, rows, &model.norm_f, model.cfg.eps, s.normed)?;
    ops.linear(s.normed, rows, model.head(), None, s.logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_take_every_sequence_in_order_and_keep_the_asked_rows() {
        let (a, b, c) = ([1u32; 5], [2u32; 1], [3u32; 4]);
        let seqs: [&[u32]; 3] = [&a, &b, &c];
        let mut done = [0usize; 3];
        let mut got = [[None; 3]; 4];
        let mut counts = [0usize; 4];
        for (k, count) in counts.iter_mut().enumerate() {
            let mut n = 0;
            *count = next_chunk(&seqs, &mut done, 4, LogitsMode::LastN(2), |p| {
                got[k][n] = Some(p);
                n += 1;
            });
        }
        assert_eq!(counts, [4, 4, 2, 0]);
        assert_eq!(done, [5, 1, 4]);
        let p = |seq, start, len, row0, keep_from| Some(ChunkPiece { seq, start, len, row0, keep_from });
        // Chunk 1: a[0..4]; its last two positions (3, 4) start in it.
        assert_eq!(got[0], [p(0, 0, 4, 0, 3), None, None]);
        assert_eq!(got[0][0].unwrap().logit_rows(), 3..4);
        // Chunk 2: a[4], b[0], c[0..2]; c keeps 2..4, none of them here.
        assert_eq!(got[1], [p(0, 4, 1, 0, 4), p(1, 0, 1, 1, 0), p(2, 0, 2, 2, 2)]);
        assert_eq!(got[1][2].unwrap().logit_rows(), 4..4);
        assert_eq!(got[2], [p(2, 2, 2, 0, 2), None, None]);
        assert_eq!(got[2][0].unwrap().logit_rows(), 0..2);
        assert_eq!(LogitsMode::Last.first_kept(5), 4);
        assert_eq!(LogitsMode::All.first_kept(5), 0);
    }
}
