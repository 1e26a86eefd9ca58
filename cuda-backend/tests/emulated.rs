//! The CUDA kernels and the launch plans, run on the CPU: `emu/kernels.cpp`
//! compiles `kernels/*.cu` for the host with a small emulation of CUDA
//! (threads per block, barriers, warp shuffles), and an `Emu` backend runs
//! mamba-core's driver through [`mamba_cuda::plan`] exactly as the GPU
//! backend does, except that cuBLAS is replaced by a host product (with the
//! same half-precision split and combine kernels around it). Checks the
//! kernels' indexing, masks and reductions, and the plans' argument lists,
//! against the CPU backend and the float64 truth, with no GPU.
//!
//! Needs a C++20 compiler (`c++`); without one the tests print
//! `skipped: <reason>`.

mod common;

use std::ffi::{c_char, c_void, CString};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::{cpu_all_logits, HostModel};
use half::{bf16, f16};
use mamba_core::ops::{check_distinct, Layer, MambaOps, Ragged, ScanBufs};
use mamba_core::{driver, CoreError, DType, LayerWeights, Model, ScratchPlan, Tensor, WData};
use mamba_cuda::plan::{self, Arg, BatchPtrs, Launch, ScanPtrs, StatePlace};
use mamba_runtime::model::LoadedModel;
use mamba_tests::{assert_close, Truth, CASES};

type LaunchFn = unsafe extern "C" fn(*const c_char, u32, u32, *mut *mut c_void) -> i32;

struct EmuLib {
    _lib: libloading::Library,
    launch: LaunchFn,
}

