//! The operator trait every backend implements.
//!
//! Operations are stateless over the backend's own buffer and weight types,
//! so a GPU backend keeps activations, weights and the state pool on the
//! device. Host-side inputs (token ids, row offsets, slot indices) come as
//! plain slices; the backend uploads what it needs.
//!
//! Activation layouts are token-major, row-major (`[rows, width]`).
//! States live in a pool of fixed-size slots laid out by
//! [`StateLayout`](crate::config::StateLayout); kernels read and write them
//! in place by slot index.

use crate::config::MambaConfig;
use crate::error::CoreError;
use crate::model::LayerWeights;

/// A ragged batch: sequence `i` owns token rows `offsets[i]..offsets[i+1]`
/// and state slot `slots[i]`.
#[derive(Clone, Copy, Debug)]
pub struct Ragged<'a> {
    /// `[n_seqs + 1]`, starting at 0, non-decreasing, ending at the token count.
    pub offsets: &'a [usize],
    /// `[n_seqs]`, all different.
    pub slots: &'a [usize],
}

impl Ragged<'_> {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    /// Token rows of sequence `i`.
    pub fn rows(&self, i: usize) -> core::ops::Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }
    /// Check the description against `tokens` rows.
    pub fn validate(&self, tokens: usize) -> Result<(), CoreError> {
        if self.offsets.len() != self.slots.len() + 1 {
            return Err(CoreError::BadBatch("offsets must have one more entry than slots"));
        }
        if self.offsets[0] != 0 {
            return Err(CoreError::BadBatch("offsets must start at 0"));
        }
        if self.offsets.windows(2).any(|w| w[1] < w[0]) {
            return Err(CoreError::BadBatch("offsets must be non-decreasing"));
        }
        if self.offsets[self.slots.len()] != tokens {
            return Err(CoreError::BadBatch("the last offset must equal the number of tokens"));
        }
        check_distinct(self.slots)
    }
}

/// Two sequences of one batch may not share a state slot.
pub fn check_distinct(slots: &[usize]) -> Result<(), CoreError> {
    for (i, s) in slots.iter().enumerate() {
        if slots[..i].contains(s) {
            return Err(CoreError::BadBatch("a state slot appears twice in one batch"));
        }
    }
    Ok(())
}

/// One layer of one model: the configuration, the layer's weights and its
/// index (which selects the layer's part of every state slot).
pub struct Layer<'a, W> {
    pub cfg: &'a MambaConfig,
    pub w: &'a LayerWeights<W>,
    pub index: usize,
}

impl<W> Clone for Layer<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for Layer<'_, W> {}

/// The activations a selective scan reads (shapes in [`crate::kernels::ScanRows`]).
pub struct ScanBufs<'a, B: ?Sized> {
    /// `[rows, d_inner]` conv output.
    pub x: &'a B,
    /// `[rows, d_inner]` softplus(dt).
    pub dt: &'a B,
    /// `[rows, dt_rank + 2*d_state]`.
    pub dbc: &'a B,
    /// `[rows, 2*d_inner]` in_proj output (gate z in the second half).
    pub xz: &'a B,
}

/// The Mamba-1 operations over a backend's buffers.
pub trait MambaOps {
    /// An f32 buffer: activations and the state pool (CPU: `[f32]`).
    type Buf: ?Sized;
    /// A stored weight (CPU: a [`Tensor`](crate::tensor::Tensor) view).
    type Weight;
    type Error: From<CoreError>;

    /// `out[t] = table[tokens[t]]`; out `[tokens, d_model]`. Ids out of range are an error.
    fn embed(&self, table: &Self::Weight, tokens: &[u32], out: &mut Self::Buf) -> Result<(), Self::Error>;

    /// RMSNorm of `rows` rows of `x` (`[rows, d_model]`) with weight `w` into `out`.
    fn rms_norm(
        &self,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Weight,
        eps: f32,
        out: &mut Self::Buf,
    ) -> Result<(), Self::Error>;

