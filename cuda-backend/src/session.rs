//! Running a model on the device: a pool of state slots in device memory,
//! chunked ragged prefill and batched steps, mirroring the CPU runtime's
//! `Session` (std-runtime/src/session.rs) so the runtime can swap one for
//! the other.

use cudarc::driver::DevicePtr;
use mamba_core::{
    driver, next_chunk, CoreError, MambaConfig, Model, Ragged, Scratch, ScratchPlan, StateLayout, Tensor,
};

/// Which logits a prefill returns for each sequence (the core's, as on the CPU).
pub use mamba_core::LogitsMode;

use crate::buf::DeviceBuf;
use crate::device::{CudaBackend, Temp};
use crate::error::{CudaError, Result};
use crate::model::DeviceModel;

/// Sampling settings of one row for [`CudaSession::step_sample`]: the CPU
/// sampler's temperature, top-k, top-p and min-p (no penalties; see
/// `kernels/sample.cu` for the one approximation, at most 256 candidates when top_k is 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceSampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no limit.
    pub top_k: usize,
    /// 1 = no limit.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
}

/// Default prefill chunk (tokens of all sequences together).
pub const DEFAULT_CHUNK_TOKENS: usize = 2048;

/// The nine scratch buffers of [`mamba_core::Scratch`], grown on demand.
#[derive(Default)]
struct DeviceScratch {
    bufs: Vec<DeviceBuf>,
}

impl DeviceScratch {
    fn fit(&mut self, backend: &CudaBackend, plan: &ScratchPlan) -> Result<Scratch<'_, DeviceBuf>> {
        let need = [
            plan.residual,
            plan.normed,
            plan.xz,
            plan.xc,
            plan.dbc,
            plan.dt,
            plan.y,
            plan.head_in,
            plan.logits,
        ];
        if self.bufs.len() != need.len() {
            self.bufs.clear();
        }
        for (i, &n) in need.iter().enumerate() {
            if self.bufs.get(i).is_none_or(|b| b.len() < n.max(1)) {
                if backend.live.capturing.get() {
                    return Err(CudaError::Input("scratch would grow while a CUDA graph is captured".into()));
                }
                backend.live.moved();
                let data = backend
                    .stream
                    .alloc_zeros::<f32>(n.max(1))
                    .map_err(CudaError::driver("allocating scratch"))?;
                let b = DeviceBuf { data };
                if i < self.bufs.len() {
                    self.bufs[i] = b;
                } else {
                    self.bufs.push(b);
                }
            }
        }
        let [residual, normed, xz, xc, dbc, dt, y, head_in, logits] = &mut self.bufs[..] else {
            return Err(CudaError::Input("scratch has the wrong number of buffers".into()));
        };
        Ok(Scratch { residual, normed, xz, xc, dbc, dt, y, head_in, logits })
    }
}

/// A model on the device with its state slots and scratch, ready to run.
pub struct CudaSession {
    backend: CudaBackend,
    model: DeviceModel,
    states: DeviceBuf,
    layout: StateLayout,
    scratch: DeviceScratch,
    ids: Temp<u32>,
    /// Captured decode steps by batch size (see [`CudaSession::step_greedy_graph`]).
    graphs: std::collections::HashMap<usize, StepGraph>,
    /// Tokens per prefill chunk (all sequences of the chunk together).
    pub chunk_tokens: usize,
}

/// Slots that fit in `budget` bytes, or, without a budget, in 90% of the
/// device's free memory after `reserve` bytes (scratch and cuBLAS workspace).
pub fn slots_for_memory(
    backend: &CudaBackend,
    cfg: &MambaConfig,
    budget: Option<usize>,
    reserve: usize,
) -> Result<usize> {
    let per = cfg.footprint().state_bytes_per_seq().max(1);
    let bytes = match budget {
        Some(b) => b,
        None => backend.memory()?.0.saturating_sub(reserve) / 10 * 9,
    };
    Ok(bytes / per)
}

impl CudaSession {
    /// Upload `model` and allocate `n_slots` zeroed state slots.
    pub fn new(backend: CudaBackend, model: &Model<'_, Tensor<'_>>, n_slots: usize) -> Result<Self> {
        let model = DeviceModel::upload(&backend, model)?;
        Self::with_model(backend, model, n_slots)
    }

