//! [`MambaOps`] on the device: each operation checks sizes, slots and ids on
//! the host exactly as the CPU backend does, then queues the launches of
//! [`crate::plan`] on the backend's stream (nothing waits for the device here).

use mamba_core::ops::{check_distinct, Layer, MambaOps, Ragged, ScanBufs};
use mamba_core::{CoreError, DType, MambaConfig};

use crate::buf::DeviceBuf;
use crate::device::CudaBackend;
use crate::error::{CudaError, Result};
use crate::plan::{self, BatchPtrs, ScanPtrs, StatePlace};
use crate::weight::DeviceWeight;

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| CudaError::Input(format!("{what} {v} does not fit the kernels' 32-bit index")))
}

fn check_slots(
    cfg: &MambaConfig,
    slots: &[usize],
    states: &DeviceBuf,
    layer: usize,
) -> Result<(), CoreError> {
    let n = cfg.state_layout().slots_in(states.len());
    if let Some(&slot) = slots.iter().find(|&&s| s >= n) {
        return Err(CoreError::SlotOutOfRange { slot, slots: n });
    }
    if layer >= cfg.n_layer {
        return Err(CoreError::BadBatch("layer index past n_layer"));
    }
    check_distinct(slots)
}

impl CudaBackend {
    /// Upload a ragged batch ([`plan::batch_descriptor`]); its parts' addresses.
    fn upload_batch(&self, offsets: &[usize], slots: &[usize]) -> Result<BatchPtrs> {
        let rows = *offsets.last().unwrap_or(&0);
        to_u32(rows, "token rows")?;
        if let Some(&s) = slots.iter().max() {
            to_u32(s, "state slot")?;
        }
        let host = plan::batch_descriptor(offsets, slots);
        let base = self.batch.borrow_mut().put(&self.stream, &host, &self.live)?;
        Ok(BatchPtrs::at(base, slots.len()))
    }

    /// The step's batch: sequence `i` is row `i`, in `slots[i]`.
    pub(crate) fn upload_step(&self, slots: &[usize]) -> Result<BatchPtrs> {
        let offsets: Vec<usize> = (0..=slots.len()).collect();
        self.upload_batch(&offsets, slots)
    }

    fn opt_bias(&self, b: Option<&DeviceWeight>, what: &'static str, n: usize) -> Result<u64> {
        match b {
            Some(b) => {
                b.expect_shape(what, 1, n)?;
                b.f32_ptr(what, &self.stream)
            }
            None => Ok(0),
        }
    }

    /// The addresses a scan reads and writes, after the CPU backend's checks.
    fn scan_ptrs(
        &self,
        layer: Layer<'_, DeviceWeight>,
        rows: usize,
        act: ScanBufs<'_, DeviceBuf>,
        states: &DeviceBuf,
        y: &DeviceBuf,
    ) -> Result<ScanPtrs> {
        let (cfg, lw, st) = (layer.cfg, layer.w, &self.stream);
        let (di, xp, n_s) = (cfg.d_inner, cfg.x_proj_dim(), cfg.d_state);
        lw.a.expect_shape("A", di, n_s)?;
        lw.d.expect_shape("D", 1, di)?;
        if n_s > mamba_core::MAX_D_STATE {
            return Err(CoreError::BadConfig("d_state is larger than 256").into());
        }
        Ok(ScanPtrs {
            x: act.x.need("scan x", rows * di, st)?,
            dt: act.dt.need("scan dt", rows * di, st)?,
            dbc: act.dbc.need("scan dbc", rows * xp, st)?,
            xz: act.xz.need("scan xz", rows * 2 * di, st)?,
            a: lw.a.f32_ptr("A", st)?,
            d: lw.d.f32_ptr("D", st)?,
            states: states.ptr(st),
            y: y.need("scan y", rows * di, st)?,
        })
    }