    /// `acc[..len] += x[..len]` (the residual add, f32).
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf, len: usize) -> Result<(), Self::Error>;

    /// A layer's residual add and the next norm: `acc += x`, then `x =
    /// RMSNorm(acc)` with weight `w`, over `rows` rows of `d_model`
    /// (`[rows, d_model]` both). The decode step calls this between layers;
    /// a backend may fuse the two passes (the GPU saves a launch a layer).
    /// The result must equal [`add_assign`](Self::add_assign) then
    /// [`rms_norm`](Self::rms_norm), which is the default.
    fn add_rms_norm(
        &self,
        acc: &mut Self::Buf,
        x: &mut Self::Buf,
        rows: usize,
        d_model: usize,
        w: &Self::Weight,
        eps: f32,
    ) -> Result<(), Self::Error> {
        self.add_assign(acc, x, rows * d_model)?;
        self.rms_norm(acc, rows, w, eps, x)
    }

    /// `out = x W^T (+ bias)`: x `[rows, in]`, W `[out, in]`, out `[rows, out]`.
    fn linear(
        &self,
        x: &Self::Buf,
        rows: usize,
        w: &Self::Weight,
        bias: Option<&Self::Weight>,
        out: &mut Self::Buf,
    ) -> Result<(), Self::Error>;

    /// A layer's in_proj: `xz = x in_proj^T (+ bias)`, x `[rows, d_model]`,
    /// xz `[rows, 2*d_inner]` (x then z). The default is
    /// [`linear`](Self::linear); a backend may split the rows as it splits
    /// the channels of the conv and scan that read them.
    fn in_proj(
        &self,
        layer: Layer<'_, Self::Weight>,
        x: &Self::Buf,
        rows: usize,
        xz: &mut Self::Buf,
    ) -> Result<(), Self::Error> {
        self.linear(x, rows, &layer.w.in_proj, layer.w.in_proj_bias.as_ref(), xz)
    }

    /// `dt = softplus(dbc[:, :dt_rank] dt_proj^T + dt_bias)`: dbc `[rows, x_proj_dim]`, dt `[rows, d_inner]`.
    fn dt_proj_softplus(
        &self,
        layer: Layer<'_, Self::Weight>,
        dbc: &Self::Buf,
        rows: usize,
        dt: &mut Self::Buf,
    ) -> Result<(), Self::Error>;

    /// Causal conv1d + SiLU of a ragged prefill, each sequence from and into its
    /// own slot's conv state of the layer. xz `[rows, 2*d_inner]`, out `[rows, d_inner]`.
    fn conv1d_prefill(
        &self,
        layer: Layer<'_, Self::Weight>,
        batch: Ragged<'_>,
        xz: &Self::Buf,
        states: &mut Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<(), Self::Error>;

    /// One token per sequence: row `i` of xz (`[B, 2*d_inner]`) belongs to `slots[i]`.
    fn conv1d_step(
        &self,
        layer: Layer<'_, Self::Weight>,
        slots: &[usize],
        xz: &Self::Buf,
        states: &mut Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<(), Self::Error>;

    /// Selective scan + D skip + SiLU(z) gate over a ragged prefill; y `[rows, d_inner]`.
    fn scan_prefill(
        &self,
        layer: Layer<'_, Self::Weight>,
        batch: Ragged<'_>,
        act: ScanBufs<'_, Self::Buf>,
        states: &mut Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<(), Self::Error>;

    /// The single-token state update for `slots.len()` sequences; y `[B, d_inner]`.
    fn scan_step(
        &self,
        layer: Layer<'_, Self::Weight>,
        slots: &[usize],
        act: ScanBufs<'_, Self::Buf>,
        states: &mut Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<(), Self::Error>;

    /// A decode step's dt and scan: [`dt_proj_softplus`](Self::dt_proj_softplus)
    /// of `dbc` into `dt`, then [`scan_step`](Self::scan_step) reading it with
    /// `x`, `dbc` and `xz` (shapes as there). The default runs the two in
    /// turn; a backend may run both over each thread's channels at once, so
    /// that no thread waits for the others between them. `y`, the states and
    /// `dt` must be the two's, bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn dt_scan_step(
        &self,
        layer: Layer<'_, Self::Weight>,
        slots: &[usize],
        x: &Self::Buf,
        dbc: &Self::Buf,
        xz: &Self::Buf,
        dt: &mut Self::Buf,
        states: &mut Self::Buf,
        y: &mut Self::Buf,
    ) -> Result<(), Self::Error> {
        self.dt_proj_softplus(layer, dbc, slots.len(), dt)?;
        self.scan_step(layer, slots, ScanBufs { x, dt: &*dt, dbc, xz }, states, y)
    }

    /// `out[i] = x[rows[i]]` for rows of `width` values.
    fn gather_rows(
        &self,
        x: &Self::Buf,
        width: usize,
        rows: &[usize],
        out: &mut Self::Buf,
    ) -> Result<(), Self::Error>;
}
