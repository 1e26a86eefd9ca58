//! [`MambaOps`] on the device: each operation checks sizes, slots and ids on
//! the host exactly as the CPU backend does, then queues its kernels on the
//! backend's stream (nothing waits for the device here).

use mamba_core::ops::{check_distinct, Layer, MambaOps, Ragged, ScanBufs};
use mamba_core::{CoreError, DType, MambaConfig};

use crate::buf::DeviceBuf;
use crate::device::{Arg, CudaBackend};
use crate::error::{CudaError, Result};
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

/// Scan lanes per (sequence, channel) and states per lane for `d_state`.
pub(crate) fn scan_shape(d_state: usize) -> (u32, u32) {
    if d_state <= 32 {
        (d_state.next_power_of_two() as u32, 1)
    } else {
        (32, d_state.div_ceil(32) as u32)
    }
}

const SCAN_KERNELS: [&str; 8] = [
    "selective_scan_1",
    "selective_scan_2",
    "selective_scan_3",
    "selective_scan_4",
    "selective_scan_5",
    "selective_scan_6",
    "selective_scan_7",
    "selective_scan_8",
];

const GEMV_F32: [&str; 8] = [
    "gemv_f32_1",
    "gemv_f32_2",
    "gemv_f32_3",
    "gemv_f32_4",
    "gemv_f32_5",
    "gemv_f32_6",
    "gemv_f32_7",
    "gemv_f32_8",
];
const GEMV_F16: [&str; 8] = [
    "gemv_f16_1",
    "gemv_f16_2",
    "gemv_f16_3",
    "gemv_f16_4",
    "gemv_f16_5",
    "gemv_f16_6",
    "gemv_f16_7",
    "gemv_f16_8",
];
const GEMV_BF16: [&str; 8] = [
    "gemv_bf16_1",
    "gemv_bf16_2",
    "gemv_bf16_3",
    "gemv_bf16_4",
    "gemv_bf16_5",
    "gemv_bf16_6",
    "gemv_bf16_7",
    "gemv_bf16_8",
];

/// Most rows the decode kernel (`gemv_*`) takes; more go to cuBLAS.
pub(crate) const GEMV_MAX_ROWS: usize = 8;

impl CudaBackend {
    /// Upload a ragged batch as `[offsets (n+1) | slots (n) | seq_of_row (rows)]`;
    /// returns the addresses of the three parts.
    fn upload_batch(&self, offsets: &[usize], slots: &[usize]) -> Result<(u64, u64, u64)> {
        let rows = *offsets.last().unwrap_or(&0);
        let mut host = Vec::with_capacity(offsets.len() + slots.len() + rows);
        for &o in offsets {
            host.push(to_u32(o, "row offset")?);
        }
        for &s in slots {
            host.push(to_u32(s, "state slot")?);
        }
        for (i, w) in offsets.windows(2).enumerate() {
            host.extend(std::iter::repeat_n(i as u32, w[1] - w[0]));
        }
        let base = self.batch.borrow_mut().put(&self.stream, &host, &self.live)?;
        let o = base;
        let s = o + 4 * offsets.len() as u64;
        let r = s + 4 * slots.len() as u64;
        Ok((o, s, r))
    }

