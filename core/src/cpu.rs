//! The CPU backend: [`MambaOps`] over `[f32]` buffers and [`Tensor`] weights.
//!
//! Every op validates its buffer sizes and indices once, then runs the
//! kernels of [`crate::kernels`]. Matrix products split their output across
//! threads through the [`Parallel`] hook, which the std runtime fills with a
//! thread pool; the core's own [`Sequential`] runs in place.

use core::marker::PhantomData;
use core::ops::Range;

use crate::config::MambaConfig;
use crate::error::CoreError;
use crate::kernels;
use crate::ops::{check_distinct, Layer, MambaOps, Ragged, ScanBufs};
use crate::shares::FeatureShares;
use crate::tensor::Tensor;

/// A way to run work over disjoint chunks of an output buffer, maybe in parallel.
pub trait Parallel: Sync {
    /// Worker threads available (1 for sequential).
    fn threads(&self) -> usize;
    /// Call `f(start, chunk)` for consecutive chunks of `data` of `chunk` values
    /// (the last may be shorter), where `start` is the chunk's offset in `data`.
    fn for_each_chunk(&self, data: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync));
    /// Call `f(i)` for every task `i` in `0..n`.
    fn for_each_task(&self, n: usize, f: &(dyn Fn(usize) + Sync));
    /// Call `f(i)` once for every thread index `i` in `0..threads()`. A pool
    /// that can runs index `i` on the same thread from call to call, so what
    /// one call wrote under an index is in that thread's cache in the next
    /// (the decode step's channels, see [`CpuBackend`]); the default promises
    /// no placement.
    fn for_each_thread(&self, f: &(dyn Fn(usize) + Sync)) {
        self.for_each_task(self.threads(), f)
    }
}

/// Runs every chunk on the calling thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sequential;

impl Parallel for Sequential {
    fn threads(&self) -> usize {
        1
    }
    fn for_each_chunk(&self, data: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        for (i, c) in data.chunks_mut(chunk.max(1)).enumerate() {
            f(i * chunk.max(1), c);
        }
    }
    fn for_each_task(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        (0..n).for_each(f);
    }
}

/// The CPU backend. `'a` is the lifetime of the weights it reads.
#[derive(Clone, Copy)]
pub struct CpuBackend<'a> {
    par: &'a dyn Parallel,
}

impl Default for CpuBackend<'_> {
    fn default() -> Self {
        CpuBackend { par: &Sequential }
    }
}

impl<'a> CpuBackend<'a> {
    /// A backend that splits matrix products through `par`.
    pub fn new(par: &'a dyn Parallel) -> Self {
        CpuBackend { par }
    }

    /// Whether a step of `b` sequences splits the channels between the
    /// threads (each thread its own, [`Self::owned_channels`]) rather than
    /// the sequences: below two sequences a thread.
    fn owns_channels(&self, b: usize) -> bool {
        let threads = self.par.threads();
        threads > 1 && b < 2 * threads
    }

    /// The channels of `d_inner` that thread `t` owns at a small batch: its
    /// rows of in_proj's x and z halves, its conv, dt and scan. One owner
    /// from op to op, and from token to token through
    /// [`Parallel::for_each_thread`], keeps a token's activations and a
    /// channel's states in one core's caches: with the channels handed out
    /// by a shared counter, batch-1 decode moved them between the cores at
    /// every op (conv, dt and scan took longer on two threads than on one).
    /// Multiples of 16 channels: the AVX-512 conv and scan blocks.
    fn owned_channels(&self, t: usize, d_inner: usize) -> Range<usize> {
        let per = d_inner.div_ceil(self.par.threads()).next_multiple_of(16);
        (t * per).min(d_inner)..((t + 1) * per).min(d_inner)
    }