/// Build and load the emulator once; `Err(reason)` when it cannot be built here.
fn emu() -> Result<&'static EmuLib, String> {
    static LIB: OnceLock<Result<EmuLib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("emu");
        let so = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("libmamba_emu_{}.so", std::process::id()));
        let out = Command::new("c++")
            .args(["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w"])
            .arg("-I")
            .arg(dir.join("shim"))
            .arg("-include")
            .arg(dir.join("cuda_emu.h"))
            .arg(dir.join("kernels.cpp"))
            .arg("-o")
            .arg(&so)
            .output()
            .map_err(|e| format!("no C++ compiler (c++): {e}"))?;
        if !out.status.success() {
            // A compiler that is there but fails is a real failure.
            panic!("emu/kernels.cpp does not compile:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        // SAFETY: our own library; its one entry point has the declared signature.
        unsafe {
            let lib = libloading::Library::new(&so).map_err(|e| e.to_string())?;
            let launch = *lib.get::<LaunchFn>(b"emu_launch").map_err(|e| e.to_string())?;
            Ok(EmuLib { _lib: lib, launch })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn run(l: &Launch) {
    let lib = emu().expect("emulator");
    let mut vals: Vec<[u8; 8]> = l
        .args
        .iter()
        .map(|a| {
            let mut b = [0u8; 8];
            match *a {
                Arg::Ptr(v) | Arg::U64(v) => b.copy_from_slice(&v.to_ne_bytes()),
                Arg::U32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
                Arg::F32(v) => b[..4].copy_from_slice(&v.to_ne_bytes()),
            }
            b
        })
        .collect();
    let mut params: Vec<*mut c_void> = vals.iter_mut().map(|v| v.as_mut_ptr() as *mut c_void).collect();
    let name = CString::new(l.kernel).unwrap();
    // SAFETY: every pointer argument of a plan is a live host buffer of the size the plan assumes.
    let rc = unsafe { (lib.launch)(name.as_ptr(), l.grid, l.block, params.as_mut_ptr()) };
    assert_eq!(rc, 0, "the emulator has no kernel `{}`", l.kernel);
}

fn p<T>(s: &[T]) -> u64 {
    s.as_ptr() as u64
}

/// A weight as the GPU backend holds it: matrices in their dtype, vectors in f32.
enum EmuData {
    F32(Vec<f32>),
    Half(Vec<u16>),
}

struct EmuWeight {
    dtype: DType,
    rows: usize,
    cols: usize,
    data: EmuData,
}

impl EmuWeight {
    fn stored(t: &Tensor<'_>) -> Self {
        let data = match t.data {
            WData::F32(s) => EmuData::F32(s.to_vec()),
            WData::F16(s) => EmuData::Half(s.iter().map(|v| v.to_bits()).collect()),
            WData::BF16(s) => EmuData::Half(s.iter().map(|v| v.to_bits()).collect()),
            // As `upload_stored`: Q8_0 goes up dequantized to f32.
            WData::Q8_0 { .. } => return Self::f32(t),
        };
        EmuWeight { dtype: t.dtype(), rows: t.rows, cols: t.cols, data }
    }
    fn f32(t: &Tensor<'_>) -> Self {
        let v = (0..t.len()).map(|i| t.data.get(i)).collect();
        EmuWeight { dtype: DType::F32, rows: t.rows, cols: t.cols, data: EmuData::F32(v) }
    }
    fn f32_transposed(t: &Tensor<'_>) -> Self {
        let v = mamba_cuda::transposed_f32(t);
        EmuWeight { dtype: DType::F32, rows: t.cols, cols: t.rows, data: EmuData::F32(v) }
    }
    fn ptr(&self) -> u64 {
        match &self.data {
            EmuData::F32(v) => p(v),
            EmuData::Half(v) => p(v),
        }
    }
    fn get(&self, i: usize) -> f32 {
        match &self.data {
            EmuData::F32(v) => v[i],
            EmuData::Half(v) if self.dtype == DType::F16 => f16::from_bits(v[i]).to_f32(),
            EmuData::Half(v) => bf16::from_bits(v[i]).to_f32(),
        }
    }
}

fn upload(
    m: &Model<'_, Tensor<'_>>,
) -> (Vec<LayerWeights<EmuWeight>>, EmuWeight, EmuWeight, Option<EmuWeight>) {
    let opt = |w: &Option<Tensor<'_>>| w.as_ref().map(EmuWeight::f32);
    let layers = m
        .layers
        .iter()
        .map(|l| LayerWeights {
            norm: EmuWeight::f32(&l.norm),
            in_proj: EmuWeight::stored(&l.in_proj),
            in_proj_bias: opt(&l.in_proj_bias),
            conv_w: EmuWeight::f32(&l.conv_w),
            conv_b: opt(&l.conv_b),
            x_proj: EmuWeight::stored(&l.x_proj),
            // Transposed, as DeviceModel::upload holds it.
            dt_proj: EmuWeight::f32_transposed(&l.dt_proj),
            dt_proj_t: None,
            dt_bias: EmuWeight::f32(&l.dt_bias),
            a: EmuWeight::f32(&l.a),
            d: EmuWeight::f32(&l.d),
            out_proj: EmuWeight::stored(&l.out_proj),
            out_proj_bias: opt(&l.out_proj_bias),
        })
        .collect();
    let head = m.lm_head.as_ref().map(EmuWeight::stored);
    (layers, EmuWeight::stored(&m.embedding), EmuWeight::f32(&m.norm_f), head)
}

/// The GPU backend's operations with the emulator for a device.
struct Emu;

thread_local! {
    /// Chunk length of the emulated prefill scan (0: the plain scan), per test thread.
    static SCAN_CHUNK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Scans take the narrow shape (a quarter of the lanes, more states each)
    /// at any size, as large batches do on the device.
    static SCAN_NARROW: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn bias_ptr(b: Option<&EmuWeight>) -> u64 {
    b.map_or(0, EmuWeight::ptr)
}

fn check_slots(cfg: &mamba_core::MambaConfig, slots: &[usize], states: &[f32]) -> Result<(), CoreError> {
    let n = cfg.state_layout().slots_in(states.len());
    if let Some(&slot) = slots.iter().find(|&&s| s >= n) {
        return Err(CoreError::SlotOutOfRange { slot, slots: n });
    }
    check_distinct(slots)
}

impl MambaOps for Emu {
    type Buf = [f32];
    type Weight = EmuWeight;
    type Error = CoreError;

    fn embed(&self, table: &EmuWeight, tokens: &[u32], out: &mut [f32]) -> Result<(), CoreError> {
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            return Err(CoreError::TokenOutOfRange { token, vocab: table.rows });
        }
        assert!(out.len() >= tokens.len() * table.cols);
        run(&plan::embed(table.dtype, table.ptr(), p(tokens), p(out), tokens.len(), table.cols));
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &[f32],
        rows: usize,
        w: &EmuWeight,
        eps: f32,
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        let d = w.rows * w.cols;
        assert!(x.len() >= rows * d && out.len() >= rows * d);
        run(&plan::rms_norm(p(x), w.ptr(), p(out), rows, d, eps));
        Ok(())
    }

    fn add_assign(&self, acc: &mut [f32], x: &[f32], len: usize) -> Result<(), CoreError> {
        assert!(acc.len() >= len && x.len() >= len);
        run(&plan::add_assign(p(acc), p(x), len));
        Ok(())
    }

    fn add_rms_norm(
        &self,
        acc: &mut [f32],
        x: &mut [f32],
        rows: usize,
        d_model: usize,
        w: &EmuWeight,
        eps: f32,
    ) -> Result<(), CoreError> {
        assert!(acc.len() >= rows * d_model && x.len() >= rows * d_model && w.rows * w.cols == d_model);
        run(&plan::add_rms_norm(p(acc), p(x), w.ptr(), rows, d_model, eps));
        Ok(())
    }

    fn linear(
        &self,
        x: &[f32],
        rows: usize,
        w: &EmuWeight,
        bias: Option<&EmuWeight>,
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        let (n_out, k) = (w.rows, w.cols);
        assert!(x.len() >= rows * k && out.len() >= rows * n_out);
        if rows == 0 {
            return Ok(());
        }
        if rows <= plan::GEMV_MAX_ROWS {
            run(&plan::gemv(w.dtype, w.ptr(), p(x), bias_ptr(bias), p(out), rows, n_out, k));
            return Ok(());
        }
        // The cuBLAS path: split (half weights), a product on the host in
        // cuBLAS's layout (c[col, n_out] for col < parts*rows), combine.
        let parts = if w.dtype == DType::F32 { 1 } else { 2 };
        let cols: Vec<f32> = if w.dtype == DType::F32 {
            x[..rows * k].to_vec()
        } else {
            let mut h = vec![0u16; parts * rows * k];
            run(&plan::split(w.dtype, p(x), p(&h), rows * k, parts as u32));
            let wide = |b: u16| {
                if w.dtype == DType::F16 {
                    f16::from_bits(b).to_f32()
                } else {
                    bf16::from_bits(b).to_f32()
                }
            };
            h.iter_mut().map(|b| wide(*b)).collect()
        };
        let mut c = vec![0f32; parts * rows * n_out];
        for col in 0..parts * rows {
            for o in 0..n_out {
                let s: f64 = (0..k).map(|i| w.get(o * k + i) as f64 * cols[col * k + i] as f64).sum();
                c[col * n_out + o] = s as f32;
            }
        }
        run(&plan::combine(p(&c), p(out), bias_ptr(bias), rows, n_out, parts as u32));
        Ok(())
    }

    fn dt_proj_softplus(
        &self,
        layer: Layer<'_, EmuWeight>,
        dbc: &[f32],
        rows: usize,
        dt: &mut [f32],
    ) -> Result<(), CoreError> {
        let (cfg, lw) = (layer.cfg, layer.w);
        let xp = cfg.x_proj_dim();
        assert!(dbc.len() >= rows * xp && dt.len() >= rows * cfg.d_inner);
        let l = plan::dt_proj_softplus(
            p(dbc),
            lw.dt_proj.ptr(),
            lw.dt_bias.ptr(),
            p(dt),
            rows,
            cfg.d_inner,
            cfg.dt_rank,
            xp,
        );
        run(&l);
        Ok(())
    }

    fn conv1d_prefill(
        &self,
        layer: Layer<'_, EmuWeight>,
        batch: Ragged<'_>,
        xz: &[f32],
        states: &mut [f32],
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        let rows = *batch.offsets.last().unwrap_or(&0);
        batch.validate(rows)?;
        check_slots(layer.cfg, batch.slots, states)?;
        let cfg = layer.cfg;
        assert!(xz.len() >= rows * 2 * cfg.d_inner && out.len() >= rows * cfg.d_inner);
        let desc = plan::batch_descriptor(batch.offsets, batch.slots);
        let ptrs = BatchPtrs::at(p(&desc), batch.len());
        let place = StatePlace::of(cfg, layer.index);
        let (w, b) = (layer.w.conv_w.ptr(), bias_ptr(layer.w.conv_b.as_ref()));
        for l in plan::conv1d_prefill(
            p(xz),
            w,
            b,
            p(states),
            p(out),
            ptrs,
            rows,
            batch.len(),
            cfg.d_inner,
            cfg.d_conv,
            place,
        ) {
            run(&l);
        }
        Ok(())
    }

    fn conv1d_step(
        &self,
        layer: Layer<'_, EmuWeight>,
        slots: &[usize],
        xz: &[f32],
        states: &mut [f32],
        out: &mut [f32],
    ) -> Result<(), CoreError> {
        check_slots(layer.cfg, slots, states)?;
        let cfg = layer.cfg;
        let offsets: Vec<usize> = (0..=slots.len()).collect();
        let desc = plan::batch_descriptor(&offsets, slots);
        let ptrs = BatchPtrs::at(p(&desc), slots.len());
        let place = StatePlace::of(cfg, layer.index);
        let (w, b) = (layer.w.conv_w.ptr(), bias_ptr(layer.w.conv_b.as_ref()));
        run(&plan::conv1d_step(
            p(xz),
            w,
            b,
            p(states),
            p(out),
            ptrs.slots,
            slots.len(),
            cfg.d_inner,
            cfg.d_conv,
            place,
        ));
        Ok(())
    }

    fn scan_prefill(
        &self,
        layer: Layer<'_, EmuWeight>,
        batch: Ragged<'_>,
        act: ScanBufs<'_, [f32]>,
        states: &mut [f32],
        y: &mut [f32],
    ) -> Result<(), CoreError> {
        let rows = *batch.offsets.last().unwrap_or(&0);
        batch.validate(rows)?;
        check_slots(layer.cfg, batch.slots, states)?;
        let desc = plan::batch_descriptor(batch.offsets, batch.slots);
        let chunk = SCAN_CHUNK.with(|c| c.get());
        if chunk > 0 {
            let cfg = layer.cfg;
            let (cdesc, n_chunks) = plan::chunk_descriptor(batch.offsets, chunk);
            let h = vec![f32::NAN; n_chunks * cfg.d_inner * cfg.d_state];
            let dt_sum = vec![f32::NAN; n_chunks * cfg.d_inner];
            let ch = plan::ChunkPtrs { desc: p(&cdesc), n_chunks, h: p(&h), dt_sum: p(&dt_sum) };
            let ptrs = scan_ptrs(layer, act, states, y);
            let slots = BatchPtrs::at(p(&desc), batch.len()).slots;
            let units = if SCAN_NARROW.with(|c| c.get()) { usize::MAX } else { n_chunks * cfg.d_inner };
            let shape = plan::scan_shape_for(cfg.d_state, units);
            for l in
                plan::scan_chunked(ptrs, slots, batch.len(), ch, cfg, StatePlace::of(cfg, layer.index), shape)
            {
                run(&l);
            }
            return Ok(());
        }
        scan(layer, &desc, batch.len(), act, states, y);
        Ok(())
    }

    fn scan_step(
        &self,
        layer: Layer<'_, EmuWeight>,
        slots: &[usize],
        act: ScanBufs<'_, [f32]>,
        states: &mut [f32],
        y: &mut [f32],
    ) -> Result<(), CoreError> {
        check_slots(layer.cfg, slots, states)?;
        let offsets: Vec<usize> = (0..=slots.len()).collect();
        let desc = plan::batch_descriptor(&offsets, slots);
        scan(layer, &desc, slots.len(), act, states, y);
        Ok(())
    }

    fn gather_rows(&self, x: &[f32], width: usize, rows: &[usize], out: &mut [f32]) -> Result<(), CoreError> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        assert!(rows.iter().all(|&r| (r + 1) * width <= x.len()) && out.len() >= rows.len() * width);
        run(&plan::gather_rows(p(x), p(&idx), p(out), rows.len(), width));
        Ok(())
    }
}

fn scan_ptrs(
    layer: Layer<'_, EmuWeight>,
    act: ScanBufs<'_, [f32]>,
    states: &mut [f32],
    y: &mut [f32],
) -> ScanPtrs {
    let lw = layer.w;
    ScanPtrs {
        x: p(act.x),
        dt: p(act.dt),
        dbc: p(act.dbc),
        xz: p(act.xz),
        a: lw.a.ptr(),
        d: lw.d.ptr(),
        states: p(states),
        y: p(y),
    }
}

fn scan(
    layer: Layer<'_, EmuWeight>,
    desc: &[u32],
    n_seqs: usize,
    act: ScanBufs<'_, [f32]>,
    states: &mut [f32],
    y: &mut [f32],
) {
    let cfg = layer.cfg;
    let ptrs = scan_ptrs(layer, act, states, y);
    let units = if SCAN_NARROW.with(|c| c.get()) { usize::MAX } else { n_seqs * cfg.d_inner };
    let shape = plan::scan_shape_for(cfg.d_state, units);
    let (batch, place) = (BatchPtrs::at(p(desc), n_seqs), StatePlace::of(cfg, layer.index));
    run(&plan::scan_with_shape(ptrs, batch, n_seqs, cfg, place, shape));
}

/// `None` after printing why, when the emulator cannot be built here.
fn ready() -> bool {
    match emu() {
        Ok(_) => true,
        Err(why) => {
            println!("skipped: {why}");
            false
        }
    }
}

/// Emulated logits of every position of one prompt, and the final state.
fn emu_prefill(
    m: &Model<'_, EmuWeight>,
    seqs: &[&[u32]],
    slots: &[usize],
    n_slots: usize,
) -> (Vec<f32>, Vec<f32>) {
    let cfg = m.cfg;
    let tokens: Vec<u32> = seqs.concat();
    let mut offsets = vec![0];
    for s in seqs {
        offsets.push(offsets.last().unwrap() + s.len());
    }
    let plan = ScratchPlan::new(&cfg, tokens.len(), tokens.len());
    let mut buf = vec![0.0f32; plan.total()];
    let mut sc = plan.split(&mut buf).unwrap();
    let mut states = vec![0.0f32; n_slots * cfg.state_layout().slot_len()];
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let batch = Ragged { offsets: &offsets, slots };
    driver::prefill(&Emu, m, &tokens, batch, &rows, &mut states, &mut sc).unwrap();
    (sc.logits[..tokens.len() * cfg.vocab_size].to_vec(), states)
}

fn emu_model<'a>(
    cfg: mamba_core::MambaConfig,
    parts: &'a (Vec<LayerWeights<EmuWeight>>, EmuWeight, EmuWeight, Option<EmuWeight>),
) -> Model<'a, EmuWeight> {
    // Model holds weights by value: rebuild cheap views by re-pointing clones is not
    // possible for owned data, so the emulated model borrows through these copies.
    Model {
        cfg,
        embedding: clone_w(&parts.1),
        layers: &parts.0,
        norm_f: clone_w(&parts.2),
        lm_head: parts.3.as_ref().map(clone_w),
    }
}