    /// The chunked scan of a prefill with long sequences ([`plan::scan_chunked`]).
    fn scan_chunked(
        &self,
        layer: Layer<'_, DeviceWeight>,
        batch: Ragged<'_>,
        p: ScanPtrs,
        slots: u64,
    ) -> Result<()> {
        let (cfg, st) = (layer.cfg, &self.stream);
        let (desc, n_chunks) = plan::chunk_descriptor(batch.offsets, self.scan_chunk);
        let desc = self.chunks.borrow_mut().put(st, &desc, &self.live)?;
        let h = self.chunk_h.borrow_mut().at_least(st, n_chunks * cfg.d_inner * cfg.d_state, &self.live)?;
        let dt_sum = self.chunk_dt.borrow_mut().at_least(st, n_chunks * cfg.d_inner, &self.live)?;
        let ch = plan::ChunkPtrs { desc, n_chunks, h, dt_sum };
        let shape = plan::scan_shape_for(cfg.d_state, n_chunks * cfg.d_inner);
        for l in plan::scan_chunked(p, slots, batch.len(), ch, cfg, StatePlace::of(cfg, layer.index), shape) {
            self.run(&l)?;
        }
        Ok(())
    }
}

impl MambaOps for CudaBackend {
    type Buf = DeviceBuf;
    type Weight = DeviceWeight;
    type Error = CudaError;