    /// `f(i, channels)` for each of `b` sequences and ranges of its `d_inner`
    /// channels, over the threads: each thread its own channels of every
    /// sequence at a small batch, else whole sequences.
    fn per_seq_channels(&self, b: usize, d_inner: usize, f: &(dyn Fn(usize, Range<usize>) + Sync)) {
        if self.owns_channels(b) {
            self.par.for_each_thread(&|t| {
                let ch = self.owned_channels(t, d_inner);
                if !ch.is_empty() {
                    (0..b).for_each(|i| f(i, ch.clone()));
                }
            });
        } else {
            self.par.for_each_task(b, &|i| f(i, 0..d_inner));
        }
    }
}

/// A product's operands checked against `w` (`[out, in]`): `x` `[rows, in]`
/// and `out` `[rows, out]` cut to size, the bias `[out]`.
fn product_operands<'x, 'o>(
    x: &'x [f32],
    rows: usize,
    w: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    out: &'o mut [f32],
) -> Result<(&'x [f32], Disjoint<'o>), CoreError> {
    if let Some(b) = bias {
        b.expect_shape("linear bias", 1, w.rows)?;
    }
    let x = need("linear x", x, rows * w.cols)?;
    Ok((x, Disjoint::new(need_mut("linear out", out, rows * w.rows)?)))
}

/// `out[t][f0..f1] = x[t] . w[f0..f1] (+ bias)` for the `rows` token rows,
/// `out` being `[rows, w.rows]`: one thread's share of a product.
fn product_part(
    x: &[f32],
    rows: usize,
    w: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    f: Range<usize>,
    out: &Disjoint<'_>,
) {
    let n_out = w.rows;
    kernels::linear(x, rows, w, bias, (f.start, f.end), |t, o, v| {
        kernels::copy_run(out.part(t * n_out + o..t * n_out + o + v.len()), v)
    })
}

/// The product's features shared out between the pool's threads
/// ([`FeatureShares`]). Out of line: its 4 KB of shares would otherwise sit
/// in every caller's frame, a sequential firmware's included (it had
/// doubled the firmware's stack, 10.1 -> 21.1 KB).
#[inline(never)]
fn shared_product(
    par: &dyn Parallel,
    x: &[f32],
    rows: usize,
    (w, bias): (&Tensor<'_>, Option<&Tensor<'_>>),
    out: &Disjoint<'_>,
) {
    let shares = FeatureShares::new(w.rows, par.threads());
    par.for_each_thread(&|t| {
        while let Some(f) = shares.next(t) {
            product_part(x, rows, w, bias, f, out);
        }
    });
}

/// Sequence `i`'s softplus(dt) over channels `ch` into `out` (`ch.len()`
/// values), from its row of `dbc` (`[_, x_proj_dim]`, checked by the caller).
fn seq_dt(layer: Layer<'_, Tensor<'_>>, dbc: &[f32], i: usize, ch: Range<usize>, out: &mut [f32]) {
    let (lw, xp) = (layer.w, layer.cfg.x_proj_dim());
    let (w, wt) = (&lw.dt_proj, lw.dt_proj_t.as_ref());
    kernels::dt_proj_softplus(&dbc[i * xp..], xp, 1, w, wt, &lw.dt_bias, (ch.start, ch.end), out)
}

/// A decode step's scan operands, checked: what each (sequence, channels)
/// task of [`CpuBackend::scan_step`] and [`CpuBackend::dt_scan_step`] reads
/// and writes.
struct StepOperands<'l, 'w, 'b> {
    layer: Layer<'l, Tensor<'w>>,
    slots: &'b [usize],
    x: &'b [f32],
    dbc: &'b [f32],
    xz: &'b [f32],
    states: Disjoint<'b>,
    y: Disjoint<'b>,
}

impl<'l, 'w, 'b> StepOperands<'l, 'w, 'b> {
    fn new(
        layer: Layer<'l, Tensor<'w>>,
        slots: &'b [usize],
        x: &'b [f32],
        dbc: &'b [f32],
        xz: &'b [f32],
        states: &'b mut [f32],
        y: &'b mut [f32],
    ) -> Result<Self, CoreError> {
        let (cfg, b) = (layer.cfg, slots.len());
        check_slots(cfg, slots, states, layer.index)?;
        let (di, xp) = (cfg.d_inner, cfg.x_proj_dim());
        let (x, dbc) = (need("scan x", x, b * di)?, need("scan dbc", dbc, b * xp)?);
        let xz = need("scan xz", xz, b * 2 * di)?;
        let y = need_mut("scan y", y, b * di)?;
        Ok(StepOperands { layer, slots, x, dbc, xz, states: Disjoint::new(states), y: Disjoint::new(y) })
    }