fn clone_w(w: &EmuWeight) -> EmuWeight {
    let data = match &w.data {
        EmuData::F32(v) => EmuData::F32(v.clone()),
        EmuData::Half(v) => EmuData::Half(v.clone()),
    };
    EmuWeight { dtype: w.dtype, rows: w.rows, cols: w.cols, data }
}

fn tol(t: &Truth) -> f64 {
    if t.storage_dtype == "f32" {
        1e-3
    } else {
        3e-2
    }
}

#[test]
fn emulated_ragged_prefill_matches_transformers_and_the_cpu() {
    if !ready() {
        return;
    }
    for case in CASES {
        let t = Truth::load(case);
        let lm = LoadedModel::load(t.dir_str()).unwrap();
        let view = lm.view().unwrap();
        let m = view.model();
        let parts = upload(&m);
        let em = emu_model(m.cfg, &parts);
        // Short prompts only: the emulator runs a host thread per CUDA thread.
        let picked: Vec<usize> = (0..t.prompts.len()).filter(|&i| t.prompts[i].ids.len() <= 40).collect();
        let seqs: Vec<&[u32]> = picked.iter().map(|&i| t.prompts[i].ids.as_slice()).collect();
        let slots: Vec<usize> = (0..seqs.len()).rev().collect();
        let (logits, states) = emu_prefill(&em, &seqs, &slots, seqs.len());
        let v = m.cfg.vocab_size;
        let mut row = 0;
        for (j, &i) in picked.iter().enumerate() {
            let pr = &t.prompts[i];
            let n = pr.ids.len();
            let what = format!("{case} prompt {i}: emulated ragged prefill vs transformers");
            let worst =
                assert_close(&what, &logits[row * v..(row + n) * v], &t.read_f64(&pr.logits), tol(&t));
            let want: Vec<f64> = cpu_all_logits(&m, &pr.ids).into_iter().map(f64::from).collect();
            let what = format!("{case} prompt {i}: emulated vs CPU backend");
            let cpu_tol = if t.storage_dtype == "f32" { 1e-4 } else { 1e-3 };
            assert_close(&what, &logits[row * v..(row + n) * v], &want, cpu_tol);
            let layout = m.cfg.state_layout();
            let ssm = t.read_f64(&pr.ssm_state);
            for l in 0..m.cfg.n_layer {
                let o = layout.ssm_offset(slots[j], l);
                let sl = layout.ssm_len();
                let what = format!("{case} prompt {i} layer {l}: emulated ssm state");
                assert_close(&what, &states[o..o + sl], &ssm[l * sl..(l + 1) * sl], 1e-3);
            }
            println!("{case} prompt {i}: emulated max |logit diff| vs truth {worst:.2e}");
            row += n;
        }
    }
}

