//! Model dimensions, the per-sequence state layout and buffer footprints.
//!
//! Names follow the Mamba paper and Hugging Face: `d_model` (hidden),
//! `d_inner` (= expand * d_model), `d_state` (N), `d_conv` (K), `dt_rank` (R).

use crate::error::CoreError;

/// Largest conv kernel the kernels support (they keep a window on the stack).
pub const MAX_D_CONV: usize = 16;
/// Largest SSM state size the kernels support.
pub const MAX_D_STATE: usize = 256;

/// The dimensions and switches of a Mamba-1 model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MambaConfig {
    pub d_model: usize,
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
    pub n_layer: usize,
    /// Rows of the embedding table (padded vocabulary included): the width of a logits row.
    pub vocab_size: usize,
    /// RMSNorm epsilon (`layer_norm_epsilon`).
    pub eps: f32,
    /// in_proj / out_proj carry a bias.
    pub use_bias: bool,
    /// conv1d carries a bias.
    pub use_conv_bias: bool,
    /// The residual stream is kept in f32 (always true here: compute is f32).
    pub residual_in_fp32: bool,
    /// The lm head is the embedding table.
    pub tie_embeddings: bool,
}

impl MambaConfig {
    /// Width of x_proj's output: `[dt_rank | B (d_state) | C (d_state)]`.
    pub fn x_proj_dim(&self) -> usize {
        self.dt_rank + 2 * self.d_state
    }

    /// Check the dimensions are non-zero and within the kernels' limits.
    pub fn validate(&self) -> Result<(), CoreError> {
        let dims = [
            (self.d_model, "d_model is 0"),
            (self.d_inner, "d_inner is 0"),
            (self.d_state, "d_state is 0"),
            (self.d_conv, "d_conv is 0"),
            (self.dt_rank, "dt_rank is 0"),
            (self.n_layer, "n_layer is 0"),
            (self.vocab_size, "vocab_size is 0"),
        ];
        for (v, why) in dims {
            if v == 0 {
                return Err(CoreError::BadConfig(why));
            }
        }
        if self.d_conv > MAX_D_CONV {
            return Err(CoreError::BadConfig("d_conv is larger than 16"));
        }
        if self.d_state > MAX_D_STATE {
            return Err(CoreError::BadConfig("d_state is larger than 256"));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(CoreError::BadConfig("layer_norm_epsilon is not a finite non-negative number"));
        }
        Ok(())
    }

    /// Where each layer's states live inside a slot.
    pub fn state_layout(&self) -> StateLayout {
        StateLayout {
            n_layer: self.n_layer,
            d_inner: self.d_inner,
            d_conv: self.d_conv,
            d_state: self.d_state,
        }
    }

    /// Sizes of the state and of the scratch buffers.
    pub fn footprint(&self) -> Footprint {
        Footprint { cfg: *self }
    }
}

/// Layout of one sequence's recurrent state ("slot"), f32:
/// for each layer, conv state `[d_inner, d_conv]` (newest input last)
/// followed by SSM state `[d_inner, d_state]`. Slots are contiguous in a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateLayout {
    pub n_layer: usize,
    pub d_inner: usize,
    pub d_conv: usize,
    pub d_state: usize,
}

impl StateLayout {
    /// f32 values of one layer's conv state.
    pub fn conv_len(&self) -> usize {
        self.d_inner * self.d_conv
    }
    /// f32 values of one layer's SSM state.
    pub fn ssm_len(&self) -> usize {
        self.d_inner * self.d_state
    }
    /// f32 values of one layer (conv then SSM).
    pub fn layer_len(&self) -> usize {
        self.conv_len() + self.ssm_len()
    }
    /// f32 values of one slot: `n_layer * d_inner * (d_conv + d_state)`.
    pub fn slot_len(&self) -> usize {
        self.n_layer * self.layer_len()
    }
    /// Bytes of one slot. Independent of sequence length.
    pub fn slot_bytes(&self) -> usize {
        self.slot_len() * 4
    }
    /// Offset of `(slot, layer)`'s conv state in the pool.
    pub fn conv_offset(&self, slot: usize, layer: usize) -> usize {
        slot * self.slot_len() + layer * self.layer_len()
    }
    /// Offset of `(slot, layer)`'s SSM state in the pool.
    pub fn ssm_offset(&self, slot: usize, layer: usize) -> usize {
        self.conv_offset(slot, layer) + self.conv_len()
    }
    /// Slots that fit in a pool of `len` f32 values.
    pub fn slots_in(&self, len: usize) -> usize {
        len / self.slot_len().max(1)
    }
}

/// Memory needed by a model: state per sequence, scratch per prefill or step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Footprint {
    cfg: MambaConfig,
}

impl Footprint {
    /// Bytes of one sequence's state: `n_layer * d_inner * (d_conv + d_state) * 4`.
    pub fn state_bytes_per_seq(&self) -> usize {
        self.cfg.state_layout().slot_bytes()
    }
    /// f32 scratch values for a prefill of `tokens` rows that returns `logit_rows` logits rows.
    pub fn prefill_scratch_floats(&self, tokens: usize, logit_rows: usize) -> usize {
        crate::driver::ScratchPlan::new(&self.cfg, tokens, logit_rows).total()
    }
    /// Bytes of scratch for a prefill of `tokens` rows with `logit_rows` logits rows.
    pub fn prefill_scratch_bytes(&self, tokens: usize, logit_rows: usize) -> usize {
        self.prefill_scratch_floats(tokens, logit_rows) * 4
    }
    /// Bytes of scratch for a step of `batch` sequences (logits for each).
    pub fn step_scratch_bytes(&self, batch: usize) -> usize {
        self.prefill_scratch_bytes(batch, batch)
    }
}