    /// Sequence `i`'s channels `ch` (their softplus(dt) in `dt`) through
    /// the step, from and into its slot's states. Distinct slots (checked)
    /// and disjoint channel ranges: no two tasks share a state or an output.
    fn run(&self, i: usize, ch: Range<usize>, dt: &[f32]) {
        let (cfg, lw) = (self.layer.cfg, self.layer.w);
        let (di, xp, n_s) = (cfg.d_inner, cfg.x_proj_dim(), cfg.d_state);
        let off = cfg.state_layout().ssm_offset(self.slots[i], self.layer.index);
        // The rows from channel `ch.start` on, so that it is channel 0 (the
        // gate z stays `d_inner` after x in `xz`), with A's and D's rows to match.
        let rows = kernels::ScanRows {
            x: &self.x[i * di + ch.start..(i + 1) * di],
            dt,
            dbc: &self.dbc[i * xp..(i + 1) * xp],
            xz: &self.xz[i * 2 * di + ch.start..(i + 1) * 2 * di],
            d_inner: di,
            d_state: n_s,
            dt_rank: cfg.dt_rank,
        };
        kernels::selective_scan_step(
            rows,
            lw.a.data.slice(ch.start * n_s, ch.end * n_s),
            lw.d.data.slice(ch.start, ch.end),
            0,
            self.states.part(off + ch.start * n_s..off + ch.end * n_s),
            self.y.part(i * di + ch.start..i * di + ch.end),
        );
    }
}

fn need<'b>(what: &'static str, buf: &'b [f32], n: usize) -> Result<&'b [f32], CoreError> {
    buf.get(..n).ok_or(CoreError::BufferTooSmall { what, need: n, got: buf.len() })
}

fn need_mut<'b>(what: &'static str, buf: &'b mut [f32], n: usize) -> Result<&'b mut [f32], CoreError> {
    let got = buf.len();
    buf.get_mut(..n).ok_or(CoreError::BufferTooSmall { what, need: n, got })
}

fn check_slots(cfg: &MambaConfig, slots: &[usize], states: &[f32], layer: usize) -> Result<(), CoreError> {
    let layout = cfg.state_layout();
    let n = layout.slots_in(states.len());
    if let Some(&slot) = slots.iter().find(|&&s| s >= n) {
        return Err(CoreError::SlotOutOfRange { slot, slots: n });
    }
    if layer >= cfg.n_layer {
        return Err(CoreError::BadBatch("layer index past n_layer"));
    }
    check_distinct(slots)
}

/// Work (tokens x channels x states) above which a sequence's scan is split over threads.
const PARALLEL_SCAN_MIN: usize = 1 << 16;

/// Writes into a buffer from several threads at once, each thread owning
/// a disjoint set of its values (scan channels, output features, the states
/// of distinct slots).
struct Disjoint<'b> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'b mut [f32]>,
}

// SAFETY: tasks only touch values that the channel, feature or slot split
// makes disjoint between them, and the writer holds the exclusive borrow
// of the buffer for its whole life.
#[allow(unsafe_code)]
unsafe impl Sync for Disjoint<'_> {}

impl<'b> Disjoint<'b> {
    fn new(buf: &'b mut [f32]) -> Self {
        Disjoint { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: PhantomData }
    }

    /// Values `r` as a slice. The caller's split must give no other task an
    /// overlapping range while the slice lives (checked by the callers'
    /// construction: distinct slots, disjoint channel ranges).
    #[allow(clippy::mut_from_ref)]
    fn part(&self, r: Range<usize>) -> &mut [f32] {
        assert!(r.start <= r.end && r.end <= self.len, "disjoint part out of bounds");
        // SAFETY: in bounds (checked); disjoint from every other task's
        // part by the caller's split; the buffer is exclusively borrowed.
        #[allow(unsafe_code)]
        unsafe {
            core::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len())
        }
    }
}

