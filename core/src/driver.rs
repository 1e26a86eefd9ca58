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
        ops.linear(s.normed, t, &lw.in_proj, lw.in_proj_bias.as_ref(), s.xz)?;
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
    for (index, lw) in model.layers.iter().enumerate() {
        let layer = Layer { cfg, w: lw, index };
        ops.rms_norm(s.residual, b, &lw.norm, cfg.eps, s.normed)?;
        ops.linear(s.normed, b, &lw.in_proj, lw.in_proj_bias.as_ref(), s.xz)?;
        ops.conv1d_step(layer, slots, s.xz, states, s.xc)?;
        ops.linear(s.xc, b, &lw.x_proj, None, s.dbc)?;
        ops.dt_proj_softplus(layer, s.dbc, b, s.dt)?;
        let act = ScanBufs { x: &*s.xc, dt: &*s.dt, dbc: &*s.dbc, xz: &*s.xz };
        ops.scan_step(layer, slots, act, states, s.y)?;
        ops.linear(s.y, b, &lw.out_proj, lw.out_proj_bias.as_ref(), s.normed)?;
        ops.add_assign(s.residual, s.normed, b * cfg.d_model)?;
    }
    if b > 0 {
        // Every row wants logits: norm straight from the residual.
        ops.rms_norm(s.residual, b, &model.norm_f, cfg.eps, s.normed)?;
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
