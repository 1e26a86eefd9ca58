//! `mamba-core` on a Cortex-M4F (QEMU `mps2-an386`): a real model's weights
//! in flash, the recurrent state and the scratch in static RAM, no allocator.
//!
//! Prefills the prompt, generates `GEN_TOKENS` tokens greedily and prints
//! over semihosting:
//!
//! ```text
//! tokens: 5,17,3,...
//! instructions_per_token: N      (decode: one `driver::step` + argmax)
//! stack_bytes_used: N            (high-water mark of the painted stack)
//! prompt_ids: 1,2,3
//! prefill_instructions: N        (the whole prompt + the first argmax)
//! ```
//!
//! then exits through semihosting with status 0 (1 on any error or panic).
#![no_std]
#![no_main]

use core::fmt::Display;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprint, hprintln};
use mamba_core::{
    driver, kernels, CpuBackend, DType, LayerWeights, Model, Ragged, ScratchPlan, Tensor, WData,
};

/// Where a tensor lies in the weight blob.
#[derive(Clone, Copy)]
struct TensorRef {
    offset: usize,
    rows: usize,
    cols: usize,
    dtype: DType,
}

/// One layer's tensors in the blob (`a_log` is turned into `A` at start).
#[derive(Clone, Copy)]
struct LayerRefs {
    norm: TensorRef,
    in_proj: TensorRef,
    in_proj_bias: Option<TensorRef>,
    conv_w: TensorRef,
    conv_b: Option<TensorRef>,
    x_proj: TensorRef,
    dt_proj: TensorRef,
    dt_bias: TensorRef,
    a_log: TensorRef,
    d: TensorRef,
    out_proj: TensorRef,
    out_proj_bias: Option<TensorRef>,
}

/// Written by `build.rs`: the configuration, the tensors' places, the prompt and the buffer sizes.
mod model {
    use super::{LayerRefs, TensorRef};
    use mamba_core::{DType, MambaConfig};
    include!(concat!(env!("OUT_DIR"), "/model.rs"));
}

use model::{CFG, GEN_TOKENS, PROMPT_IDS};

#[repr(C, align(4))]
struct Aligned<T: ?Sized>(T);

/// The weights in their stored dtype: in flash, or in the 16 MiB RAM region
/// (QEMU loads it from the ELF) when they do not fit.
#[cfg_attr(weights_in_extram, link_section = ".weights")]
static WEIGHTS: Aligned<[u8; model::BLOB_LEN]> =
    Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/weights.bin")));

/// Conv + SSM state of the one sequence (slot 0).
static mut STATE: [f32; model::STATE_FLOATS] = [0.0; model::STATE_FLOATS];
/// `A = -exp(A_log)` of every layer, computed at start.
static mut A: [f32; model::A_FLOATS] = [0.0; model::A_FLOATS];
/// Scratch for the prefill of the prompt, reused by each step.
static mut SCRATCH: [f32; model::SCRATCH_FLOATS] = [0.0; model::SCRATCH_FLOATS];

/// CMSDK APB timer 0 of the MPS2 board: a 32-bit down-counter at 25 MHz.
/// Under `-icount shift=0` one tick is 40 instructions.
const TIMER0: usize = 0x4000_0000;
const INSTRUCTIONS_PER_TICK: u64 = 40;

fn timer_start() {
    // SAFETY: the timer's CTRL (0x0), VALUE (0x4) and RELOAD (0x8) registers; nothing else uses it.
    unsafe {
        write_volatile((TIMER0 + 0x8) as *mut u32, u32::MAX);
        write_volatile((TIMER0 + 0x4) as *mut u32, u32::MAX);
        write_volatile(TIMER0 as *mut u32, 1);
    }
}

fn timer_value() -> u32 {
    // SAFETY: reads the running timer's VALUE register.
    unsafe { read_volatile((TIMER0 + 0x4) as *const u32) }
}

/// Instructions between two timer readings (it counts down).
fn instructions(before: u32, after: u32) -> u64 {
    u64::from(before.wrapping_sub(after)) * INSTRUCTIONS_PER_TICK
}

extern "C" {
    // cortex-m-rt: the stack runs from `_stack_start` (top of RAM) down to `_stack_end` (end of the statics).
    static _stack_start: u32;
    static _stack_end: u32;
}

/// Bytes of stack ever used: cortex-m-rt (feature `paint-stack`) fills the
/// stack with `STACK_PAINT_VALUE` before `main`; the lowest overwritten word is the high-water mark.
fn stack_bytes_used() -> usize {
    let (bottom, top) = (addr_of!(_stack_end) as usize, addr_of!(_stack_start) as usize);
    let mut p = bottom;
    // SAFETY: every word between the two linker symbols is RAM reserved for the stack.
    while p < top && unsafe { read_volatile(p as *const u32) } == cortex_m_rt::STACK_PAINT_VALUE {
        p += 4;
    }
    top - p
}

/// Print what went wrong and leave QEMU with a failure status.
fn fail(what: &str, e: impl Display) -> ! {
    hprintln!("error: {}: {}", what, e);
    exit(debug::EXIT_FAILURE)
}