/// Rows per parallel task so every thread gets a couple of tasks.
fn rows_per_task(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads.max(1) * 2).max(1)
}

impl<'a> MambaOps for CpuBackend<'a> {
    type Buf = [f32];
    type Weight = Tensor<'a>;
    type Error = CoreError;

    fn embed(&self, table: &Tensor<'a>, tokens: &[u32], out: &mut [f32]) -> Result<(), CoreError> {
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(CoreError::TokenOutOfRange { token, vocab: table.rows });
        }
        let out = need_mut("embed out", out, tokens.len() * table.cols)?;
        kernels::embed_rows(table, tokens, out);
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &[f32],
        rows: usize,
        w: &Tensor<'a>,
        eps: f32,
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        let n = rows * w.len();
        kernels::rms_norm(need("rms_norm x", x, n)?, w.data, eps, need_mut("rms_norm out", out, n)?);
        Ok(())
    }

    fn add_assign(&self, acc: &mut [f32], x: &[f32], len: usize) -> Result<(), CoreError> {
        let acc = need_mut("residual", acc, len)?;
        for (a, &v) in acc.iter_mut().zip(need("residual delta", x, len)?) {
            *a += v;
        }
        Ok(())
    }

    fn linear(
        &self,
        x: &[f32],
        rows: usize,
        w: &Tensor<'a>,
        bias: Option<&Tensor<'a>>,
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        let (x, out) = product_operands(x, rows, w, bias, out)?;
        // Threads split the output features: each reads only its share of
        // the weights, once, for all rows (decode and prefill alike).
        if self.par.threads() <= 1 {
            // No shares to keep: a firmware's products stay in this frame.
            product_part(x, rows, w, bias, 0..w.rows, &out);
            return Ok(());
        }
        shared_product(self.par, x, rows, (w, bias), &out);
        Ok(())
    }

    fn in_proj(
        &self,
        layer: Layer<'_, Tensor<'a>>,
        x: &[f32],
        rows: usize,
        xz: &mut [f32],
    ) -> Result<(), CoreError> {
        let (lw, di) = (layer.w, layer.cfg.d_inner);
        let (w, bias) = (&lw.in_proj, lw.in_proj_bias.as_ref());
        if !self.owns_channels(rows) || w.rows != 2 * di {
            return self.linear(x, rows, w, bias, xz);
        }
        let (x, out) = product_operands(x, rows, w, bias, xz)?;
        // Each thread the x and z rows of the channels it will conv and scan.
        self.par.for_each_thread(&|t| {
            let ch = self.owned_channels(t, di);
            product_part(x, rows, w, bias, ch.clone(), &out);
            product_part(x, rows, w, bias, di + ch.start..di + ch.end, &out);
        });
        Ok(())
    }

    fn dt_proj_softplus(
        &self,
        layer: Layer<'_, Tensor<'a>>,
        dbc: &[f32],
        rows: usize,
        dt: &mut [f32],
    ) -> Result<(), CoreError> {
        let (cfg, lw) = (layer.cfg, layer.w);
        let xp = cfg.x_proj_dim();
        let dbc = need("dbc", dbc, rows * xp)?;
        let dt = need_mut("dt", dt, rows * cfg.d_inner)?;
        let (di, threads) = (cfg.d_inner, self.par.threads());
        if !self.owns_channels(rows) {
            let per = rows_per_task(rows, threads) * di;
            self.par.for_each_chunk(dt, per, &|start, o| {
                let (r0, nr) = (start / di, o.len() / di);
                kernels::dt_proj_softplus(
                    &dbc[r0 * xp..],
                    xp,
                    nr,
                    &lw.dt_proj,
                    lw.dt_proj_t.as_ref(),
                    &lw.dt_bias,
                    (0, di),
                    o,
                )
            });
        } else {
            // Too few rows to keep every thread busy (decode): each thread
            // its own channels of every row.
            let dt = Disjoint::new(dt);
            self.per_seq_channels(rows, di, &|t, ch| {
                seq_dt(layer, dbc, t, ch.clone(), dt.part(t * di + ch.start..t * di + ch.end))
            });
        }
        Ok(())
    }

    fn conv1d_prefill(
        &self,
        layer: Layer<'_, Tensor<'a>>,
        batch: Ragged<'_>,
        xz: &[f32],
        states: &mut [f32],
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        let rows = *batch.offsets.last().unwrap_or(&0);
        batch.validate(rows)?;
        let (cfg, lw) = (layer.cfg, layer.w);
        check_slots(cfg, batch.slots, states, layer.index)?;
        let (di, k) = (cfg.d_inner, cfg.d_conv);
        let xz = need("xz", xz, rows * 2 * di)?;
        let out = need_mut("conv out", out, rows * di)?;
        let layout = cfg.state_layout();
        // Channels are independent: every sequence's are split over the
        // threads (blocks of 16, a couple of tasks a thread).
        let chunk = di.div_ceil(self.par.threads() * 2).next_multiple_of(16).clamp(1, di.max(1));
        let per_seq = di.div_ceil(chunk);
        let (st, out) = (Disjoint::new(states), Disjoint::new(out));
        self.par.for_each_task(batch.slots.len() * per_seq, &|task| {
            let (i, d0) = (task / per_seq, task % per_seq * chunk);
            let d1 = (d0 + chunk).min(di);
            let r = batch.rows(i);
            let off = layout.conv_offset(batch.slots[i], layer.index);
            // Distinct slots (checked) and disjoint channel ranges: no two
            // tasks share a state or an output value.
            kernels::conv1d_channels(
                &xz[r.start * 2 * di..r.end * 2 * di],
                2 * di,
                r.len(),
                k,
                lw.conv_w.data,
                lw.conv_b.map(|b| b.data),
                d0,
                st.part(off + d0 * k..off + d1 * k),
                |t, d, v| {
                    let at = (r.start + t) * di + d;
                    kernels::copy_run(out.part(at..at + v.len()), v)
                },
            );
        });
        Ok(())
    }

    fn conv1d_step(
        &self,
        layer: Layer<'_, Tensor<'a>>,
        slots: &[usize],
        xz: &[f32],
        states: &mut [f32],
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        let (cfg, lw) = (layer.cfg, layer.w);
        check_slots(cfg, slots, states, layer.index)?;
        let (di, k) = (cfg.d_inner, cfg.d_conv);
        let xz = need("xz", xz, slots.len() * 2 * di)?;
        let out = need_mut("conv out", out, slots.len() * di)?;
        let layout = cfg.state_layout();
        let (st, out) = (Disjoint::new(states), Disjoint::new(out));
        self.per_seq_channels(slots.len(), di, &|i, Range { start: d0, end: d1 }| {
            let off = layout.conv_offset(slots[i], layer.index);
            // Distinct slots (checked) and disjoint channel ranges: no two
            // tasks share a state or an output value.
            kernels::conv1d_step(
                &xz[i * 2 * di..i * 2 * di + di],
                k,
                lw.conv_w.data,
                lw.conv_b.map(|b| b.data),
                d0,
                st.part(off + d0 * k..off + d1 * k),
                out.part(i * di + d0..i * di + d1),
            );
        });
        Ok(())
    }

    fn scan_prefill(
        &self,
        layer: Layer<'_, Tensor<'a>>,
        batch: Ragged<'_>,
        act: ScanBufs<'_, [f32]>,
        states: &mut [f32],
        y: &mut [f32],
    ) -> Result<(), CoreError> {
        let rows = *batch.offsets.last().unwrap_or(&0);
        batch.validate(rows)?;
        let (cfg, lw) = (layer.cfg, layer.w);
        check_slots(cfg, batch.slots, states, layer.index)?;
        let (di, xp) = (cfg.d_inner, cfg.x_proj_dim());
        let (x, dt) = (need("scan x", act.x, rows * di)?, need("scan dt", act.dt, rows * di)?);
        let (dbc, xz) = (need("scan dbc", act.dbc, rows * xp)?, need("scan xz", act.xz, rows * 2 * di)?);
        let y = need_mut("scan y", y, rows * di)?;
        let layout = cfg.state_layout();
        for (i, &slot) in batch.slots.iter().enumerate() {
            let r = batch.rows(i);
            let off = layout.ssm_offset(slot, layer.index);
            let seq = kernels::ScanRows {
                x: &x[r.start * di..r.end * di],
                dt: &dt[r.start * di..r.end * di],
                dbc: &dbc[r.start * xp..r.end * xp],
                xz: &xz[r.start * 2 * di..r.end * 2 * di],
                d_inner: di,
                d_state: cfg.d_state,
                dt_rank: cfg.dt_rank,
            };
            let state = &mut states[off..off + layout.ssm_len()];
            let y = &mut y[r.start * di..r.end * di];
            let n_s = cfg.d_state;
            if self.par.threads() > 1 && r.len() * di * n_s >= PARALLEL_SCAN_MIN {
                // Channels are independent: split them over threads; each
                // task owns its channels' states and writes only their
                // (gated) y columns.
                let out = Disjoint::new(y);
                let chunk = di.div_ceil(self.par.threads() * 4).max(1) * n_s;
                self.par.for_each_chunk(state, chunk, &|start, st| {
                    kernels::selective_scan_channels(
                        seq,
                        r.len(),
                        lw.a.data,
                        lw.d.data,
                        start / n_s,
                        st,
                        |t, d, v| kernels::copy_run(out.part(t * di + d..t * di + d + v.len()), v),
                    )
                });
            } else {
                kernels::selective_scan_seq(seq, r.len(), lw.a.data, lw.d.data, state, y);
            }
        }
        Ok(())
    }

    fn scan_step(
        &self,
        layer: Layer<'_, Tensor<'a>>,
        slots: &[usize],
        act: ScanBufs<'_, [f32]>,
        states: &mut [f32],
        y: &mut [f32],
    ) -> Result<(), CoreError> {
        let (cfg, b) = (layer.cfg, slots.len());
        let di = cfg.d_inner;
        let dt = need("scan dt", act.dt, b * di)?;
        let step = StepOperands::new(layer, slots, act.x, act.dbc, act.xz, states, y)?;
        self.per_seq_channels(b, di, &|i, ch| {
            step.run(i, ch.clone(), &dt[i * di + ch.start..i * di + ch.end]);
        });
        Ok(())
    }

    fn dt_scan_step(
        &self,
        layer: Layer<'_, Tensor<'a>>,
        slots: &[usize],
        x: &[f32],
        dbc: &[f32],
        xz: &[f32],
        dt: &mut [f32],
        states: &mut [f32],
        y: &mut [f32],
    ) -> Result<(), CoreError> {
        let b = slots.len();
        if !self.owns_channels(b) {
            self.dt_proj_softplus(layer, dbc, b, dt)?;
            return self.scan_step(layer, slots, ScanBufs { x, dt: &*dt, dbc, xz }, states, y);
        }
        let di = layer.cfg.d_inner;
        let dt = Disjoint::new(need_mut("dt", dt, b * di)?);
        let step = StepOperands::new(layer, slots, x, dbc, xz, states, y)?;
        // Each thread its channels' dt, then their scan reading it from L1:
        // one pool call, no wait between the two.
        self.per_seq_channels(b, di, &|i, ch| {
            let dt = dt.part(i * di + ch.start..i * di + ch.end);
            seq_dt(layer, step.dbc, i, ch.clone(), dt);
            step.run(i, ch, dt);
        });
        Ok(())
    }

    fn gather_rows(&self, x: &[f32], width: usize, rows: &[usize], out: &mut [f32]) -> Result<(), CoreError> {
        let out = need_mut("gather out", out, rows.len() * width)?;
        for (&r, o) in rows.iter().zip(out.chunks_exact_mut(width.max(1))) {
            o.copy_from_slice(need("gather x", x, (r + 1) * width)?.get(r * width..).unwrap_or(&[]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::{CpuBackend, Parallel, Sequential};
    use crate::ops::MambaOps;
    use crate::tensor::{Tensor, WData};
    use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
    use std::{vec, vec::Vec};

    /// Claims `threads` threads, runs everything in place: tasks first to
    /// last, or last to first when the flag is set.
    struct Claims(usize, bool);

    impl Parallel for Claims {
        fn threads(&self) -> usize {
            self.0
        }
        fn for_each_chunk(&self, data: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
            super::Sequential.for_each_chunk(data, chunk, f)
        }
        fn for_each_task(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
            match self.1 {
                false => (0..n).for_each(f),
                true => (0..n).rev().for_each(f),
            }
        }
    }

    #[test]
    fn a_product_shared_out_equals_the_sequential_one_in_any_thread_order() {
        // Run in place, the first thread to run takes its own share and
        // then every other share from the back: the steals cover it all.
        let (k, n) = (40, 1001);
        let val = |i: usize, s: f32| (i as f32 * 0.37 + s).sin() * 0.5;
        let w: Vec<f32> = (0..n * k).map(|i| val(i, 0.1)).collect();
        let bias: Vec<f32> = (0..n).map(|i| val(i, 2.0)).collect();
        let x: Vec<f32> = (0..9 * k).map(|i| val(i, 1.3)).collect();
        let (w, bias) = (Tensor::new(WData::F32(&w), n, k, "w").unwrap(), Tensor::vector_f32(&bias));
        for rows in [1, 3, 9] {
            let mut want = vec![0.0f32; rows * n];
            CpuBackend::new(&Sequential).linear(&x, rows, &w, Some(&bias), &mut want).unwrap();
            for threads in [2, 3, 5] {
                for par in [Claims(threads, false), Claims(threads, true)] {
                    let mut got = vec![f32::NAN; rows * n];
                    CpuBackend::new(&par).linear(&x, rows, &w, Some(&bias), &mut got).unwrap();
                    let same = got.iter().zip(&want).all(|(g, e)| g.to_bits() == e.to_bits());
                    assert!(same, "rows {rows}, threads {threads}");
                }
            }
        }
    }

    #[test]
    fn owned_channels_cover_d_inner_once_in_blocks_of_16() {
        for threads in [1, 2, 3, 7, 16] {
            let par = Claims(threads, false);
            let cpu = CpuBackend::new(&par);
            assert_eq!(cpu.owns_channels(1), threads > 1);
            assert_eq!(cpu.owns_channels(2 * threads - 1), threads > 1);
            assert!(!cpu.owns_channels(2 * threads));
            for d_inner in [16, 32, 40, 1536, 5120] {
                let mut next = 0;
                for t in 0..threads {
                    let r = cpu.owned_channels(t, d_inner);
                    assert_eq!(
                        r.start,
                        next.min(d_inner),
                        "threads {threads}, d_inner {d_inner}, thread {t}"
                    );
                    assert!(
                        r.start.is_multiple_of(16) || r.is_empty(),
                        "threads {threads}, d_inner {d_inner}: {r:?}"
                    );
                    next = r.end.max(next);
                }
                assert_eq!(next, d_inner, "threads {threads}, d_inner {d_inner}");
                let calls = AtomicUsize::new(0);
                let seen = [const { AtomicU8::new(0) }; 5120];
                cpu.per_seq_channels(1, d_inner, &|i, ch| {
                    assert_eq!(i, 0);
                    calls.fetch_add(1, Relaxed);
                    ch.for_each(|c| {
                        seen[c].fetch_add(1, Relaxed);
                    });
                });
                let once = seen[..d_inner].iter().all(|n| n.load(Relaxed) == 1);
                assert!(once, "threads {threads}, d_inner {d_inner}");
                assert!(calls.load(Relaxed) <= threads);
            }
        }
    }
}
