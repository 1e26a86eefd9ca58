//! Running a loaded model on the CPU: a pool of state slots, chunked ragged
//! prefill and batched single-token steps.
//!
//! Each slot holds one sequence's conv and SSM states
//! (`n_layer * d_inner * (d_conv + d_state)` f32 values, whatever the
//! sequence length). A prefill longer than `chunk_tokens` runs in pieces
//! that carry the state, so prompts of any length fit a fixed scratch.

use mamba_core::{
    driver, next_chunk, CpuBackend, MambaConfig, Parallel, Ragged, Scratch, ScratchPlan, StateLayout,
};

pub use mamba_core::LogitsMode;

use std::sync::Arc;

use crate::aligned::LineBuf;
use crate::error::{Error, Result};
use crate::model::{LoadedModel, ModelView};
use crate::profile::{Profile, Timed};

/// Default prefill chunk (tokens of all sequences together). 256 keeps the
/// scratch (about 37 KB a token at the 130m shape) and a 64-prompt batch's
/// logits within the 64 MB over weights and states that memory is held to;
/// the tiles reuse each weight panel over the chunk, and 512 was no faster.
pub const DEFAULT_CHUNK_TOKENS: usize = 256;

/// A model with its state slots and scratch, ready to run.
pub struct Session<'m> {
    model: &'m LoadedModel,
    view: ModelView<'m>,
    par: &'m dyn Parallel,
    states: LineBuf,
    layout: StateLayout,
    scratch: LineBuf,
    /// Tokens per prefill chunk (all sequences of the chunk together).
    pub chunk_tokens: usize,
    /// Where each op's time goes, when set ([`Session::set_profile`]).
    profile: Option<Arc<Profile>>,
}

impl<'m> Session<'m> {
    /// A session with `n_slots` zeroed state slots.
    pub fn new(model: &'m LoadedModel, par: &'m dyn Parallel, n_slots: usize) -> Result<Self> {
        crate::cpu::init_simd();
        let layout = model.cfg.state_layout();
        let len = n_slots.checked_mul(layout.slot_len()).ok_or_else(|| {
            Error::Input(format!("{n_slots} state slots of {} bytes each are too many", layout.slot_bytes()))
        })?;
        Ok(Session {
            model,
            view: model.view()?,
            par,
            states: LineBuf::zeroed(len),
            layout,
            scratch: LineBuf::default(),
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
            profile: None,
        })
    }

    /// Time every op of the passes that follow into `profile` (`None`: stop).
    pub fn set_profile(&mut self, profile: Option<Arc<Profile>>) {
        self.profile = profile;
    }

    pub fn cfg(&self) -> &MambaConfig {
        &self.model.cfg
    }