#[test]
fn emulated_steps_match_transformers_with_device_argmax() {
    if !ready() {
        return;
    }
    for case in CASES {
        let t = Truth::load(case);
        let lm = LoadedModel::load(t.dir_str()).unwrap();
        let view = lm.view().unwrap();
        let m = view.model();
        let parts = upload(&m);
        let em = emu_model(m.cfg, &parts);
        let cfg = m.cfg;
        let v = cfg.vocab_size;
        // All short prompts stepped together, each in its own slot (reversed).
        let picked: Vec<usize> = (0..t.prompts.len()).filter(|&i| t.prompts[i].ids.len() <= 20).collect();
        let n = picked.len();
        let slots: Vec<usize> = (0..n).rev().collect();
        let mut states = vec![0.0f32; n * cfg.state_layout().slot_len()];
        let plan_ = ScratchPlan::new(&cfg, n, n);
        let mut buf = vec![0.0f32; plan_.total()];
        let longest = picked.iter().map(|&i| t.prompts[i].ids.len()).max().unwrap();
        let truths: Vec<Vec<f64>> = picked.iter().map(|&i| t.read_f64(&t.prompts[i].logits)).collect();
        for pos in 0..longest {
            let live: Vec<usize> = (0..n).filter(|&j| pos < t.prompts[picked[j]].ids.len()).collect();
            let toks: Vec<u32> = live.iter().map(|&j| t.prompts[picked[j]].ids[pos]).collect();
            let sl: Vec<usize> = live.iter().map(|&j| slots[j]).collect();
            let mut sc = plan_.split(&mut buf).unwrap();
            driver::step(&Emu, &m_of(&em), &toks, &sl, &mut states, &mut sc).unwrap();
            for (r, &j) in live.iter().enumerate() {
                let what = format!("{case} prompt {} position {pos}: emulated step", picked[j]);
                assert_close(
                    &what,
                    &sc.logits[r * v..(r + 1) * v],
                    &truths[j][pos * v..(pos + 1) * v],
                    tol(&t),
                );
            }
            // The device argmax over the real vocabulary.
            let mut ids = vec![0u32; live.len()];
            run(&plan::argmax(p(sc.logits), p(&ids), live.len(), v, lm.sample_vocab()));
            for (r, id) in ids.iter_mut().enumerate() {
                let row = &sc.logits[r * v..r * v + lm.sample_vocab()];
                assert_eq!(*id as usize, mamba_runtime::sampling::argmax(row), "{case}: argmax of row {r}");
                *id = 0;
            }
        }
    }
}

