//! Which kernels an operation launches, with which arguments: pure functions
//! of device addresses and sizes, so the same plans run on a GPU
//! ([`crate::CudaBackend`]) and, in the tests, on a CPU emulation of the
//! kernels (`tests/emulated.rs`) that checks them against mamba-core.
//!
//! Addresses are `u64` device pointers (0 for an absent bias); sizes are
//! checked by the caller. Every plan's argument list matches its kernel's
//! parameter list in `kernels/*.cu` (checked again at launch).

use mamba_core::DType;

/// One kernel argument: a device address or a scalar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    U32(u32),
    U64(u64),
    F32(f32),
}

/// One kernel launch over `grid` blocks of `block` threads (1-D).
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: u32,
    pub block: u32,
    pub args: Vec<Arg>,
}

/// Threads per block of the element-wise (grid-stride) kernels.
const ELEM_BLOCK: u32 = 256;

/// An element-wise kernel over `n` items: grid-stride loops, so the grid is capped.
fn elems(kernel: &'static str, n: u64, args: Vec<Arg>) -> Launch {
    let grid = n.div_ceil(ELEM_BLOCK as u64).min(1 << 16) as u32;
    Launch { kernel, grid, block: ELEM_BLOCK, args }
}

/// Fits the kernels' 32-bit sizes (callers check first; saturates otherwise).
fn u(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// `out[t] = table[ids[t]]`: table `[vocab, d_model]` of `dtype`, out `[n, d_model]` f32.
pub fn embed(dtype: DType, table: u64, ids: u64, out: u64, n: usize, d_model: usize) -> Launch {
    let kernel = match dtype {
        // Device weights are never Q8_0 (uploads dequantize it to f32).
        DType::F32 | DType::Q8_0 => "embed_f32",
        DType::F16 => "embed_f16",
        DType::BF16 => "embed_bf16",
    };
    let args = vec![Arg::Ptr(table), Arg::Ptr(ids), Arg::Ptr(out), Arg::U32(u(n)), Arg::U32(u(d_model))];
    elems(kernel, (n * d_model) as u64, args)
}

/// Threads of a norm block (one block per row): 1024 for a few rows (a
/// decode step's one row of 2560 is then 3 values a thread, not 10 in a
/// row), else 256.
fn norm_block(rows: usize) -> u32 {
    if rows < 64 {
        1024
    } else {
        256
    }
}

/// RMSNorm of `rows` rows of width `d`.
pub fn rms_norm(x: u64, w: u64, out: u64, rows: usize, d: usize, eps: f32) -> Launch {
    let args =
        vec![Arg::Ptr(x), Arg::Ptr(w), Arg::Ptr(out), Arg::U32(u(rows)), Arg::U32(u(d)), Arg::F32(eps)];
    Launch { kernel: "rms_norm", grid: u(rows), block: norm_block(rows), args }
}

/// `acc += x`, then `x = RMSNorm(acc) * w`, over `rows` rows of width `d`
/// (the same block size as [`rms_norm`], so the same bits as the two apart).
pub fn add_rms_norm(acc: u64, x: u64, w: u64, rows: usize, d: usize, eps: f32) -> Launch {
    let args =
        vec![Arg::Ptr(acc), Arg::Ptr(x), Arg::Ptr(w), Arg::U32(u(rows)), Arg::U32(u(d)), Arg::F32(eps)];
    Launch { kernel: "add_rms_norm", grid: u(rows), block: norm_block(rows), args }
}

/// `acc[..len] += x[..len]`.
pub fn add_assign(acc: u64, x: u64, len: usize) -> Launch {
    elems("add_assign", len as u64, vec![Arg::Ptr(acc), Arg::Ptr(x), Arg::U64(len as u64)])
}

/// Most rows the decode kernel takes; more go to cuBLAS.
pub const GEMV_MAX_ROWS: usize = 8;

pub(crate) const GEMV_F32: [&str; 8] = [
    "gemv_f32_1",
    "gemv_f32_2",
    "gemv_f32_3",
    "gemv_f32_4",
    "gemv_f32_5",
    "gemv_f32_6",
    "gemv_f32_7",
    "gemv_f32_8",
];
pub(crate) const GEMV_F16: [&str; 8] = [
    "gemv_f16_1",
    "gemv_f16_2",
    "gemv_f16_3",
    "gemv_f16_4",
    "gemv_f16_5",
    "gemv_f16_6",
    "gemv_f16_7",
    "gemv_f16_8",
];
pub(crate) const GEMV_BF16: [&str; 8] = [
    "gemv_bf16_1",
    "gemv_bf16_2",
    "gemv_bf16_3",
    "gemv_bf16_4",
    "gemv_bf16_5",
    "gemv_bf16_6",
    "gemv_bf16_7",
    "gemv_bf16_8",
];

/// `out[rows, n_out] = x[rows, k] w[n_out, k]^T (+ bias)` for 1..=8 rows, with
/// the block layout of [`gemv_split`].
#[allow(clippy::too_many_arguments)]
pub fn gemv(
    dtype: DType,
    w: u64,
    x: u64,
    bias: u64,
    out: u64,
    rows: usize,
    n_out: usize,
    k: usize,
) -> Launch {
    gemv_with_split(dtype, w, x, bias, out, rows, n_out, k, gemv_split(n_out, k))
}

/// Warps per output row of the decode kernel (1, 2, 4 or 8): doubled while
/// fewer than 4096 warps would read (32 a multiprocessor on an H200; with
/// one row a warp, 2.8b's out_proj, 2560 x 5120, keeps 19) and each warp
/// still gets 256 or more of the row.
pub fn gemv_split(n_out: usize, k: usize) -> u32 {
    let mut split = 1;
    while split < 8 && n_out * split < 4096 && k / (2 * split) >= 256 {
        split *= 2;
    }
    split as u32
}

/// [`gemv`] with an explicit `split` (1, 2, 4 or 8; others round down to one of them).
#[allow(clippy::too_many_arguments)]
pub fn gemv_with_split(
    dtype: DType,
    w: u64,
    x: u64,
    bias: u64,
    out: u64,
    rows: usize,
    n_out: usize,
    k: usize,
    split: u32,
) -> Launch {
    let names = match dtype {
        // Device weights are never Q8_0 (uploads dequantize it to f32).
        DType::F32 | DType::Q8_0 => &GEMV_F32,
        DType::F16 => &GEMV_F16,
        DType::BF16 => &GEMV_BF16,
    };
    let split = match split {
        0 | 1 => 1,
        2 | 3 => 2,
        4..=7 => 4,
        _ => 8,
    };
    let args = vec![
        Arg::Ptr(w),
        Arg::Ptr(x),
        Arg::Ptr(bias),
        Arg::Ptr(out),
        Arg::U32(u(n_out)),
        Arg::U32(u(k)),
        // 16-byte loads need 16-byte aligned rows of W and x.
        Arg::U32((k.is_multiple_of(8) && w.is_multiple_of(16) && x.is_multiple_of(16)) as u32),
        Arg::U32(split),
    ];
    let kernel = names[rows.clamp(1, GEMV_MAX_ROWS) - 1];
    // 8 warps per block: 8 / split rows.
    let rows_per_block = (8 / split) as usize;
    Launch { kernel, grid: u(n_out.div_ceil(rows_per_block)), block: 256, args }
}

/// f32 `x[n]` into `parts` half-precision parts `[parts, n]` (hi, then lo).
pub fn split(dtype: DType, x: u64, out: u64, n: usize, parts: u32) -> Launch {
    let kernel = if dtype == DType::BF16 { "split_bf16" } else { "split_f16" };
    elems(kernel, n as u64, vec![Arg::Ptr(x), Arg::Ptr(out), Arg::U64(n as u64), Arg::U32(parts)])
}

/// `out[r, o] = sum_p c[p, r, o] + bias[o]`.
pub fn combine(c: u64, out: u64, bias: u64, rows: usize, n_out: usize, parts: u32) -> Launch {
    let args = vec![
        Arg::Ptr(c),
        Arg::Ptr(out),
        Arg::Ptr(bias),
        Arg::U32(u(rows)),
        Arg::U32(u(n_out)),
        Arg::U32(parts),
    ];
    elems("combine_parts", (rows * n_out) as u64, args)
}

/// Rows and channels of one `dt_proj_softplus` block of 256 threads
/// (`DT_ROWS`, `DT_CH` in `kernels/dt.cu`).
const DT_ROWS: usize = 8;
const DT_CH: usize = 32;

/// `dt = softplus(dbc[:, :dt_rank] wt + bias)` for `rows` rows, with `wt` the
/// transposed `dt_proj`, `[dt_rank, d_inner]` f32 ([`crate::upload_f32_transposed`]).
#[allow(clippy::too_many_arguments)]
pub fn dt_proj_softplus(
    dbc: u64,
    wt: u64,
    bias: u64,
    dt: u64,
    rows: usize,
    d_inner: usize,
    dt_rank: usize,
    xp: usize,
) -> Launch {
    let args = vec![
        Arg::Ptr(dbc),
        Arg::Ptr(wt),
        Arg::Ptr(bias),
        Arg::Ptr(dt),
        Arg::U32(u(rows)),
        Arg::U32(u(d_inner)),
        Arg::U32(u(dt_rank)),
        Arg::U32(u(xp)),
    ];
    let blocks = d_inner.div_ceil(DT_CH) * rows.div_ceil(DT_ROWS);
    Launch { kernel: "dt_proj_softplus", grid: u(blocks), block: 256, args }
}

/// A ragged batch as the kernels read it: `[offsets (n+1) | slots (n) | seq_of_row (rows)]`.
pub fn batch_descriptor(offsets: &[usize], slots: &[usize]) -> Vec<u32> {
    let rows = *offsets.last().unwrap_or(&0);
    let mut host = Vec::with_capacity(offsets.len() + slots.len() + rows);
    host.extend(offsets.iter().map(|&o| u(o)));
    host.extend(slots.iter().map(|&s| u(s)));
    for (i, w) in offsets.windows(2).enumerate() {
        host.extend(std::iter::repeat_n(i as u32, w[1] - w[0]));
    }
    host
}

/// Addresses of the three parts of a [`batch_descriptor`] uploaded at `base`.
#[derive(Clone, Copy, Debug)]
pub struct BatchPtrs {
    pub offsets: u64,
    pub slots: u64,
    pub seq_of_row: u64,
}

impl BatchPtrs {
    pub fn at(base: u64, n_seqs: usize) -> Self {
        let slots = base + 4 * (n_seqs as u64 + 1);
        BatchPtrs { offsets: base, slots, seq_of_row: slots + 4 * n_seqs as u64 }
    }
}

/// Where one layer's states sit in a slot: slot stride, conv and SSM offsets (f32 values).
#[derive(Clone, Copy, Debug)]
pub struct StatePlace {
    pub slot_len: u64,
    pub conv_off: u64,
    pub ssm_off: u64,
}

impl StatePlace {
    pub fn of(cfg: &mamba_core::MambaConfig, layer: usize) -> Self {
        let l = cfg.state_layout();
        let conv_off = (layer * l.layer_len()) as u64;
        StatePlace { slot_len: l.slot_len() as u64, conv_off, ssm_off: conv_off + l.conv_len() as u64 }
    }
}

/// Causal conv1d + SiLU over a ragged prefill: outputs (reading the old
/// states), then the new states. xz `[rows, 2*d_inner]`, out `[rows, d_inner]`.
#[allow(clippy::too_many_arguments)]
pub fn conv1d_prefill(
    xz: u64,
    w: u64,
    bias: u64,
    states: u64,
    out: u64,
    batch: BatchPtrs,
    rows: usize,
    n_seqs: usize,
    d_inner: usize,
    d_conv: usize,
    place: StatePlace,
) -> [Launch; 2] {
    let out_args = vec![
        Arg::Ptr(xz),
        Arg::Ptr(w),
        Arg::Ptr(bias),
        Arg::Ptr(states),
        Arg::Ptr(out),
        Arg::Ptr(batch.seq_of_row),
        Arg::Ptr(batch.offsets),
        Arg::Ptr(batch.slots),
        Arg::U32(u(rows)),
        Arg::U32(u(d_inner)),
        Arg::U32(u(d_conv)),
        Arg::U64(place.slot_len),
        Arg::U64(place.conv_off),
    ];
    let state_args = vec![
        Arg::Ptr(xz),
        Arg::Ptr(states),
        Arg::Ptr(batch.offsets),
        Arg::Ptr(batch.slots),
        Arg::U32(u(n_seqs)),
        Arg::U32(u(d_inner)),
        Arg::U32(u(d_conv)),
        Arg::U64(place.slot_len),
        Arg::U64(place.conv_off),
    ];
    [
        elems("conv1d_prefill_out", (rows * d_inner) as u64, out_args),
        elems("conv1d_prefill_state", (n_seqs * d_inner) as u64, state_args),
    ]
}

/// One token per sequence: row `b` of xz continues `slots[b]`.
#[allow(clippy::too_many_arguments)]
pub fn conv1d_step(
    xz: u64,
    w: u64,
    bias: u64,
    states: u64,
    out: u64,
    slots: u64,
    batch: usize,
    d_inner: usize,
    d_conv: usize,
    place: StatePlace,
) -> Launch {
    let args = vec![
        Arg::Ptr(xz),
        Arg::Ptr(w),
        Arg::Ptr(bias),
        Arg::Ptr(states),
        Arg::Ptr(out),
        Arg::Ptr(slots),
        Arg::U32(u(batch)),
        Arg::U32(u(d_inner)),
        Arg::U32(u(d_conv)),
        Arg::U64(place.slot_len),
        Arg::U64(place.conv_off),
    ];
    elems("conv1d_step", (batch * d_inner) as u64, args)
}

/// Scan lanes per (sequence, channel) and states per lane for `d_state` (<= 256).
pub fn scan_shape(d_state: usize) -> (u32, u32) {
    if d_state <= 32 {
        (d_state.next_power_of_two() as u32, 1)
    } else {
        (32, d_state.div_ceil(32) as u32)
    }
}

/// Units of (sequence, channel) from which [`scan`] gives each lane four
/// times the states: with 16 lanes of one state each, a 2.8b step at batch
/// 256 is 21M threads whose short lives (a few dependent loads each) are
/// bound by how fast blocks start, not by the state traffic.
pub const SCAN_NARROW_UNITS: usize = 1 << 16;

/// [`scan_shape`] for `units` (sequence, channel) pairs: a quarter of the
/// lanes (at least 1), each with up to four times the states, from
/// [`SCAN_NARROW_UNITS`] units on.
pub fn scan_shape_for(d_state: usize, units: usize) -> (u32, u32) {
    let (group, npt) = scan_shape(d_state);
    if units < SCAN_NARROW_UNITS || npt > 1 {
        return (group, npt);
    }
    let group = (group / 4).max(1);
    (group, d_state.div_ceil(group as usize) as u32)
}

pub(crate) const SCAN_KERNELS: [&str; 8] = [
    "selective_scan_1",
    "selective_scan_2",
    "selective_scan_3",
    "selective_scan_4",
    "selective_scan_5",
    "selective_scan_6",
    "selective_scan_7",
    "selective_scan_8",
];

/// The device addresses a scan reads and writes.
#[derive(Clone, Copy, Debug)]
pub struct ScanPtrs {
    pub x: u64,
    pub dt: u64,
    pub dbc: u64,
    pub xz: u64,
    pub a: u64,
    pub d: u64,
    pub states: u64,
    pub y: u64,
}

/// A launch of a scan kernel family (plain, chunk ends, chunk outputs):
/// `units` (sequence or chunk, channel) pairs of `group` lanes each, in
/// blocks of 128 threads, by the member for `npt` states per lane.
fn scan_launch(family: &[&'static str; 8], (group, npt): (u32, u32), units: usize, args: Vec<Arg>) -> Launch {
    const BLOCK: usize = 128;
    let kernel = family[(npt as usize).clamp(1, 8) - 1];
    Launch { kernel, grid: u((units * group as usize).div_ceil(BLOCK)), block: BLOCK as u32, args }
}

/// Selective scan + D skip + SiLU(z) gate over `n_seqs` sequences (rows per
/// `batch.offsets`), from and into each slot's SSM state. `d_state <= 256`.
pub fn scan(
    p: ScanPtrs,
    batch: BatchPtrs,
    n_seqs: usize,
    cfg: &mamba_core::MambaConfig,
    place: StatePlace,
) -> Launch {
    scan_with_shape(p, batch, n_seqs, cfg, place, scan_shape_for(cfg.d_state, n_seqs * cfg.d_inner))
}

/// [`scan`] with `(lanes per unit, states per lane)` given: `lanes * states >= d_state`,
/// lanes a power of two <= 32, states <= 8.
pub fn scan_with_shape(
    p: ScanPtrs,
    batch: BatchPtrs,
    n_seqs: usize,
    cfg: &mamba_core::MambaConfig,
    place: StatePlace,
    shape: (u32, u32),
) -> Launch {
    let args = vec![
        Arg::Ptr(p.x),
        Arg::Ptr(p.dt),
        Arg::Ptr(p.dbc),
        Arg::Ptr(p.xz),
        Arg::Ptr(p.a),
        Arg::Ptr(p.d),
        Arg::Ptr(p.states),
        Arg::Ptr(p.y),
        Arg::Ptr(batch.offsets),
        Arg::Ptr(batch.slots),
        Arg::U32(u(n_seqs)),
        Arg::U32(u(cfg.d_inner)),
        Arg::U32(u(cfg.d_state)),
        Arg::U32(u(cfg.dt_rank)),
        Arg::U64(place.slot_len),
        Arg::U64(place.ssm_off),
        Arg::U32(shape.0),
    ];
    scan_launch(&SCAN_KERNELS, shape, n_seqs * cfg.d_inner, args)
}

pub(crate) const CHUNK_END: [&str; 8] = [
    "scan_chunk_end_1",
    "scan_chunk_end_2",
    "scan_chunk_end_3",
    "scan_chunk_end_4",
    "scan_chunk_end_5",
    "scan_chunk_end_6",
    "scan_chunk_end_7",
    "scan_chunk_end_8",
];
pub(crate) const CHUNK_Y: [&str; 8] = [
    "scan_chunk_y_1",
    "scan_chunk_y_2",
    "scan_chunk_y_3",
    "scan_chunk_y_4",
    "scan_chunk_y_5",
    "scan_chunk_y_6",
    "scan_chunk_y_7",
    "scan_chunk_y_8",
];

/// The chunks of a ragged batch cut every `chunk` tokens, as the chunked scan
/// reads them: `[starts (C) | ends (C) | seq_chunk0 (n_seqs + 1)]`; and C.
pub fn chunk_descriptor(offsets: &[usize], chunk: usize) -> (Vec<u32>, usize) {
    let chunk = chunk.max(1);
    let (mut starts, mut ends, mut first) = (vec![], vec![], vec![0u32]);
    for w in offsets.windows(2) {
        let mut t = w[0];
        while t < w[1] {
            starts.push(u(t));
            ends.push(u((t + chunk).min(w[1])));
            t += chunk;
        }
        first.push(u(starts.len()));
    }
    let n = starts.len();
    starts.extend(ends);
    starts.extend(first);
    (starts, n)
}

/// Scratch of the chunked scan: chunk states and chunk dt sums (device addresses).
#[derive(Clone, Copy, Debug)]
pub struct ChunkPtrs {
    /// The uploaded [`chunk_descriptor`].
    pub desc: u64,
    pub n_chunks: usize,
    /// `[n_chunks, d_inner, d_state]` f32.
    pub h: u64,
    /// `[n_chunks, d_inner]` f32.
    pub dt_sum: u64,
}

/// The chunked selective scan (see `kernels/scan.cu`): chunk end states in
/// parallel, the carry along each sequence's chunks (which also leaves the
/// final state in the slot), then y of every chunk from its entering state.
/// Same results as [`scan`] up to rounding, with `n_chunks` times the
/// parallelism along the sequence, for twice the scan arithmetic. `shape`
/// as for [`scan_with_shape`]; [`scan_shape_for`] of the `n_chunks *
/// d_inner` units is the one to use.
pub fn scan_chunked(
    p: ScanPtrs,
    slots: u64,
    n_seqs: usize,
    ch: ChunkPtrs,
    cfg: &mamba_core::MambaConfig,
    place: StatePlace,
    shape: (u32, u32),
) -> [Launch; 3] {
    let group = shape.0;
    let c = ch.n_chunks as u64;
    let (starts, ends, first) = (ch.desc, ch.desc + 4 * c, ch.desc + 8 * c);
    let (di, ns, r) = (Arg::U32(u(cfg.d_inner)), Arg::U32(u(cfg.d_state)), Arg::U32(u(cfg.dt_rank)));
    let end_args = vec![
        Arg::Ptr(p.x),
        Arg::Ptr(p.dt),
        Arg::Ptr(p.dbc),
        Arg::Ptr(p.a),
        Arg::Ptr(starts),
        Arg::Ptr(ends),
        Arg::Ptr(ch.h),
        Arg::Ptr(ch.dt_sum),
        Arg::U32(u(ch.n_chunks)),
        di,
        ns,
        r,
        Arg::U32(group),
    ];
    let carry_args = vec![
        Arg::Ptr(p.a),
        Arg::Ptr(p.states),
        Arg::Ptr(slots),
        Arg::Ptr(first),
        Arg::Ptr(ch.h),
        Arg::Ptr(ch.dt_sum),
        Arg::U32(u(n_seqs)),
        di,
        ns,
        Arg::U64(place.slot_len),
        Arg::U64(place.ssm_off),
    ];
    let y_args = vec![
        Arg::Ptr(p.x),
        Arg::Ptr(p.dt),
        Arg::Ptr(p.dbc),
        Arg::Ptr(p.xz),
        Arg::Ptr(p.a),
        Arg::Ptr(p.d),
        Arg::Ptr(p.y),
        Arg::Ptr(starts),
        Arg::Ptr(ends),
        Arg::Ptr(ch.h),
        Arg::U32(u(ch.n_chunks)),
        di,
        ns,
        r,
        Arg::U32(group),
    ];
    [
        scan_launch(&CHUNK_END, shape, ch.n_chunks * cfg.d_inner, end_args),
        elems("chunk_carry", (n_seqs * cfg.d_inner * cfg.d_state) as u64, carry_args),
        scan_launch(&CHUNK_Y, shape, ch.n_chunks * cfg.d_inner, y_args),
    ]
}

/// Whether a prefill scan should be chunked: the plain scan would keep too
/// few threads busy (fewer than `2^18`) and some sequence spans at least two chunks.
pub fn use_chunked_scan(cfg: &mamba_core::MambaConfig, offsets: &[usize], chunk: usize) -> bool {
    let n_seqs = offsets.len().saturating_sub(1);
    let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let threads = n_seqs * cfg.d_inner * scan_shape(cfg.d_state).0 as usize;
    chunk > 0 && longest >= 2 * chunk && threads < (1 << 18)
}

/// `out[i] = x[rows[i]]` for `n` rows of `width`.
pub fn gather_rows(x: u64, rows: u64, out: u64, n: usize, width: usize) -> Launch {
    let args = vec![Arg::Ptr(x), Arg::Ptr(rows), Arg::Ptr(out), Arg::U32(u(n)), Arg::U32(u(width))];
    elems("gather_rows", (n * width) as u64, args)
}

/// `ids[r] = argmax(logits[r, :n_valid])` for `rows` rows of `width`.
pub fn argmax(logits: u64, ids: u64, rows: usize, width: usize, n_valid: usize) -> Launch {
    let args =
        vec![Arg::Ptr(logits), Arg::Ptr(ids), Arg::U32(u(rows)), Arg::U32(u(width)), Arg::U32(u(n_valid))];
    // 1024 threads: a 50k vocabulary is 49 loads per thread, not 196 in a row.
    Launch { kernel: "argmax_rows", grid: u(rows), block: 1024, args }
}

/// Temperature / top-k / min-p / top-p sampling of `rows` rows (see
/// `kernels/sample.cu`): params `[rows, 4]` f32 (temperature, top_k, top_p,
/// min_p), u `[rows]` f64 uniforms, ids `[rows]` u32.
pub fn sample(
    logits: u64,
    params: u64,
    uniforms: u64,
    ids: u64,
    rows: usize,
    width: usize,
    n_valid: usize,
) -> Launch {
    let args = vec![
        Arg::Ptr(logits),
        Arg::Ptr(params),
        Arg::Ptr(uniforms),
        Arg::Ptr(ids),
        Arg::U32(u(rows)),
        Arg::U32(u(width)),
        Arg::U32(u(n_valid)),
    ];
    Launch { kernel: "sample_rows", grid: u(rows), block: 256, args }
}