/// Leave QEMU with `status` (semihosting `SYS_EXIT`).
fn exit(status: debug::ExitStatus) -> ! {
    debug::exit(status);
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    fail("panic", info)
}

/// A view over the blob.
fn tensor(blob: &'static [u8], r: TensorRef, what: &'static str) -> Tensor<'static> {
    let len = r.rows * r.cols * r.dtype.size();
    let bytes = blob.get(r.offset..r.offset + len).unwrap_or_else(|| fail(what, "past the end of the blob"));
    Tensor::from_bytes(r.dtype, bytes, r.rows, r.cols, what).unwrap_or_else(|e| fail(what, e))
}

/// Index of the largest value (first on ties; NaN never wins), as the std runtime's greedy sampler.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

fn print_ids(name: &str, ids: &[u32]) {
    hprint!("{}: ", name);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            hprint!(",");
        }
        hprint!("{}", id);
    }
    hprintln!();
}

#[entry]
fn main() -> ! {
    let blob: &'static [u8] = &WEIGHTS.0;
    // SAFETY: `main` runs once and these are the only references ever made to the buffers.
    let (state, a, scratch) =
        unsafe { (&mut *addr_of_mut!(STATE), &mut *addr_of_mut!(A), &mut *addr_of_mut!(SCRATCH)) };

    // A = -exp(A_log), one [d_inner, d_state] block per layer.
    let per_layer = CFG.d_inner * CFG.d_state;
    for (l, out) in model::LAYERS.iter().zip(a.chunks_exact_mut(per_layer)) {
        kernels::a_from_a_log(tensor(blob, l.a_log, "A_log").data, out);
    }
    let a: &'static [f32] = a;

    let t = |r: TensorRef, what| tensor(blob, r, what);
    let opt = |r: Option<TensorRef>, what| r.map(|r| tensor(blob, r, what));
    let layers: [LayerWeights<Tensor<'static>>; CFG.n_layer] = core::array::from_fn(|i| {
        let l = &model::LAYERS[i];
        let a = &a[i * per_layer..(i + 1) * per_layer];
        LayerWeights {
            norm: t(l.norm, "norm"),
            in_proj: t(l.in_proj, "in_proj"),
            in_proj_bias: opt(l.in_proj_bias, "in_proj bias"),
            conv_w: t(l.conv_w, "conv1d weight"),
            conv_b: opt(l.conv_b, "conv1d bias"),
            x_proj: t(l.x_proj, "x_proj"),
            dt_proj: t(l.dt_proj, "dt_proj weight"),
            dt_proj_t: None,
            dt_bias: t(l.dt_bias, "dt_proj bias"),
            a: Tensor::new(WData::F32(a), CFG.d_inner, CFG.d_state, "A").unwrap_or_else(|e| fail("A", e)),
            d: t(l.d, "D"),
            out_proj: t(l.out_proj, "out_proj"),
            out_proj_bias: opt(l.out_proj_bias, "out_proj bias"),
        }
    });
    let m = Model {
        cfg: CFG,
        embedding: t(model::EMBEDDING, "embedding"),
        layers: &layers,
        norm_f: t(model::NORM_F, "norm_f"),
        lm_head: opt(model::LM_HEAD, "lm_head"),
    };
    m.validate().unwrap_or_else(|e| fail("model", e));
    let ops = CpuBackend::default();
    let vocab = model::SAMPLE_VOCAB;

    // Prefill the prompt into slot 0; logits of its last token only.
    timer_start();
    let t0 = timer_value();
    let mut generated = [0u32; GEN_TOKENS];
    {
        let plan = ScratchPlan::new(&CFG, PROMPT_IDS.len(), 1);
        let mut s = plan.split(scratch).unwrap_or_else(|e| fail("scratch", e));
        let batch = Ragged { offsets: &[0, PROMPT_IDS.len()], slots: &[0] };
        driver::prefill(&ops, &m, &PROMPT_IDS, batch, &[PROMPT_IDS.len() - 1], state, &mut s)
            .unwrap_or_else(|e| fail("prefill", e));
        generated[0] = argmax(&s.logits[..vocab]);
    }
    let t1 = timer_value();

    // Decode: one step per token, greedy.
    let plan = ScratchPlan::new(&CFG, 1, 1);
    let mut s = plan.split(scratch).unwrap_or_else(|e| fail("scratch", e));
    for i in 1..GEN_TOKENS {
        driver::step(&ops, &m, &[generated[i - 1]], &[0], state, &mut s).unwrap_or_else(|e| fail("step", e));
        generated[i] = argmax(&s.logits[..vocab]);
    }
    let t2 = timer_value();

    let steps = (GEN_TOKENS - 1) as u64;
    print_ids("tokens", &generated);
    hprintln!("instructions_per_token: {}", instructions(t1, t2).checked_div(steps).unwrap_or(0));
    hprintln!("stack_bytes_used: {}", stack_bytes_used());
    print_ids("prompt_ids", &PROMPT_IDS);
    hprintln!("prefill_instructions: {}", instructions(t0, t1));
    exit(debug::EXIT_SUCCESS)
}