fn m_of<'a>(m: &'a Model<'a, EmuWeight>) -> Model<'a, EmuWeight> {
    Model {
        cfg: m.cfg,
        embedding: clone_w(&m.embedding),
        layers: m.layers,
        norm_f: clone_w(&m.norm_f),
        lm_head: m.lm_head.as_ref().map(clone_w),
    }
}

#[test]
fn emulated_state_sizes_and_the_cublas_layout_match_the_cpu() {
    if !ready() {
        return;
    }
    // d_state 1/5 (narrow lane groups), 16, 40 and 256 (several states per lane);
    // 12 tokens take the cuBLAS layout (split + host product + combine).
    let ids: Vec<u32> = (0..12u32).map(|i| (i * 37 + 11) % 97).collect();
    for (d_state, d_conv, bias) in
        [(1, 4, true), (5, 2, false), (16, 4, true), (40, 3, true), (256, 4, false)]
    {
        let hm = HostModel::new(d_state, d_conv, bias);
        let (layers, emb, norm_f) = hm.model();
        let m = Model { cfg: hm.cfg, embedding: emb, layers: &layers, norm_f, lm_head: None };
        let want: Vec<f64> = cpu_all_logits(&m, &ids).into_iter().map(f64::from).collect();
        let parts = upload(&m);
        let em = emu_model(m.cfg, &parts);
        let (got, _) = emu_prefill(&em, &[&ids], &[0], 1);
        assert_close(&format!("d_state {d_state}, d_conv {d_conv}: emulated vs CPU"), &got, &want, 1e-4);
    }
    // Half weights through the split path: bf16 weights of a random model.
    let hm = HostModel::new(16, 4, true);
    let (layers, emb, norm_f) = hm.model();
    let bits: Vec<Vec<bf16>> = layers
        .iter()
        .flat_map(|l| [&l.in_proj, &l.x_proj, &l.out_proj])
        .map(|t| (0..t.len()).map(|i| bf16::from_f32(t.data.get(i))).collect())
        .collect();
    let half_layers: Vec<LayerWeights<Tensor<'_>>> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let t = |j: usize, src: &Tensor<'_>| {
                Tensor::new(WData::BF16(&bits[3 * i + j]), src.rows, src.cols, "w").unwrap()
            };
            LayerWeights {
                in_proj: t(0, &l.in_proj),
                x_proj: t(1, &l.x_proj),
                out_proj: t(2, &l.out_proj),
                ..*l
            }
        })
        .collect();
    let m = Model { cfg: hm.cfg, embedding: emb, layers: &half_layers, norm_f, lm_head: None };
    let want: Vec<f64> = cpu_all_logits(&m, &ids).into_iter().map(f64::from).collect();
    let parts = upload(&m);
    let em = emu_model(m.cfg, &parts);
    let (got, _) = emu_prefill(&em, &[&ids], &[0], 1);
    let worst = assert_close("bf16 weights, split activations: emulated vs CPU", &got, &want, 1e-3);
    println!("bf16 split path: max |diff| vs CPU {worst:.2e}");
}