    fn embed(&self, table: &DeviceWeight, tokens: &[u32], out: &mut DeviceBuf) -> Result<()> {
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(CoreError::TokenOutOfRange { token, vocab: table.rows }.into());
        }
        let st = &self.stream;
        let o = out.need("embed out", tokens.len() * table.cols, st)?;
        if tokens.is_empty() {
            return Ok(());
        }
        to_u32(tokens.len() * table.cols, "embedding values")?;
        let ids = self.ids.borrow_mut().put(st, tokens, &self.live)?;
        self.run(&plan::embed(table.dtype, table.ptr(st), ids, o, tokens.len(), table.cols))
    }

    fn rms_norm(
        &self,
        x: &DeviceBuf,
        rows: usize,
        w: &DeviceWeight,
        eps: f32,
        out: &mut DeviceBuf,
    ) -> Result<()> {
        let st = &self.stream;
        let d = w.len();
        let xp = x.need("rms_norm x", rows * d, st)?;
        let op = out.need("rms_norm out", rows * d, st)?;
        let wp = w.f32_ptr("norm", st)?;
        to_u32(rows, "rows")?;
        self.run(&plan::rms_norm(xp, wp, op, rows, d, eps))
    }

    fn add_assign(&self, acc: &mut DeviceBuf, x: &DeviceBuf, len: usize) -> Result<()> {
        let st = &self.stream;
        let a = acc.need("residual", len, st)?;
        let xp = x.need("residual delta", len, st)?;
        self.run(&plan::add_assign(a, xp, len))
    }

    fn add_rms_norm(
        &self,
        acc: &mut DeviceBuf,
        x: &mut DeviceBuf,
        rows: usize,
        d_model: usize,
        w: &DeviceWeight,
        eps: f32,
    ) -> Result<()> {
        let st = &self.stream;
        w.expect_shape("norm", 1, d_model)?;
        let a = acc.need("residual", rows * d_model, st)?;
        let xp = x.need("residual delta", rows * d_model, st)?;
        let wp = w.f32_ptr("norm", st)?;
        to_u32(rows, "rows")?;
        self.run(&plan::add_rms_norm(a, xp, wp, rows, d_model, eps))
    }

    fn linear(
        &self,
        x: &DeviceBuf,
        rows: usize,
        w: &DeviceWeight,
        bias: Option<&DeviceWeight>,
        out: &mut DeviceBuf,
    ) -> Result<()> {
        let st = &self.stream;
        let (n_out, k) = (w.rows, w.cols);
        let b = self.opt_bias(bias, "linear bias", n_out)?;
        let xp = x.need("linear x", rows * k, st)?;
        let op = out.need("linear out", rows * n_out, st)?;
        if rows == 0 || n_out == 0 {
            return Ok(());
        }
        to_u32(rows * n_out.max(k), "matrix values")?;
        let wp = w.ptr(st);
        if rows <= self.gemv_max_rows.min(plan::GEMV_MAX_ROWS) {
            return self.run(&plan::gemv(w.dtype, wp, xp, b, op, rows, n_out, k));
        }
        if w.dtype == DType::F32 {
            self.blas.gemm(DType::F32, wp, xp, op, rows, n_out, k)?;
            return if b != 0 { self.run(&plan::combine(op, op, b, rows, n_out, 1)) } else { Ok(()) };
        }
        let parts: u32 = if self.split_activations { 2 } else { 1 };
        let hx = self.half_x.borrow_mut().at_least(st, parts as usize * rows * k, &self.live)?;
        self.run(&plan::split(w.dtype, xp, hx, rows * k, parts))?;
        if parts == 1 {
            self.blas.gemm(w.dtype, wp, hx, op, rows, n_out, k)?;
            return if b != 0 { self.run(&plan::combine(op, op, b, rows, n_out, 1)) } else { Ok(()) };
        }
        // Both parts as 2*rows columns of one product: the weight is read once.
        let c = self.parts.borrow_mut().at_least(st, 2 * rows * n_out, &self.live)?;
        self.blas.gemm(w.dtype, wp, hx, c, 2 * rows, n_out, k)?;
        self.run(&plan::combine(c, op, b, rows, n_out, 2))
    }

    fn dt_proj_softplus(
        &self,
        layer: Layer<'_, DeviceWeight>,
        dbc: &DeviceBuf,
        rows: usize,
        dt: &mut DeviceBuf,
    ) -> Result<()> {
        let (cfg, lw, st) = (layer.cfg, layer.w, &self.stream);
        let xp = cfg.x_proj_dim();
        // The device holds dt_proj transposed (DeviceModel::upload).
        lw.dt_proj.expect_shape("dt_proj weight, transposed", cfg.dt_rank, cfg.d_inner)?;
        lw.dt_bias.expect_shape("dt_proj bias", 1, cfg.d_inner)?;
        to_u32(rows * cfg.d_inner.max(xp), "dt values")?;
        self.run(&plan::dt_proj_softplus(
            dbc.need("dbc", rows * xp, st)?,
            lw.dt_proj.f32_ptr("dt_proj weight", st)?,
            lw.dt_bias.f32_ptr("dt_proj bias", st)?,
            dt.need("dt", rows * cfg.d_inner, st)?,
            rows,
            cfg.d_inner,
            cfg.dt_rank,
            xp,
        ))
    }

    fn conv1d_prefill(
        &self,
        layer: Layer<'_, DeviceWeight>,
        batch: Ragged<'_>,
        xz: &DeviceBuf,
        states: &mut DeviceBuf,
        out: &mut DeviceBuf,
    ) -> Result<()> {
        let rows = *batch.offsets.last().unwrap_or(&0);
        batch.validate(rows)?;
        let (cfg, lw, st) = (layer.cfg, layer.w, &self.stream);
        check_slots(cfg, batch.slots, states, layer.index)?;
        let (di, k) = (cfg.d_inner, cfg.d_conv);
        lw.conv_w.expect_shape("conv1d weight", di, k)?;
        let xzp = xz.need("xz", rows * 2 * di, st)?;
        let op = out.need("conv out", rows * di, st)?;
        if rows == 0 {
            return Ok(());
        }
        let ptrs = self.upload_batch(batch.offsets, batch.slots)?;
        let w = lw.conv_w.f32_ptr("conv1d weight", st)?;
        let b = self.opt_bias(lw.conv_b.as_ref(), "conv1d bias", di)?;
        let place = StatePlace::of(cfg, layer.index);
        for l in plan::conv1d_prefill(xzp, w, b, states.ptr(st), op, ptrs, rows, batch.len(), di, k, place) {
            self.run(&l)?;
        }
        Ok(())
    }

    fn conv1d_step(
        &self,
        layer: Layer<'_, DeviceWeight>,
        slots: &[usize],
        xz: &DeviceBuf,
        states: &mut DeviceBuf,
        out: &mut DeviceBuf,
    ) -> Result<()> {
        let (cfg, lw, st) = (layer.cfg, layer.w, &self.stream);
        check_slots(cfg, slots, states, layer.index)?;
        let (di, k, b) = (cfg.d_inner, cfg.d_conv, slots.len());
        lw.conv_w.expect_shape("conv1d weight", di, k)?;
        let xzp = xz.need("xz", b * 2 * di, st)?;
        let op = out.need("conv out", b * di, st)?;
        if b == 0 {
            return Ok(());
        }
        let ptrs = self.upload_step(slots)?;
        let w = lw.conv_w.f32_ptr("conv1d weight", st)?;
        let bias = self.opt_bias(lw.conv_b.as_ref(), "conv1d bias", di)?;
        let place = StatePlace::of(cfg, layer.index);
        self.run(&plan::conv1d_step(xzp, w, bias, states.ptr(st), op, ptrs.slots, b, di, k, place))
    }

    fn scan_prefill(
        &self,
        layer: Layer<'_, DeviceWeight>,
        batch: Ragged<'_>,
        act: ScanBufs<'_, DeviceBuf>,
        states: &mut DeviceBuf,
        y: &mut DeviceBuf,
    ) -> Result<()> {
        let rows = *batch.offsets.last().unwrap_or(&0);
        batch.validate(rows)?;
        check_slots(layer.cfg, batch.slots, states, layer.index)?;
        if batch.is_empty() {
            return Ok(());
        }
        let p = self.scan_ptrs(layer, rows, act, states, y)?;
        let ptrs = self.upload_batch(batch.offsets, batch.slots)?;
        if plan::use_chunked_scan(layer.cfg, batch.offsets, self.scan_chunk) {
            return self.scan_chunked(layer, batch, p, ptrs.slots);
        }
        self.run(&plan::scan(p, ptrs, batch.len(), layer.cfg, StatePlace::of(layer.cfg, layer.index)))
    }

    fn scan_step(
        &self,
        layer: Layer<'_, DeviceWeight>,
        slots: &[usize],
        act: ScanBufs<'_, DeviceBuf>,
        states: &mut DeviceBuf,
        y: &mut DeviceBuf,
    ) -> Result<()> {
        check_slots(layer.cfg, slots, states, layer.index)?;
        if slots.is_empty() {
            return Ok(());
        }
        let p = self.scan_ptrs(layer, slots.len(), act, states, y)?;
        let ptrs = self.upload_step(slots)?;
        self.run(&plan::scan(p, ptrs, slots.len(), layer.cfg, StatePlace::of(layer.cfg, layer.index)))
    }

    fn gather_rows(&self, x: &DeviceBuf, width: usize, rows: &[usize], out: &mut DeviceBuf) -> Result<()> {
        let st = &self.stream;
        let op = out.need("gather out", rows.len() * width, st)?;
        if let Some(&r) = rows.iter().max() {
            x.need("gather x", (r + 1) * width, st)?;
        }
        if rows.is_empty() || width == 0 {
            return Ok(());
        }
        let host: Vec<u32> = rows.iter().map(|&r| to_u32(r, "row")).collect::<Result<_>>()?;
        to_u32(rows.len() * width, "gathered values")?;
        let rp = self.rows.borrow_mut().put(st, &host, &self.live)?;
        self.run(&plan::gather_rows(x.ptr(st), rp, op, rows.len(), width))
    }
}