    /// The step's batch: sequence `i` is row `i`, in `slots[i]`.
    pub(crate) fn upload_step(&self, slots: &[usize]) -> Result<(u64, u64, u64)> {
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

    #[allow(clippy::too_many_arguments)]
    fn scan(
        &self,
        layer: Layer<'_, DeviceWeight>,
        rows: usize,
        n_seqs: usize,
        (offsets, slots): (u64, u64),
        act: ScanBufs<'_, DeviceBuf>,
        states: &mut DeviceBuf,
        y: &mut DeviceBuf,
    ) -> Result<()> {
        let (cfg, lw) = (layer.cfg, layer.w);
        let (di, xp, n_s) = (cfg.d_inner, cfg.x_proj_dim(), cfg.d_state);
        let st = &self.stream;
        let x = act.x.need("scan x", rows * di, st)?;
        let dt = act.dt.need("scan dt", rows * di, st)?;
        let dbc = act.dbc.need("scan dbc", rows * xp, st)?;
        let xz = act.xz.need("scan xz", rows * 2 * di, st)?;
        let yp = y.need("scan y", rows * di, st)?;
        lw.a.expect_shape("A", di, n_s)?;
        lw.d.expect_shape("D", 1, di)?;
        let (a, d) = (lw.a.f32_ptr("A", st)?, lw.d.f32_ptr("D", st)?);
        let layout = cfg.state_layout();
        let ssm_off = (layer.index * layout.layer_len() + layout.conv_len()) as u64;
        let (group, npt) = scan_shape(n_s);
        let kernel =
            *SCAN_KERNELS.get(npt as usize - 1).ok_or(CoreError::BadConfig("d_state is larger than 256"))?;
        let threads = (n_seqs * di) as u64 * group as u64;
        const BLOCK: u64 = 128;
        let grid = to_u32(threads.div_ceil(BLOCK) as usize, "scan blocks")?;
        let sp = states.ptr(st);
        self.launch(
            kernel,
            grid,
            BLOCK as u32,
            &[
                Arg::Ptr(x),
                Arg::Ptr(dt),
                Arg::Ptr(dbc),
                Arg::Ptr(xz),
                Arg::Ptr(a),
                Arg::Ptr(d),
                Arg::Ptr(sp),
                Arg::Ptr(yp),
                Arg::Ptr(offsets),
                Arg::Ptr(slots),
                Arg::U32(to_u32(n_seqs, "sequences")?),
                Arg::U32(di as u32),
                Arg::U32(n_s as u32),
                Arg::U32(cfg.dt_rank as u32),
                Arg::U64(layout.slot_len() as u64),
                Arg::U64(ssm_off),
                Arg::U32(group),
            ],
        )
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
        let ids = self.ids.borrow_mut().put(st, tokens, &self.live)?;
        let kernel = match table.dtype {
            DType::F32 => "embed_f32",
            DType::F16 => "embed_f16",
            DType::BF16 => "embed_bf16",
        };
        let n = (tokens.len() * table.cols) as u64;
        let args = [
            Arg::Ptr(table.ptr(st)),
            Arg::Ptr(ids),
            Arg::Ptr(o),
            Arg::U32(to_u32(tokens.len(), "tokens")?),
            Arg::U32(to_u32(table.cols, "d_model")?),
        ];
        self.launch_elems(kernel, n, &args)
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
        let args = [
            Arg::Ptr(xp),
            Arg::Ptr(wp),
            Arg::Ptr(op),
            Arg::U32(to_u32(rows, "rows")?),
            Arg::U32(d as u32),
            Arg::F32(eps),
        ];
        self.launch("rms_norm", to_u32(rows, "rows")?, 256, &args)
    }

    fn add_assign(&self, acc: &mut DeviceBuf, x: &DeviceBuf, len: usize) -> Result<()> {
        let st = &self.stream;
        let a = acc.need("residual", len, st)?;
        let xp = x.need("residual delta", len, st)?;
        self.launch_elems("add_assign", len as u64, &[Arg::Ptr(a), Arg::Ptr(xp), Arg::U64(len as u64)])
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
        let wp = w.ptr(st);
        if rows <= self.gemv_max_rows.min(GEMV_MAX_ROWS) {
            let names = match w.dtype {
                DType::F32 => &GEMV_F32,
                DType::F16 => &GEMV_F16,
                DType::BF16 => &GEMV_BF16,
            };
            let args = [
                Arg::Ptr(wp),
                Arg::Ptr(xp),
                Arg::Ptr(b),
                Arg::Ptr(op),
                Arg::U32(to_u32(n_out, "output features")?),
                Arg::U32(to_u32(k, "input features")?),
                Arg::U32((k % 8 == 0) as u32),
            ];
            // 8 warps per block, one output row per warp.
            let grid = to_u32(n_out.div_ceil(8), "blocks")?;
            return self.launch(names[rows - 1], grid, 256, &args);
        }
        let combine = |c: u64, parts: u32| {
            let args = [
                Arg::Ptr(c),
                Arg::Ptr(op),
                Arg::Ptr(b),
                Arg::U32(rows as u32),
                Arg::U32(n_out as u32),
                Arg::U32(parts),
            ];
            self.launch_elems("combine_parts", (rows * n_out) as u64, &args)
        };
        if w.dtype == DType::F32 {
            self.blas.gemm(DType::F32, wp, xp, op, rows, n_out, k)?;
            return if b != 0 { combine(op, 1) } else { Ok(()) };
        }
        let parts: u32 = if self.split_activations { 2 } else { 1 };
        let n = (rows * k) as u64;
        let hx = self.half_x.borrow_mut().at_least(st, parts as usize * rows * k, &self.live)?;
        let split = if w.dtype == DType::BF16 { "split_bf16" } else { "split_f16" };
        self.launch_elems(split, n, &[Arg::Ptr(xp), Arg::Ptr(hx), Arg::U64(n), Arg::U32(parts)])?;
        if parts == 1 {
            self.blas.gemm(w.dtype, wp, hx, op, rows, n_out, k)?;
            return if b != 0 { combine(op, 1) } else { Ok(()) };
        }
        // Both parts as 2*rows columns of one product: the weight is read once.
        let c = self.parts.borrow_mut().at_least(st, 2 * rows * n_out, &self.live)?;
        self.blas.gemm(w.dtype, wp, hx, c, 2 * rows, n_out, k)?;
        combine(c, 2)
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
        lw.dt_proj.expect_shape("dt_proj weight", cfg.d_inner, cfg.dt_rank)?;
        lw.dt_bias.expect_shape("dt_proj bias", 1, cfg.d_inner)?;
        let args = [
            Arg::Ptr(dbc.need("dbc", rows * xp, st)?),
            Arg::Ptr(lw.dt_proj.f32_ptr("dt_proj weight", st)?),
            Arg::Ptr(lw.dt_bias.f32_ptr("dt_proj bias", st)?),
            Arg::Ptr(dt.need("dt", rows * cfg.d_inner, st)?),
            Arg::U32(to_u32(rows, "rows")?),
            Arg::U32(cfg.d_inner as u32),
            Arg::U32(cfg.dt_rank as u32),
            Arg::U32(xp as u32),
        ];
        self.launch_elems("dt_proj_softplus", (rows * cfg.d_inner) as u64, &args)
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
        let (offsets, slots, seq_of_row) = self.upload_batch(batch.offsets, batch.slots)?;
        let layout = cfg.state_layout();
        let layer_off = (layer.index * layout.layer_len()) as u64;
        let sp = states.ptr(st);
        let w = lw.conv_w.f32_ptr("conv1d weight", st)?;
        let b = self.opt_bias(lw.conv_b.as_ref(), "conv1d bias", di)?;
        let out_args = [
            Arg::Ptr(xzp),
            Arg::Ptr(w),
            Arg::Ptr(b),
            Arg::Ptr(sp),
            Arg::Ptr(op),
            Arg::Ptr(seq_of_row),
            Arg::Ptr(offsets),
            Arg::Ptr(slots),
            Arg::U32(to_u32(rows, "rows")?),
            Arg::U32(di as u32),
            Arg::U32(k as u32),
            Arg::U64(layout.slot_len() as u64),
            Arg::U64(layer_off),
        ];
        self.launch_elems("conv1d_prefill_out", (rows * di) as u64, &out_args)?;
        let state_args = [
            Arg::Ptr(xzp),
            Arg::Ptr(sp),
            Arg::Ptr(offsets),
            Arg::Ptr(slots),
            Arg::U32(to_u32(batch.len(), "sequences")?),
            Arg::U32(di as u32),
            Arg::U32(k as u32),
            Arg::U64(layout.slot_len() as u64),
            Arg::U64(layer_off),
        ];
        self.launch_elems("conv1d_prefill_state", (batch.len() * di) as u64, &state_args)
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
        let (_, slot_ptr, _) = self.upload_step(slots)?;
        let layout = cfg.state_layout();
        let args = [
            Arg::Ptr(xzp),
            Arg::Ptr(lw.conv_w.f32_ptr("conv1d weight", st)?),
            Arg::Ptr(self.opt_bias(lw.conv_b.as_ref(), "conv1d bias", di)?),
            Arg::Ptr(states.ptr(st)),
            Arg::Ptr(op),
            Arg::Ptr(slot_ptr),
            Arg::U32(to_u32(b, "batch")?),
            Arg::U32(di as u32),
            Arg::U32(k as u32),
            Arg::U64(layout.slot_len() as u64),
            Arg::U64((layer.index * layout.layer_len()) as u64),
        ];
        self.launch_elems("conv1d_step", (b * di) as u64, &args)
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
        let (offsets, slots, _) = self.upload_batch(batch.offsets, batch.slots)?;
        self.scan(layer, rows, batch.len(), (offsets, slots), act, states, y)
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
        let (offsets, slot_ptr, _) = self.upload_step(slots)?;
        self.scan(layer, slots.len(), slots.len(), (offsets, slot_ptr), act, states, y)
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
        let rp = self.rows.borrow_mut().put(st, &host, &self.live)?;
        let args = [
            Arg::Ptr(x.ptr(st)),
            Arg::Ptr(rp),
            Arg::Ptr(op),
            Arg::U32(host.len() as u32),
            Arg::U32(to_u32(width, "width")?),
        ];
        self.launch_elems("gather_rows", (rows.len() * width) as u64, &args)
    }
}