#[test]
fn emulated_device_sampling_picks_what_the_cpu_sampler_picks() {
    use mamba_runtime::sampling::{Rng, Sampler, SamplingParams};
    if !ready() {
        return;
    }
    let (width, n_valid) = (700usize, 650usize);
    let mut rng = Rng::new(7);
    let settings = [
        (0.0f32, 0usize, 1.0f32, 0.0f32),
        (0.8, 40, 0.95, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.3, 5, 1.0, 0.0),
        (0.7, 0, 1.0, 0.05),
        (1.0, 300, 0.5, 0.0),
        (0.5, 1, 1.0, 0.0),
    ];
    let rows = 24;
    let logits: Vec<f32> = (0..rows * width).map(|_| (rng.next_f64() * 8.0 - 4.0) as f32).collect();
    let mut params = vec![];
    let mut u = vec![];
    let mut want = vec![];
    for r in 0..rows {
        let (temperature, top_k, top_p, min_p) = settings[r % settings.len()];
        let seed = 1000 + r as u64;
        let sp = SamplingParams { temperature, top_k, top_p, min_p, seed, ..SamplingParams::default() };
        want.push(Sampler::new(sp).sample(&logits[r * width..(r + 1) * width], n_valid));
        u.push(Rng::new(seed).next_f64());
        params.extend([temperature, top_k as f32, top_p, min_p]);
    }
    let ids = vec![u32::MAX; rows];
    run(&plan::sample(p(&logits), p(&params), p(&u), p(&ids), rows, width, n_valid));
    assert_eq!(ids, want, "device sampling vs the CPU sampler with the same uniforms");
}