    /// A session over an already uploaded model.
    pub fn with_model(backend: CudaBackend, model: DeviceModel, n_slots: usize) -> Result<Self> {
        let layout = model.cfg.state_layout();
        let len = n_slots.checked_mul(layout.slot_len()).ok_or_else(|| {
            CudaError::Input(format!(
                "{n_slots} state slots of {} bytes each are too many",
                layout.slot_bytes()
            ))
        })?;
        if n_slots == 0 {
            return Err(CudaError::Input("a session needs at least one state slot".into()));
        }
        let data = backend.stream.alloc_zeros::<f32>(len).map_err(|e| {
            CudaError::Input(format!(
                "cannot allocate {n_slots} state slots ({} bytes) on the device: {e}",
                len * 4
            ))
        })?;
        Ok(CudaSession {
            backend,
            model,
            states: DeviceBuf { data },
            layout,
            scratch: DeviceScratch::default(),
            ids: Temp::new(),
            graphs: Default::default(),
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
        })
    }

    pub fn cfg(&self) -> &MambaConfig {
        &self.model.cfg
    }
    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }
    pub fn backend_mut(&mut self) -> &mut CudaBackend {
        &mut self.backend
    }
    pub fn model(&self) -> &DeviceModel {
        &self.model
    }
    /// Number of state slots.
    pub fn slots(&self) -> usize {
        self.layout.slots_in(self.states.len())
    }

    fn slot_range(&self, slot: usize) -> Result<std::ops::Range<usize>> {
        if slot >= self.slots() {
            return Err(CoreError::SlotOutOfRange { slot, slots: self.slots() }.into());
        }
        let start = slot * self.layout.slot_len();
        Ok(start..start + self.layout.slot_len())
    }

    /// Zero a slot (a fresh sequence).
    pub fn reset(&mut self, slot: usize) -> Result<()> {
        let r = self.slot_range(slot)?;
        let mut view = self.states.data.slice_mut(r);
        self.backend.stream.memset_zeros(&mut view).map_err(CudaError::driver("zeroing a slot"))
    }

    /// Copy `len` values at `offset` of the state pool to the host.
    fn read_states(&self, offset: usize, len: usize) -> Result<Vec<f32>> {
        let mut host = vec![0.0f32; len];
        let view = self.states.data.slice(offset..offset + len);
        self.backend.stream.memcpy_dtoh(&view, &mut host).map_err(CudaError::driver("reading states"))?;
        self.backend.synchronize()?;
        Ok(host)
    }

    /// A whole slot's state, copied to the host.
    pub fn slot_state(&self, slot: usize) -> Result<Vec<f32>> {
        let r = self.slot_range(slot)?;
        self.read_states(r.start, r.len())
    }

    /// Conv state of `(slot, layer)`: `[d_inner, d_conv]`, newest input last.
    pub fn conv_state(&self, slot: usize, layer: usize) -> Result<Vec<f32>> {
        self.slot_range(slot)?;
        self.read_states(self.layout.conv_offset(slot, layer), self.layout.conv_len())
    }

    /// SSM state of `(slot, layer)`: `[d_inner, d_state]`.
    pub fn ssm_state(&self, slot: usize, layer: usize) -> Result<Vec<f32>> {
        self.slot_range(slot)?;
        self.read_states(self.layout.ssm_offset(slot, layer), self.layout.ssm_len())
    }

    /// Overwrite a slot's state with a saved one.
    pub fn set_slot_state(&mut self, slot: usize, state: &[f32]) -> Result<()> {
        let r = self.slot_range(slot)?;
        if state.len() != r.len() {
            return Err(CudaError::Input(format!(
                "a state has {} values, a slot needs {}",
                state.len(),
                r.len()
            )));
        }
        let mut view = self.states.data.slice_mut(r);
        self.backend.stream.memcpy_htod(state, &mut view).map_err(CudaError::driver("writing a slot"))
    }

    /// Copy slot `src`'s state into slot `dst` (fork a sequence).
    pub fn copy_slot(&mut self, src: usize, dst: usize) -> Result<()> {
        let (s, d) = (self.slot_range(src)?, self.slot_range(dst)?);
        if s == d {
            return Ok(());
        }
        let st = &self.backend.stream;
        let base = self.states.data.device_ptr(st).0;
        // SAFETY: both ranges are inside the pool (checked) and do not overlap (distinct slots).
        #[allow(unsafe_code)]
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                base + 4 * d.start as u64,
                base + 4 * s.start as u64,
                4 * s.len(),
                st.cu_stream(),
            )
        }
        .map_err(CudaError::driver("copying a slot"))
    }

    fn check_slots(&self, slots: &[usize]) -> Result<()> {
        for (i, &s) in slots.iter().enumerate() {
            self.slot_range(s)?;
            if let Some(j) = slots[..i].iter().position(|&o| o == s) {
                return Err(CudaError::Input(format!(
                    "state slot {s} appears twice in one batch (sequences {j} and {i})"
                )));
            }
        }
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32], whose: impl Fn(usize) -> String) -> Result<()> {
        let vocab = self.model.cfg.vocab_size;
        match tokens.iter().position(|&t| t as usize >= vocab) {
            Some(i) => Err(CudaError::Input(format!(
                "{}: token id {} is out of range: the model's vocabulary has {vocab} entries (0..{})",
                whose(i),
                tokens[i],
                vocab - 1
            ))),
            None => Ok(()),
        }
    }

    /// Prefill `seqs[i]` into `slots[i]`, continuing whatever state the slot
    /// holds, as one ragged batch cut into chunks of at most `chunk_tokens`.
    /// Returns per sequence its logits rows, flat `[rows, vocab_size]`.
    pub fn prefill(&mut self, seqs: &[&[u32]], slots: &[usize], mode: LogitsMode) -> Result<Vec<Vec<f32>>> {
        if seqs.len() != slots.len() {
            return Err(CudaError::Input(format!(
                "{} sequences but {} slots: one slot is needed per sequence",
                seqs.len(),
                slots.len()
            )));
        }
        self.check_slots(slots)?;
        for (i, s) in seqs.iter().enumerate() {
            if s.is_empty() {
                return Err(CudaError::Input(format!("sequence {i} is empty")));
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
            let logits = self.forward(&tokens, &offsets, &chunk_slots, &logit_rows)?;
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

    /// Run one ragged batch exactly as given (no chunking); returns the logits
    /// of `logit_rows`, flat `[logit_rows.len(), vocab_size]`, copied to the host.
    pub fn forward(
        &mut self,
        tokens: &[u32],
        offsets: &[usize],
        slots: &[usize],
        logit_rows: &[usize],
    ) -> Result<Vec<f32>> {
        self.check_slots(slots)?;
        self.check_tokens(tokens, |i| format!("batch row {i}"))?;
        Ragged { offsets, slots }.validate(tokens.len())?;
        let cfg = self.model.cfg;
        let plan = ScratchPlan::new(&cfg, tokens.len(), logit_rows.len());
        let mut s = self.scratch.fit(&self.backend, &plan)?;
        let batch = Ragged { offsets, slots };
        let model = self.model.model();
        driver::prefill(&self.backend, &model, tokens, batch, logit_rows, &mut self.states, &mut s)?;
        let n = logit_rows.len() * cfg.vocab_size;
        copy_back(&self.backend, s.logits, n)
    }

    /// Queue one step without reading anything back.
    fn run_step(&mut self, tokens: &[u32], slots: &[usize]) -> Result<()> {
        self.check_step(tokens, slots)?;
        let cfg = self.model.cfg;
        let plan = ScratchPlan::new(&cfg, tokens.len(), tokens.len());
        let mut s = self.scratch.fit(&self.backend, &plan)?;
        let model = self.model.model();
        driver::step(&self.backend, &model, tokens, slots, &mut self.states, &mut s)
    }

    fn check_step(&self, tokens: &[u32], slots: &[usize]) -> Result<()> {
        if tokens.len() != slots.len() {
            return Err(CudaError::Input(format!(
                "{} tokens but {} slots: one slot is needed per token",
                tokens.len(),
                slots.len()
            )));
        }
        self.check_slots(slots)?;
        self.check_tokens(tokens, |i| format!("step of sequence {i} (state slot {})", slots[i]))
    }

    /// One token for each sequence: `tokens[i]` continues `slots[i]`.
    /// Returns `[B, vocab_size]` logits copied to the host.
    pub fn step(&mut self, tokens: &[u32], slots: &[usize]) -> Result<Vec<f32>> {
        self.run_step(tokens, slots)?;
        let n = tokens.len() * self.model.cfg.vocab_size;
        copy_back(&self.backend, &self.scratch.bufs[8], n)
    }

    /// One step and greedy sampling on the device: returns the argmax token
    /// of each row over the first `n_valid` vocabulary entries (padded rows
    /// are never picked). Only `B` ids cross to the host.
    pub fn step_greedy(&mut self, tokens: &[u32], slots: &[usize], n_valid: usize) -> Result<Vec<u32>> {
        self.run_step(tokens, slots)?;
        let logits = self.scratch.bufs[8].ptr(&self.backend.stream);
        self.argmax(logits, tokens.len(), n_valid)
    }

    /// One step and sampling on the device: row `i` with `sampling[i]` and the
    /// uniform `uniforms[i]` in [0, 1) (from the caller's seeded generator, so
    /// results are reproducible). Only `B` ids cross to the host.
    pub fn step_sample(
        &mut self,
        tokens: &[u32],
        slots: &[usize],
        sampling: &[DeviceSampling],
        uniforms: &[f64],
        n_valid: usize,
    ) -> Result<Vec<u32>> {
        let b = tokens.len();
        if sampling.len() != b || uniforms.len() != b {
            return Err(CudaError::Input(format!(
                "{b} tokens but {} sampling settings and {} uniforms",
                sampling.len(),
                uniforms.len()
            )));
        }
        for (i, (sp, &u)) in sampling.iter().zip(uniforms).enumerate() {
            let ok = sp.temperature.is_finite()
                && sp.temperature >= 0.0
                && sp.top_p > 0.0
                && sp.top_p <= 1.0
                && (0.0..=1.0).contains(&sp.min_p)
                && (0.0..1.0).contains(&u)
                && sp.top_k < 1 << 24;
            if !ok {
                return Err(CudaError::Input(format!(
                    "row {i}: bad sampling settings {sp:?} or uniform {u}"
                )));
            }
        }
        let vocab = self.model.cfg.vocab_size;
        if n_valid == 0 || n_valid > vocab {
            return Err(CudaError::Input(format!("n_valid {n_valid} must be in 1..={vocab}")));
        }
        self.run_step(tokens, slots)?;
        let st = self.backend.stream.clone();
        let params: Vec<f32> =
            sampling.iter().flat_map(|s| [s.temperature, s.top_k as f32, s.top_p, s.min_p]).collect();
        let params = st.clone_htod(&params).map_err(CudaError::driver("uploading sampling settings"))?;
        let u = st.clone_htod(uniforms).map_err(CudaError::driver("uploading uniforms"))?;
        let ids = self.ids.at_least(&st, b.max(1), &self.backend.live)?;
        let logits = self.scratch.bufs[8].ptr(&st);
        let (pp, up) = (params.device_ptr(&st).0, u.device_ptr(&st).0);
        self.backend.run(&crate::plan::sample(logits, pp, up, ids, b, vocab, n_valid))?;
        let out = self.read_ids(ids, b);
        drop((params, u)); // after read_ids synchronised
        out
    }

    /// Greedy choice of the first `rows` logits rows left by the last forward
    /// pass, on the device. After [`prefill`](Self::prefill) these are the rows
    /// of its last chunk only: with `LogitsMode::Last` and one sequence, its last row.
    pub fn argmax_last_logits(&mut self, rows: usize, n_valid: usize) -> Result<Vec<u32>> {
        let logits = self.scratch.bufs.get(8).ok_or_else(|| CudaError::Input("no logits yet".into()))?;
        logits.need("logits", rows * self.model.cfg.vocab_size, &self.backend.stream)?;
        let p = logits.ptr(&self.backend.stream);
        self.argmax(p, rows, n_valid)
    }

    /// [`step_greedy`](Self::step_greedy) through a CUDA graph per batch size:
    /// the first step of a batch size runs eagerly and is then captured
    /// (embedding, every layer, the head and the argmax); later steps copy
    /// their token ids and slots into the buffers the graph reads and replay
    /// it, one launch instead of hundreds. A graph is captured again after
    /// any buffer it uses was reallocated (a larger prefill, say).
    ///
    /// UNVERIFIED: written without a GPU; `gpu.rs` compares it with the
    /// eager path when a device is present. Batch sizes are graphed as they
    /// come (no padding to buckets).
    pub fn step_greedy_graph(&mut self, tokens: &[u32], slots: &[usize], n_valid: usize) -> Result<Vec<u32>> {
        self.check_step(tokens, slots)?;
        let b = tokens.len();
        if b == 0 {
            return Ok(vec![]);
        }
        // Stage this step's inputs where the eager ops (and so the graph) read them.
        let st = self.backend.stream.clone();
        self.backend.ids.borrow_mut().put(&st, tokens, &self.backend.live)?;
        self.backend.upload_step(slots)?;
        let generation = self.backend.live.generation.get();
        if let Some(g) = self.graphs.get(&b).filter(|g| g.generation == generation && g.n_valid == n_valid) {
            g.graph.launch().map_err(CudaError::driver("replaying the decode graph"))?;
            return self.read_ids(g.ids, b);
        }
        // Eager step: this step's result, and every buffer at its size for this batch.
        let out = self.step_greedy(tokens, slots, n_valid)?;
        let generation = self.backend.live.generation.get();
        let ids = self.ids.at_least(&st, b, &self.backend.live)?;
        self.graphs.remove(&b);
        st.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(CudaError::driver("starting a graph capture"))?;
        self.backend.live.capturing.set(true);
        let recorded = self.run_step(tokens, slots).and_then(|()| {
            let logits = self.scratch.bufs[8].ptr(&st);
            self.launch_argmax(logits, ids, b, n_valid)
        });
        self.backend.live.capturing.set(false);
        let flags = cudarc::driver::sys::CUgraphInstantiate_flags(0);
        let graph = st.end_capture(flags).map_err(CudaError::driver("finishing a graph capture"))?;
        recorded?;
        let graph = graph.ok_or_else(|| CudaError::Input("the decode graph captured nothing".into()))?;
        if self.backend.live.generation.get() == generation {
            self.graphs.insert(b, StepGraph { graph, generation, n_valid, ids });
        }
        Ok(out)
    }

    fn launch_argmax(&self, logits: u64, ids: u64, rows: usize, n_valid: usize) -> Result<()> {
        self.backend.run(&crate::plan::argmax(logits, ids, rows, self.model.cfg.vocab_size, n_valid))
    }

    /// `rows` ids at device address `ids`, after the queued work.
    fn read_ids(&self, ids: u64, rows: usize) -> Result<Vec<u32>> {
        let mut host = vec![0u32; rows];
        if rows > 0 {
            // SAFETY: `ids` holds at least `rows` u32 written by queued kernels, in stream order.
            #[allow(unsafe_code)]
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(&mut host, ids, self.backend.stream.cu_stream())
            }
            .map_err(CudaError::driver("reading sampled ids"))?;
        }
        self.backend.synchronize()?;
        Ok(host)
    }

    fn argmax(&mut self, logits: u64, rows: usize, n_valid: usize) -> Result<Vec<u32>> {
        let vocab = self.model.cfg.vocab_size;
        if n_valid == 0 || n_valid > vocab {
            return Err(CudaError::Input(format!("n_valid {n_valid} must be in 1..={vocab}")));
        }
        let st = self.backend.stream.clone();
        let ids = self.ids.at_least(&st, rows.max(1), &self.backend.live)?;
        self.launch_argmax(logits, ids, rows, n_valid)?;
        self.read_ids(ids, rows)
    }
}

/// A captured decode step of one batch size.
struct StepGraph {
    graph: cudarc::driver::CudaGraph,
    /// [`crate::device::Live::generation`] at capture.
    generation: u64,
    n_valid: usize,
    /// Where the graph's argmax writes the ids.
    ids: u64,
}

/// The first `n` values of `buf`, after the queued work finished.
fn copy_back(backend: &CudaBackend, buf: &DeviceBuf, n: usize) -> Result<Vec<f32>> {
    let mut host = vec![0.0f32; n];
    if n > 0 {
        let view = buf.data.slice(..n);
        backend.stream.memcpy_dtoh(&view, &mut host).map_err(CudaError::driver("reading logits"))?;
    }
    backend.synchronize()?;
    Ok(host)
}