    pub fn model(&self) -> &'m LoadedModel {
        self.model
    }

    /// Number of state slots.
    pub fn slots(&self) -> usize {
        self.layout.slots_in(self.states.len())
    }

    /// Zero a slot (a fresh sequence).
    pub fn reset(&mut self, slot: usize) -> Result<()> {
        let len = self.layout.slot_len();
        let s = self.slot_range(slot)?;
        self.states[s.start..s.start + len].fill(0.0);
        Ok(())
    }

    fn slot_range(&self, slot: usize) -> Result<std::ops::Range<usize>> {
        if slot >= self.slots() {
            return Err(mamba_core::CoreError::SlotOutOfRange { slot, slots: self.slots() }.into());
        }
        let start = slot * self.layout.slot_len();
        Ok(start..start + self.layout.slot_len())
    }

    /// Conv state of `(slot, layer)`: `[d_inner, d_conv]`, newest input last.
    pub fn conv_state(&self, slot: usize, layer: usize) -> &[f32] {
        let off = self.layout.conv_offset(slot, layer);
        &self.states[off..off + self.layout.conv_len()]
    }

    /// SSM state of `(slot, layer)`: `[d_inner, d_state]`.
    pub fn ssm_state(&self, slot: usize, layer: usize) -> &[f32] {
        let off = self.layout.ssm_offset(slot, layer);
        &self.states[off..off + self.layout.ssm_len()]
    }

    /// A whole slot's state.
    pub fn slot_state(&self, slot: usize) -> Result<&[f32]> {
        let r = self.slot_range(slot)?;
        Ok(&self.states[r])
    }

    /// Overwrite a slot's state with a saved one.
    pub fn set_slot_state(&mut self, slot: usize, state: &[f32]) -> Result<()> {
        let r = self.slot_range(slot)?;
        if state.len() != r.len() {
            return Err(Error::Input(format!(
                "a state has {} values, a slot needs {}",
                state.len(),
                r.len()
            )));
        }
        self.states[r].copy_from_slice(state);
        Ok(())
    }

    /// Every id is a row of the embedding; `whose(i)` says where `tokens[i]` came from.
    fn check_tokens(&self, tokens: &[u32], whose: impl Fn(usize) -> String) -> Result<()> {
        let vocab = self.model.cfg.vocab_size;
        match tokens.iter().position(|&t| t as usize >= vocab) {
            Some(i) => Err(Error::Input(format!(
                "{}: token id {} is out of range: the model's vocabulary has {vocab} entries (0..{})",
                whose(i),
                tokens[i],
                vocab - 1
            ))),
            None => Ok(()),
        }
    }

    fn check_slots(&self, slots: &[usize]) -> Result<()> {
        for (i, &s) in slots.iter().enumerate() {
            self.slot_range(s)?;
            if let Some(j) = slots[..i].iter().position(|&o| o == s) {
                return Err(Error::Input(format!(
                    "state slot {s} appears twice in one batch (sequences {j} and {i})"
                )));
            }
        }
        Ok(())
    }

    fn count_mismatch(n: usize, what: &str, slots: usize) -> Error {
        let plural = |n: usize, w: &str| if n == 1 { format!("{n} {w}") } else { format!("{n} {w}s") };
        Error::Input(format!(
            "{} but {}: one slot is needed per {what}",
            plural(n, what),
            plural(slots, "slot")
        ))
    }

    /// Prefill `seqs[i]` into `slots[i]`, continuing whatever state the slot
    /// holds, as one ragged batch cut into chunks of at most `chunk_tokens`.
    /// Returns per sequence its logits rows, flat `[rows, vocab_size]`.
    pub fn prefill(&mut self, seqs: &[&[u32]], slots: &[usize], mode: LogitsMode) -> Result<Vec<Vec<f32>>> {
        if seqs.len() != slots.len() {
            return Err(Self::count_mismatch(seqs.len(), "sequence", slots.len()));
        }
        self.check_slots(slots)?;
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(Error::Input(format!("sequence {i} is empty")));
            }
            self.check_tokens(s, |p| format!("sequence {i}, position {p}"))?;
        }
        let vocab = self.model.cfg.vocab_size;
        let mut out: Vec<Vec<f32>> =
            seqs.iter().map(|s| Vec::with_capacity(vocab * (s.len() - mode.first_kept(s.len())))).collect();
        let mut done = vec![0usize; seqs.len()];
        loop {
            // One chunk: a piece of every unfinished sequence, in order.
            let (mut tokens, mut offsets, mut chunk_slots) = (vec![], vec![0], vec![]);
            let (mut pieces, mut logit_rows) = (vec![], vec![]);
            next_chunk(seqs, &mut done, self.chunk_tokens, mode, |p| {
                tokens.extend_from_slice(&seqs[p.seq][p.positions()]);
                logit_rows.extend(p.logit_rows());
                offsets.push(tokens.len());
                chunk_slots.push(slots[p.seq]);
                pieces.push(p);
            });
            if tokens.is_empty() {
                break;
            }
            let batch = Ragged { offsets: &offsets, slots: &chunk_slots };
            let logits = self.run_prefill(&tokens, batch, &logit_rows)?;
            // Hand each logits row to its sequence.
            let mut next = 0;
            for p in &pieces {
                let mine = p.logit_rows().len();
                out[p.seq].extend_from_slice(&logits[next * vocab..(next + mine) * vocab]);
                next += mine;
            }
        }
        Ok(out)
    }

    fn run_prefill(&mut self, tokens: &[u32], batch: Ragged<'_>, logit_rows: &[usize]) -> Result<&[f32]> {
        let cfg = self.model.cfg;
        let plan = ScratchPlan::new(&cfg, tokens.len(), logit_rows.len());
        let mut s = scratch_for(&mut self.scratch, &plan)?;
        let (ops, model) = (CpuBackend::new(self.par), self.view.model());
        match self.profile.as_deref() {
            Some(p) => driver::prefill(
                &Timed::new(ops, &model, p),
                &model,
                tokens,
                batch,
                logit_rows,
                &mut self.states,
                &mut s,
            )?,
            None => driver::prefill(&ops, &model, tokens, batch, logit_rows, &mut self.states, &mut s)?,
        }
        let n = logit_rows.len() * cfg.vocab_size;
        Ok(&s.logits[..n])
    }

    /// One token for each sequence: `tokens[i]` continues `slots[i]`.
    /// Returns `[B, vocab_size]` logits.
    pub fn step(&mut self, tokens: &[u32], slots: &[usize]) -> Result<&[f32]> {
        if tokens.len() != slots.len() {
            return Err(Self::count_mismatch(tokens.len(), "token", slots.len()));
        }
        self.check_slots(slots)?;
        self.check_tokens(tokens, |i| format!("step of sequence {i} (state slot {})", slots[i]))?;
        let cfg = self.model.cfg;
        let plan = ScratchPlan::new(&cfg, tokens.len(), tokens.len());
        let mut s = scratch_for(&mut self.scratch, &plan)?;
        let (ops, model) = (CpuBackend::new(self.par), self.view.model());
        match self.profile.as_deref() {
            Some(p) => {
                driver::step(&Timed::new(ops, &model, p), &model, tokens, slots, &mut self.states, &mut s)?
            }
            None => driver::step(&ops, &model, tokens, slots, &mut self.states, &mut s)?,
        }
        Ok(&s.logits[..tokens.len() * cfg.vocab_size])
    }
}

/// The session's scratch, grown (never shrunk) to fit `plan`, cut into its buffers.
fn scratch_for<'s>(buf: &'s mut LineBuf, plan: &ScratchPlan) -> Result<Scratch<'s, [f32]>> {
    buf.grow(plan.total());
    Ok(plan.split(buf)?)
}

/// Lower-level entry points for a scheduler that plans its own batches.
impl Session<'_> {
    /// Run one ragged batch exactly as given (no chunking): sequence `i` is
    /// `tokens[offsets[i]..offsets[i+1]]` continuing `slots[i]`; returns the
    /// logits of `logit_rows`, flat `[logit_rows.len(), vocab_size]`.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        offsets: &[usize],
        slots: &[usize],
        logit_rows: &[usize],
    ) -> Result<&[f32]> {
        self.check_slots(slots)?;
        self.check_tokens(tokens, |i| format!("batch row {i}"))?;
        Ragged { offsets, slots }.validate(tokens.len())?;
        self.run_prefill(tokens, Ragged { offsets, slots }, logit_rows)
    }

    /// Copy slot `src`'s state into slot `dst` (fork a sequence).
    pub fn copy_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        let (s, d) = (self.slot_range(src)?, self.slot_range(dst)?);
        self.states.copy_within(s, d.start);
        Ok(())
    }
}