#[test]
fn emulated_chunked_scan_equals_the_plain_scan() {
    if !ready() {
        return;
    }
    // Ragged sequences of 1..=11 tokens cut every 4 (one sequence shorter than a chunk),
    // from non-zero slot states (a first prefill), d_state 5 and 40.
    for (d_state, d_conv) in [(5, 2), (40, 4)] {
        let hm = HostModel::new(d_state, d_conv, true);
        let (layers, emb, norm_f) = hm.model();
        let m = Model { cfg: hm.cfg, embedding: emb, layers: &layers, norm_f, lm_head: None };
        let parts = upload(&m);
        let em = emu_model(m.cfg, &parts);
        let seqs: Vec<Vec<u32>> = [11usize, 1, 6, 9]
            .iter()
            .map(|&n| (0..n as u32).map(|i| (i * 13 + n as u32) % 97).collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let slots = [2usize, 0, 3, 1];
        let run_twice = |chunk: usize| {
            SCAN_CHUNK.with(|c| c.set(chunk));
            let out = emu_prefill_twice(&em, &refs, &slots, 4);
            SCAN_CHUNK.with(|c| c.set(0));
            out
        };
        let (plain_logits, plain_states) = run_twice(0);
        let (chunk_logits, chunk_states) = run_twice(4);
        let want: Vec<f64> = plain_logits.iter().map(|&v| v as f64).collect();
        assert_close(&format!("d_state {d_state}: chunked vs plain scan logits"), &chunk_logits, &want, 1e-4);
        let want: Vec<f64> = plain_states.iter().map(|&v| v as f64).collect();
        assert_close(
            &format!("d_state {d_state}: chunked vs plain final states"),
            &chunk_states,
            &want,
            1e-4,
        );
    }
}

#[test]
fn emulated_narrow_scan_equals_the_default_scan() {
    if !ready() {
        return;
    }
    // d_state 5 -> 2 lanes x 3 states, 16 -> 4 x 4; 40 keeps 32 x 2. Ragged
    // prefills twice (the second from the first's states), plain and chunked.
    for d_state in [5usize, 16, 40] {
        assert!(plan::scan_shape_for(d_state, usize::MAX).1 <= 8);
        let hm = HostModel::new(d_state, 4, true);
        let (layers, emb, norm_f) = hm.model();
        let m = Model { cfg: hm.cfg, embedding: emb, layers: &layers, norm_f, lm_head: None };
        let parts = upload(&m);
        let em = emu_model(m.cfg, &parts);
        let seqs: Vec<Vec<u32>> = [7usize, 1, 4]
            .iter()
            .map(|&n| (0..n as u32).map(|i| (i * 29 + n as u32) % 97).collect())
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let run_with = |narrow: bool, chunk: usize| {
            SCAN_NARROW.with(|c| c.set(narrow));
            SCAN_CHUNK.with(|c| c.set(chunk));
            let out = emu_prefill_twice(&em, &refs, &[1, 2, 0], 3);
            SCAN_NARROW.with(|c| c.set(false));
            SCAN_CHUNK.with(|c| c.set(0));
            out
        };
        let (logits, states) = run_with(false, 0);
        // The plain scan, then the chunked scan (chunks of 2 tokens).
        for chunk in [0, 2] {
            let (n_logits, n_states) = run_with(true, chunk);
            let what = format!("d_state {d_state}, chunk {chunk}: narrow vs default scan");
            let want: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
            assert_close(&format!("{what} logits"), &n_logits, &want, 1e-4);
            let want: Vec<f64> = states.iter().map(|&v| v as f64).collect();
            assert_close(&format!("{what} final states"), &n_states, &want, 1e-4);
        }
    }
}

/// Two ragged prefills in a row (the second continues the first's states).
fn emu_prefill_twice(
    m: &Model<'_, EmuWeight>,
    seqs: &[&[u32]],
    slots: &[usize],
    n_slots: usize,
) -> (Vec<f32>, Vec<f32>) {
    let cfg = m.cfg;
    let tokens: Vec<u32> = seqs.concat();
    let mut offsets = vec![0];
    for s in seqs {
        offsets.push(offsets.last().unwrap() + s.len());
    }
    let plan_ = ScratchPlan::new(&cfg, tokens.len(), tokens.len());
    let mut buf = vec![0.0f32; plan_.total()];
    let mut states = vec![0.0f32; n_slots * cfg.state_layout().slot_len()];
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let batch = Ragged { offsets: &offsets, slots };
    for _ in 0..2 {
        let mut sc = plan_.split(&mut buf).unwrap();
        driver::prefill(&Emu, m, &tokens, batch, &rows, &mut states, &mut sc).unwrap();
    }
    let logits = plan_.split(&mut buf).unwrap().logits[..tokens.len() * cfg.vocab_size].to_vec();
    (logits, states)
}

/// Values uniform in [-1, 1) from `seed` (a 64-bit LCG's top bits).
fn uniforms(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[test]
fn emulated_decode_kernel_splits_k_between_warps() {
    if !ready() {
        return;
    }
    // Every block layout (split 1, 2, 4, 8), every row count, odd and
    // vector-friendly k, with and without bias.
    let mut r = uniforms(5);
    // k 2056 and 9000 run the unrolled loop and its tail; f32 and bf16 weights.
    for (n_out, k, dtype) in [
        (13usize, 2056usize, DType::BF16),
        (9, 37, DType::BF16),
        (20, 64, DType::BF16),
        (5, 9000, DType::BF16),
        (11, 2056, DType::F32),
    ] {
        let w: Vec<f32> = (0..n_out * k).map(|_| r()).collect();
        let wb: Vec<u16> = w.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        // The weights as the kernel reads them.
        let wv: Vec<f32> = if dtype == DType::F32 {
            w.clone()
        } else {
            wb.iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
        };
        let wp = if dtype == DType::F32 { p(&w) } else { p(&wb) };
        let bias: Vec<f32> = (0..n_out).map(|_| r()).collect();
        for rows in [1usize, 3, 8] {
            let x: Vec<f32> = (0..rows * k).map(|_| r()).collect();
            // glibc's malloc aligns to 16 bytes, so the vector path runs where k allows.
            assert!(p(&x).is_multiple_of(16) && wp.is_multiple_of(16));
            for split in [1u32, 2, 4, 8] {
                for with_bias in [false, true] {
                    let out = vec![f32::NAN; rows * n_out];
                    let b = if with_bias { p(&bias) } else { 0 };
                    run(&plan::gemv_with_split(dtype, wp, p(&x), b, p(&out), rows, n_out, k, split));
                    let want: Vec<f64> = (0..rows * n_out)
                        .map(|i| {
                            let (t, o) = (i / n_out, i % n_out);
                            let dot: f64 = (0..k).map(|j| wv[o * k + j] as f64 * x[t * k + j] as f64).sum();
                            dot + if with_bias { bias[o] as f64 } else { 0.0 }
                        })
                        .collect();
                    let what =
                        format!("gemv {dtype:?} {n_out}x{k}, {rows} rows, split {split}, bias {with_bias}");
                    assert_close(&what, &out, &want, 1e-4);
                }
            }
        }
    }
}

#[test]
fn emulated_dt_proj_fills_partial_tiles_and_long_ranks() {
    if !ready() {
        return;
    }
    let mut r = uniforms(11);
    // Channel counts past a block of 32, row counts past a tile of 8, ranks past
    // the 256 staged per pass and fewer than the 8 warps.
    for (rows, d_inner, dt_rank, d_state) in
        [(1usize, 200usize, 33usize, 4usize), (9, 130, 70, 16), (17, 64, 1, 1), (3, 40, 300, 2)]
    {
        let xp = dt_rank + 2 * d_state;
        let dbc: Vec<f32> = (0..rows * xp).map(|_| r() * 3.0).collect();
        let w: Vec<f32> = (0..d_inner * dt_rank).map(|_| r()).collect();
        let bias: Vec<f32> = (0..d_inner).map(|_| r() * 4.0).collect();
        let t = Tensor::new(WData::F32(&w), d_inner, dt_rank, "dt_proj").unwrap();
        let wt = mamba_cuda::transposed_f32(&t);
        // One row more than asked for, which must stay untouched.
        let dt = vec![f32::NAN; (rows + 1) * d_inner];
        run(&plan::dt_proj_softplus(p(&dbc), p(&wt), p(&bias), p(&dt), rows, d_inner, dt_rank, xp));
        let want: Vec<f64> = (0..rows * d_inner)
            .map(|i| {
                let (t, d) = (i / d_inner, i % d_inner);
                let v: f64 =
                    (0..dt_rank).map(|j| w[d * dt_rank + j] as f64 * dbc[t * xp + j] as f64).sum::<f64>()
                        + bias[d] as f64;
                if v > 20.0 {
                    v
                } else {
                    v.exp().ln_1p()
                }
            })
            .collect();
        assert_close(
            &format!("dt_proj {rows}x{d_inner}, rank {dt_rank}"),
            &dt[..rows * d_inner],
            &want,
            1e-5,
        );
        assert!(dt[rows * d_inner..].iter().all(|v| v.is_nan()), "dt_proj wrote past its rows");
    }
}

#[test]
fn emulated_add_rms_norm_equals_add_then_norm_bit_for_bit() {
    if !ready() {
        return;
    }
    let mut r = uniforms(3);
    // 1 row (1024-thread blocks) and 70 rows (256), widths off the block size.
    for (rows, d) in [(1usize, 2600usize), (70, 300)] {
        let acc: Vec<f32> = (0..rows * d).map(|_| r() * 5.0).collect();
        let x: Vec<f32> = (0..rows * d).map(|_| r()).collect();
        let w: Vec<f32> = (0..d).map(|_| r() + 1.5).collect();
        let (a1, x1) = (acc.clone(), x.clone());
        run(&plan::add_rms_norm(p(&a1), p(&x1), p(&w), rows, d, 1e-5));
        let (a2, x2) = (acc.clone(), x.clone());
        run(&plan::add_assign(p(&a2), p(&x2), rows * d));
        run(&plan::rms_norm(p(&a2), p(&w), p(&x2), rows, d, 1e-5));
        assert!(a1.iter().zip(&a2).all(|(u, v)| u.to_bits() == v.to_bits()), "{rows} rows: residual");
        assert!(x1.iter().zip(&x2).all(|(u, v)| u.to_bits() == v.to_bits()), "{rows} rows: normed");
        // And the norm itself, in f64.
        for t in 0..rows {
            let row = &a1[t * d..(t + 1) * d];
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            let want: Vec<f64> = (0..d).map(|i| row[i] as f64 * inv * w[i] as f64).collect();
            assert_close(
                &format!("{rows} rows, row {t}: add_rms_norm"),
                &x1[t * d..(t + 1) * d],
                &want,
                1e-5,
            );
        }
    }
}
