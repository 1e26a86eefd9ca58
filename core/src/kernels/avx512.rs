//! x86-64 AVX-512 tiles of a matrix product, chosen at run time.
//!
//! A tile is `R` weight rows against `T` activation rows. Every (row, token)
//! pair has two 16-lane accumulators, for the even and the odd blocks of 16
//! along `k` (the last block masked, so no scalar tail), added and reduced
//! in one fixed order at the end: a pair gives the same bits in every tile
//! shape. Two chains, not one, because a lone row (decode) would otherwise
//! wait on the FMA latency: one chain caps bf16 at about 20 GB/s a core. So a token's output does
//! not depend on how many other tokens share the product, nor on how the
//! threads split it (ragged = solo, chunked = whole, threaded = sequential).
//!
//! Q8_0 rows go through the integer kernels of [`super::q8_avx512`], in
//! the same loops (`Product` is what a format supplies to them).
//!
//! Like the AVX2 kernels, these switch on once through
//! [`super::simd::enable_avx512`], which the std runtime calls after
//! detecting AVX-512 F/BW/VL.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use super::bf16_avx512 as bfd;
#[cfg(target_arch = "x86_64")]
use super::q8_avx512 as q8;
use crate::tensor::{Tensor, WData};

/// Weight rows per tile in a blocked product.
const TILE_R: usize = 3;
/// Activation rows per tile: 3 x 4 x 2 accumulators + 6 weights + 1
/// activation fit the 32 vector registers.
pub(crate) const TILE_T: usize = 4;
/// Widest row (`k`) whose activations a product stages on the stack,
/// rounded to bf16 or quantized to int8 ([`TILE_T`] rows of it); wider
/// rows take the widening tiles (every published Mamba-1 is at most 5,120).
pub(crate) const STAGED_K: usize = 8192;
/// Bytes of weight rows kept hot (in L2) while every token block passes over them.
const PANEL_BYTES: usize = 192 * 1024;
/// At most this many weight rows a panel (a multiple of [`TILE_R`]), so a
/// token block's outputs for a panel are staged on the stack and stored as
/// one run a token.
const PANEL_ROWS: usize = 255;

/// `store(t, o, &[x[t] . w[o] + bias[o], ...])` (runs of consecutive features) for features `f0..f1` and all `rows`
/// rows of `x` (`[rows, k]`, `k = w.cols`). Returns `false`, doing nothing,
/// when the AVX-512 kernels are not switched on.
pub fn linear(
    (x, x_stride): (&[f32], usize),
    rows: usize,
    w: &Tensor<'_>,
    bias: Option<&Tensor<'_>>,
    (f0, f1): (usize, usize),
    store: &mut impl FnMut(usize, usize, &[f32]),
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        // The tiles read raw pointers: every row they touch must be in bounds.
        assert!(
            f1 * w.cols <= w.len()
                && x_stride >= w.cols
                && (rows == 0 || (rows - 1) * x_stride + w.cols <= x.len()),
            "linear: operands shorter than their shapes"
        );
        let rest = ((x, x_stride), rows, bias, (f0, f1));
        with_product!(w.data, w.cols, p => blocked(p, rest, store));
        return true;
    }
    let _ = (x, x_stride, rows, w, bias, f0, f1, store);
    false
}

/// `w . x` over the shorter of the two, in the products' order (a Q8_0 row
/// as [`linear`] computes it when `x` covers it); `None` when the AVX-512
/// kernels are off.
#[inline]
pub fn dot(w: WData<'_>, x: &[f32]) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512_enabled() {
        let k = w.len().min(x.len());
        let mut out = [0.0f32];
        // SAFETY: enable_avx512's contract gives the features; both rows
        // hold at least `k` elements.
        unsafe { with_product!(w, k, p => p.row_dots(x, &mut out)) };
        return Some(out[0]);
    }
    let _ = (w, x);
    None
}

/// `$body` with `$p` the [`Product`] that runs rows of `$k` weights of
/// `$w` (a `WData`): floats widened in registers; bf16 against bf16
/// activations when asked for ([`super::simd::bf16_dot_enabled`]); Q8_0
/// in integers with VNNI, or dequantized without it. Rows too wide for
/// the stack take the widening tiles.
#[cfg(target_arch = "x86_64")]
macro_rules! with_product {
    ($w:expr, $k:expr, $p:ident => $body:expr) => {{
        let k = $k;
        match $w {
            WData::F32(d) => {
                let $p = &mut Floats::new(d.as_ptr(), k, 4);
                $body
            }
            WData::F16(d) => {
                let $p = &mut Floats::new(d.as_ptr(), k, 2);
                $body
            }
            WData::BF16(d) => match super::simd::bf16_dot_enabled().then(|| Bf16Dots::new(d, k)).flatten() {
                Some(mut dots) => {
                    let $p = &mut dots;
                    $body
                }
                None => {
                    let $p = &mut Floats::new(d.as_ptr(), k, 2);
                    $body
                }
            },
            WData::Q8_0 { q, d } => match super::simd::vnni_enabled().then(|| Q8Ints::new(q, d, k)).flatten()
            {
                Some(mut ints) => {
                    let $p = &mut ints;
                    $body
                }
                None => {
                    let $p = &mut Floats::new(x86::Q8Rows { q: q.as_ptr(), d: d.as_ptr() }, k, 1);
                    $body
                }
            },
        }
    }};
}
#[cfg(target_arch = "x86_64")]
use with_product;

/// `x` and its row stride, `rows`, `bias` and the feature range of a product.
#[cfg(target_arch = "x86_64")]
type Operands<'x, 'b, 'w> = ((&'x [f32], usize), usize, Option<&'b Tensor<'w>>, (usize, usize));

/// One weight format's kernels, as [`blocked`] drives them over rows `[_, k]`.
#[cfg(target_arch = "x86_64")]
trait Product {
    /// Row length.
    fn k(&self) -> usize;
    /// Stored bytes per weight (quants only, for Q8_0).
    fn esize(&self) -> usize;
    /// The bytes the weights stream from (for prefetch hints).
    fn bytes(&self) -> *const u8;
    /// Make rows `t0..t0 + nt` (`nt <= TILE_T`) of `x`, `stride` apart, the
    /// tokens of the products that follow.
    /// # Safety
    /// Those rows are in bounds; AVX-512 F/BW/VL are available.
    unsafe fn tokens(&mut self, x: &[f32], stride: usize, t0: usize, nt: usize);
    /// Rows `o..o + nr` (`nr` 1 or [`TILE_R`]) against the `nt` tokens.
    /// # Safety
    /// Those rows are in bounds; the tokens are made; AVX-512 F/BW/VL are available.
    unsafe fn tile(&self, o: usize, nr: usize, nt: usize) -> [[f32; TILE_T]; TILE_R];
    /// How many runs side by side [`Product::gemv_tokens`] streams for `t`
    /// tokens: 1 or 2 (every format streams one token in two); 0 where
    /// the tiles serve `t` tokens.
    fn stream_runs(&self, t: usize) -> usize;
    /// `out[r][i][t] = w[o[r] + i] . ` token `t`, for the first `T`
    /// tokens: `R` runs of rows, all of one length, streamed side by side,
    /// each row read once for all the tokens. Called where
    /// [`Product::stream_runs`] `(T)` is not 0.
    /// # Safety
    /// Rows `o[r]..o[r] + out[r].len()` are in bounds; the first `T`
    /// tokens are made; AVX-512 F/BW/VL are available.
    unsafe fn gemv_tokens<const R: usize, const T: usize>(&self, o: [usize; R], out: [&mut [[f32; T]]; R]);

    /// `out[i] = w[i] . x` for the first `out.len()` rows.
    /// # Safety
    /// Those rows are in bounds; `x` holds `k` elements; AVX-512 F/BW/VL are available.
    unsafe fn row_dots(&mut self, x: &[f32], out: &mut [f32]) {
        self.tokens(x, self.k(), 0, 1);
        self.gemv_tokens([0], [bytemuck::cast_slice_mut::<f32, [f32; 1]>(out)]);
    }
}

/// Float (or dequantized Q8_0) rows, widened to f32 in registers.
#[cfg(target_arch = "x86_64")]
struct Floats<W> {
    w: W,
    k: usize,
    esize: usize,
    x: *const f32,
    /// Between the tokens' rows of `x`.
    stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl<W: x86::Rows16> Floats<W> {
    fn new(w: W, k: usize, esize: usize) -> Self {
        Floats { w, k, esize, x: core::ptr::null(), stride: k }
    }
}

#[cfg(target_arch = "x86_64")]
impl<W: x86::Rows16> Product for Floats<W> {
    fn k(&self) -> usize {
        self.k
    }
    fn esize(&self) -> usize {
        self.esize
    }
    fn bytes(&self) -> *const u8 {
        self.w.bytes()
    }
    unsafe fn tokens(&mut self, x: &[f32], stride: usize, t0: usize, _nt: usize) {
        self.x = x.as_ptr().add(t0 * stride);
        self.stride = stride;
    }
    fn stream_runs(&self, t: usize) -> usize {
        match t {
            t if t <= W::STREAM_TOKENS.1 => 2,
            t if t <= W::STREAM_TOKENS.0 => 1,
            _ => 0,
        }
    }
    unsafe fn gemv_tokens<const R: usize, const T: usize>(&self, o: [usize; R], out: [&mut [[f32; T]]; R]) {
        let (x, stride) = (self.x, self.stride);
        x86::gemv_tokens(self.w, core::array::from_fn(|t| x.add(t * stride)), self.k, o, out);
    }
    unsafe fn tile(&self, o: usize, nr: usize, nt: usize) -> [[f32; TILE_T]; TILE_R] {
        let (w, k, x, stride) = (self.w, self.k, self.x, self.stride);
        let rows = |i: usize| w.row(o + i, k);
        let toks = |j: usize| x.add(j * stride);
        macro_rules! call {
            ($r:literal, $t:literal) => {
                x86::tile::<W, $r, $t>(core::array::from_fn(rows), core::array::from_fn(toks), k)
            };
        }
        by_shape!(nr, nt, call)
    }
}

/// Q8_0 rows against activations quantized to int8 ([`super::q8_avx512`]).
#[cfg(target_arch = "x86_64")]
struct Q8Ints {
    w: x86::Q8Rows,
    /// Sized for the rows' length, `k`.
    x: q8::QuantRows,
}

#[cfg(target_arch = "x86_64")]
impl Q8Ints {
    /// `None` where rows of `k` are too wide to quantize on the stack.
    fn new(q: &[i8], d: &[half::f16], k: usize) -> Option<Self> {
        let x = q8::QuantRows::new(k)?;
        Some(Q8Ints { w: x86::Q8Rows { q: q.as_ptr(), d: d.as_ptr() }, x })
    }
}

#[cfg(target_arch = "x86_64")]
impl Product for Q8Ints {
    fn k(&self) -> usize {
        self.x.k()
    }
    fn esize(&self) -> usize {
        1
    }
    fn bytes(&self) -> *const u8 {
        x86::Rows16::bytes(self.w)
    }
    unsafe fn tokens(&mut self, x: &[f32], stride: usize, t0: usize, nt: usize) {
        self.x.quantize(x, stride, t0, nt);
    }
    fn stream_runs(&self, t: usize) -> usize {
        if t <= TILE_T {
            2
        } else {
            0
        }
    }
    unsafe fn gemv_tokens<const R: usize, const T: usize>(&self, o: [usize; R], out: [&mut [[f32; T]]; R]) {
        q8::gemv_tokens(self.w, o, &self.x, out)
    }
    unsafe fn tile(&self, o: usize, nr: usize, nt: usize) -> [[f32; TILE_T]; TILE_R] {
        macro_rules! call {
            ($r:literal, $t:literal) => {
                q8::tile::<$r, $t>(self.w, self.x.k(), o, &self.x)
            };
        }
        by_shape!(nr, nt, call)
    }
}

/// bf16 rows against activations rounded to bf16 ([`super::bf16_avx512`]).
/// Made only while [`super::simd::bf16_dot_enabled`], whose switch's
/// contract is that the CPU has AVX-512 BF16 as well as what the trait's
/// methods ask for.
#[cfg(target_arch = "x86_64")]
struct Bf16Dots {
    w: *const half::bf16,
    /// Sized for the rows' length, `k`.
    x: bfd::Bf16Rows,
}

#[cfg(target_arch = "x86_64")]
impl Bf16Dots {
    /// `None` where rows of `k` are too wide to round on the stack.
    fn new(w: &[half::bf16], k: usize) -> Option<Self> {
        Some(Bf16Dots { w: w.as_ptr(), x: bfd::Bf16Rows::new(k)? })
    }
}

#[cfg(target_arch = "x86_64")]
impl Product for Bf16Dots {
    fn k(&self) -> usize {
        self.x.k()
    }
    fn esize(&self) -> usize {
        2
    }
    fn bytes(&self) -> *const u8 {
        self.w as *const u8
    }
    unsafe fn tokens(&mut self, x: &[f32], stride: usize, t0: usize, nt: usize) {
        self.x.round(x, stride, t0, nt);
    }
    /// Up to three tokens: against the tiles (130m, `--bf16-dot`, three
    /// alternations, decode tok/s) batch 2 199 -> 286, batch 3 274 -> 363,
    /// but batch 4 317 -> 297.
    fn stream_runs(&self, t: usize) -> usize {
        if t <= 3 {
            2
        } else {
            0
        }
    }
    unsafe fn gemv_tokens<const R: usize, const T: usize>(&self, o: [usize; R], out: [&mut [[f32; T]]; R]) {
        bfd::gemv_tokens(self.w, o, &self.x, out)
    }
    unsafe fn tile(&self, o: usize, nr: usize, nt: usize) -> [[f32; TILE_T]; TILE_R] {
        macro_rules! call {
            ($r:literal, $t:literal) => {
                bfd::tile::<$r, $t>(self.w, o, &self.x)
            };
        }
        by_shape!(nr, nt, call)
    }
}

/// `$call!(R, T)` for the tile shape `nr` (1 or [`TILE_R`]) x `nt`
/// (1..=[`TILE_T`]), placed in a full tile.
#[cfg(target_arch = "x86_64")]
macro_rules! by_shape {
    ($nr:expr, $nt:expr, $call:ident) => {{
        const _: () = assert!(TILE_R == 3 && TILE_T == 4, "by_shape! lists the shapes");
        let mut out = [[0.0f32; TILE_T]; TILE_R];
        match ($nr == TILE_R, $nt) {
            (true, 1) => place(&mut out, $call!(3, 1)),
            (true, 2) => place(&mut out, $call!(3, 2)),
            (true, 3) => place(&mut out, $call!(3, 3)),
            (true, 4) => place(&mut out, $call!(3, 4)),
            (false, 1) => place(&mut out, $call!(1, 1)),
            (false, 2) => place(&mut out, $call!(1, 2)),
            (false, 3) => place(&mut out, $call!(1, 3)),
            (false, 4) => place(&mut out, $call!(1, 4)),
            _ => unreachable!("tile of {} x {}", $nr, $nt),
        }
        out
    }};
}
#[cfg(target_arch = "x86_64")]
use by_shape;

/// A tile's `R x T` values into the top left of a full tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn place<const R: usize, const T: usize>(out: &mut [[f32; TILE_T]; TILE_R], v: [[f32; T]; R]) {
    for (dst, src) in out.iter_mut().zip(v.iter()) {
        dst[..T].copy_from_slice(src);
    }
}

/// [`blocked`] for `T` tokens through [`Product::gemv_tokens`]; `false`,
/// having stored nothing, where `p` does not stream `T` tokens (never for
/// one).
#[cfg(target_arch = "x86_64")]
fn streamed<P: Product, const T: usize>(
    p: &mut P,
    (x, stride): (&[f32], usize),
    (f0, f1): (usize, usize),
    add_bias: &impl Fn(&mut [f32], usize),
    store: &mut impl FnMut(usize, usize, &[f32]),
) -> bool {
    let runs = p.stream_runs(T);
    if runs == 0 {
        return false;
    }
    // SAFETY: rows 0..T of x are in bounds (asserted by the caller);
    // enable_avx512's contract gives the CPU features.
    unsafe { p.tokens(x, stride, 0, T) };
    // Two runs side by side (see `blocked`), then the rows after them
    // (fewer than two); or one run.
    let rest = if runs == 2 { streamed_runs::<_, 2, T>(p, (f0, f1), add_bias, store) } else { f0 };
    streamed_runs::<_, 1, T>(p, (rest, f1), add_bias, store);
    true
}

/// [`streamed`]'s features `f0..f1` cut into `R` runs of equal length
/// streamed side by side; returns where the rows left after them start.
#[cfg(target_arch = "x86_64")]
fn streamed_runs<P: Product, const R: usize, const T: usize>(
    p: &P,
    (f0, f1): (usize, usize),
    add_bias: &impl Fn(&mut [f32], usize),
    store: &mut impl FnMut(usize, usize, &[f32]),
) -> usize {
    let part = (f1 - f0) / R;
    let mut o: [usize; R] = core::array::from_fn(|r| f0 + r * part);
    let (mut bufs, mut run) = ([[[0.0f32; T]; 64]; R], [0.0f32; 64]);
    let mut done = 0;
    while done < part {
        let n = (part - done).min(64);
        // SAFETY: rows o[r]..o[r] + n are in bounds (asserted by the caller).
        unsafe { p.gemv_tokens(o, bufs.each_mut().map(|b| &mut b[..n])) };
        for (buf, o) in bufs.iter().zip(o) {
            for t in 0..T {
                for (v, b) in run.iter_mut().zip(&buf[..n]) {
                    *v = b[t];
                }
                add_bias(&mut run[..n], o);
                store(t, o, &run[..n]);
            }
        }
        o = o.map(|o| o + n);
        done += n;
    }
    f0 + R * part
}

/// The product over the weight rows of `p` (rows `0..f1` in bounds: the
/// caller asserts it).
#[cfg(target_arch = "x86_64")]
fn blocked(
    p: &mut impl Product,
    ((x, stride), rows, bias, (f0, f1)): Operands<'_, '_, '_>,
    store: &mut impl FnMut(usize, usize, &[f32]),
) {
    // Features `o0..o0 + run.len()` get their bias. Without one nothing is
    // added: a product is never -0 (its sums start at +0), so adding +0
    // would change no bits.
    let add_bias = |run: &mut [f32], o0: usize| {
        if let Some(bias) = bias {
            // Widened in one pass: a dtype match per element had cost as
            // much as dt_proj's product.
            let mut b = [0.0f32; PANEL_ROWS];
            let b = &mut b[..run.len()];
            bias.data.widen_into(o0, b);
            for (v, b) in run.iter_mut().zip(b.iter()) {
                *v += b;
            }
        }
    };
    let (k, esize) = (p.k(), p.esize());
    // One token is a pure stream of weights: rows one after another,
    // which the DRAM prefetchers follow best (measured: interleaved rows
    // read the lm head at half the rate), many rows per call. Two such
    // streams, the two halves of the features, a row of each at a time: a
    // row's dot product waits on its own FMA chains, so a lone row left
    // the core waiting on their latency (Q8_0's one chain a row most), and
    // the memory serves two streams faster than one. Measured at batch 1
    // (130m, 2 threads, `bench`, six runs a dtype alternated with one
    // stream, medians): decode tok/s Q8_0 210 -> 219 in slow-memory
    // minutes and 220 -> 272 in fast ones, f32 96.7 -> 103.9, bf16 173.8
    // -> 179.5; f16 175 -> 183 in one set, 163 -> 160 in another that
    // changed speed halfway. Three and four streams gained no more.
    // A few tokens (a small batch's decode step) stream the rows the same
    // way where the format gains (`Product::stream_runs`), each row against
    // every token: tiles of interleaved rows read f32 weights at about
    // half the rate (batch 2 stepped at 0.58x batch 1's steps/s).
    let streamed = match rows {
        1 => streamed::<_, 1>(p, (x, stride), (f0, f1), &add_bias, store),
        2 => streamed::<_, 2>(p, (x, stride), (f0, f1), &add_bias, store),
        3 => streamed::<_, 3>(p, (x, stride), (f0, f1), &add_bias, store),
        4 => streamed::<_, 4>(p, (x, stride), (f0, f1), &add_bias, store),
        _ => false,
    };
    if streamed {
        return;
    }
    let panel = (PANEL_BYTES / (k * esize).max(1)).clamp(TILE_R, PANEL_ROWS) / TILE_R * TILE_R;
    // A token block's outputs over the panel, stored as one run a token
    // (a call a tile and token had cost a tenth of batched decode).
    let mut stage = [[0.0f32; PANEL_ROWS]; TILE_T];
    let mut p0 = f0;
    while p0 < f1 {
        let p1 = (p0 + panel).min(f1);
        // While this panel computes, the next one is fetched from memory in
        // even shares per tile, in address order (interleaved tile rows
        // alone defeat the hardware prefetchers: measured at half the rate).
        let next = (p1 * k * esize, (p1 + panel).min(f1) * k * esize);
        let tiles = rows.div_ceil(TILE_T) * (p1 - p0).div_ceil(TILE_R);
        let share = (next.1 - next.0).div_ceil(tiles.max(1)).next_multiple_of(64);
        let mut fetched = next.0;
        let mut t0 = 0;
        while t0 < rows {
            let nt = (rows - t0).min(TILE_T);
            // SAFETY: rows t0..t0+nt of x are in bounds (asserted by the caller).
            unsafe { p.tokens(x, stride, t0, nt) };
            let mut o = p0;
            while o < p1 {
                let nr = if p1 - o >= TILE_R { TILE_R } else { 1 };
                if fetched < next.1 {
                    let len = share.min(next.1 - fetched);
                    x86::prefetch(p.bytes(), fetched, len);
                    fetched += len;
                }
                // SAFETY: features and rows are in bounds (asserted by the
                // caller); enable_avx512's contract gives the CPU features.
                let tile = unsafe { p.tile(o, nr, nt) };
                for (j, run) in stage[..nt].iter_mut().enumerate() {
                    for r in 0..nr {
                        run[o - p0 + r] = tile[r][j];
                    }
                }
                o += nr;
            }
            for (j, run) in stage[..nt].iter_mut().enumerate() {
                let run = &mut run[..p1 - p0];
                add_bias(run, p0);
                store(t0 + j, p0, run);
            }
            t0 += nt;
        }
        p0 = p1;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use core::arch::x86_64::*;
    use half::{bf16, f16};

    /// Ask for bytes `start..start + len` of `base` in L2: a hint that never
    /// faults, so the range need not be in bounds (addresses are wrapped, not
    /// dereferenced).
    #[inline]
    pub fn prefetch(base: *const u8, start: usize, len: usize) {
        let mut off = 0;
        while off < len {
            // SAFETY: a prefetch has no effect on memory and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(start + off) as *const i8) };
            off += 64;
        }
    }

    /// Where a tile reads a weight row: sixteen weights at a time, widened
    /// to f32 in a register.
    pub trait Rows16: Copy {
        /// Weights `i..i+16`.
        /// # Safety
        /// They are readable; AVX-512 F/BW/VL are available.
        unsafe fn load16(self, i: usize) -> __m512;
        /// Weights `i..i+32` (`i` a multiple of 32) as two registers.
        /// # Safety
        /// As [`Rows16::load16`].
        #[inline(always)]
        unsafe fn load32(self, i: usize) -> [__m512; 2] {
            [self.load16(i), self.load16(i + 16)]
        }
        /// Weights `i..i+8` in a 256-bit register, for a lone row ([`lone_dots`]).
        /// # Safety
        /// As [`Rows16::load16`].
        unsafe fn load8(self, i: usize) -> __m256;
        /// The first `count(m)` weights from `i`, zeros elsewhere (`m` is a low mask).
        /// # Safety
        /// The lanes set in `m` are readable; AVX-512 F/BW/VL are available.
        unsafe fn load16_masked(self, i: usize, m: __mmask16) -> __m512;
        /// The row `r` rows of `k` weights further on.
        /// # Safety
        /// That row is in bounds (`k` a multiple of the block for Q8_0).
        unsafe fn row(self, r: usize, k: usize) -> Self;
        /// The bytes the weights stream from (for prefetch hints).
        fn bytes(self) -> *const u8;
        /// Up to how many tokens rows are better streamed against all of
        /// them ([`gemv_tokens`]) than run through tiles, and up to how
        /// many of those on two runs side by side rather than one (one
        /// token, at least, on two in every format). f32 rows need no
        /// widening: batch 2 decoded 1.84x batch 1's tokens/s on one run,
        /// 1.13x through tiles (130m). On two runs f32 gained in slow
        /// minutes and lost in fast ones (b4 162 -> 195 tok/s at 33 GB/s,
        /// 208 -> 163 at 56-64; b2 125 -> 118, 182 -> 167), so it keeps
        /// one. Widened rows (bf16, f16) on one run were compute-bound,
        /// slower than their tiles (batch 2 157 against 179 tok/s in
        /// bf16); on two runs side by side they gain up to three tokens and
        /// lose at four (130m, slow minutes, 3-4 alternations, tok/s tiles
        /// -> streamed: bf16 b2 184 -> 268, b3 255 -> 334, b4 330 -> 288;
        /// f16 177 -> 270, 254 -> 360, 343 -> 282; bf16 in fast minutes b2
        /// 176 -> 299, b3 237 -> 323).
        const STREAM_TOKENS: (usize, usize) = (1, 1);
    }

    impl<W: Widen16> Rows16 for *const W {
        // f32 (the one 4-byte element) up to the tiles' tokens on one run;
        // bf16 and f16 three on two.
        const STREAM_TOKENS: (usize, usize) =
            if core::mem::size_of::<W>() == 4 { (super::TILE_T, 1) } else { (3, 3) };
        #[inline(always)]
        unsafe fn load16(self, i: usize) -> __m512 {
            W::load16(self.add(i))
        }
        #[inline(always)]
        unsafe fn load8(self, i: usize) -> __m256 {
            W::load8(self.add(i))
        }
        #[inline(always)]
        unsafe fn load16_masked(self, i: usize, m: __mmask16) -> __m512 {
            W::load16_masked(self.add(i), m)
        }
        #[inline(always)]
        unsafe fn row(self, r: usize, k: usize) -> Self {
            self.add(r * k)
        }
        fn bytes(self) -> *const u8 {
            self as *const u8
        }
    }

    /// Rows of Q8_0 blocks: the int8 quants and their f16 scales, one per 32.
    #[derive(Clone, Copy)]
    pub struct Q8Rows {
        pub q: *const i8,
        pub d: *const f16,
    }

    impl Q8Rows {
        /// The scale of weight `i`'s block, broadcast.
        #[inline(always)]
        unsafe fn scale(self, i: usize) -> __m512 {
            _mm512_cvtph_ps(_mm256_set1_epi16((*self.d.add(i / crate::tensor::Q8_BLOCK)).to_bits() as i16))
        }
    }

    /// `q * d` is exact in f32, so these equal f32 weights dequantized first.
    impl Rows16 for Q8Rows {
        #[inline(always)]
        unsafe fn load16(self, i: usize) -> __m512 {
            let q =
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(self.q.add(i) as *const __m128i)));
            _mm512_mul_ps(q, self.scale(i))
        }
        #[inline(always)]
        unsafe fn load32(self, i: usize) -> [__m512; 2] {
            let s = self.scale(i);
            let lo =
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(self.q.add(i) as *const __m128i)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                self.q.add(i + 16) as *const __m128i
            )));
            [_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s)]
        }
        #[inline(always)]
        unsafe fn load16_masked(self, i: usize, m: __mmask16) -> __m512 {
            let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, self.q.add(i))));
            _mm512_mul_ps(q, self.scale(i))
        }
        #[inline(always)]
        unsafe fn load8(self, i: usize) -> __m256 {
            let q =
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(self.q.add(i) as *const __m128i)));
            _mm256_mul_ps(q, _mm512_castps512_ps256(self.scale(i)))
        }
        #[inline(always)]
        unsafe fn row(self, r: usize, k: usize) -> Self {
            Q8Rows { q: self.q.add(r * k), d: self.d.add(r * k / crate::tensor::Q8_BLOCK) }
        }
        fn bytes(self) -> *const u8 {
            self.q as *const u8
        }
    }

    /// Sixteen stored weights widened to f32 in a register.
    pub trait Widen16: Copy {
        /// # Safety
        /// `p` points at 16 readable elements; AVX-512 F/BW/VL are available.
        unsafe fn load16(p: *const Self) -> __m512;
        /// The first `count(m)` lanes from `p`, zeros elsewhere (`m` is a low mask).
        /// # Safety
        /// The lanes set in `m` are readable; AVX-512 F/BW/VL are available.
        unsafe fn load16_masked(p: *const Self, m: __mmask16) -> __m512;
        /// Eight elements widened in a 256-bit register.
        /// # Safety
        /// `p` points at 8 readable elements; AVX-512 F/BW/VL are available.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Widen16 for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const Self, m: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(m, p)
        }
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    /// bf16 is the top half of an f32: zero-extend and shift.
    #[inline(always)]
    unsafe fn bf16_bits_to_ps(h: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    impl Widen16 for bf16 {
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            bf16_bits_to_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const Self, m: __mmask16) -> __m512 {
            bf16_bits_to_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
        }
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
    }

    impl Widen16 for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load16_masked(p: *const Self, m: __mmask16) -> __m512 {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
        }
        #[inline(always)]
        unsafe fn load8(p: *const Self) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    /// `out[r][t] = w[r] . x[t]` over `k` elements.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; each `w[r]` and `x[t]` points at `k`
    /// readable elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn tile<W: Rows16, const R: usize, const T: usize>(
        w: [W; R],
        x: [*const f32; T],
        k: usize,
    ) -> [[f32; T]; R] {
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        let mut i = 0;
        while i + 32 <= k {
            let mut wv = [[_mm512_setzero_ps(); 2]; R];
            for r in 0..R {
                wv[r] = w[r].load32(i);
            }
            for t in 0..T {
                let xv = [_mm512_loadu_ps(x[t].add(i)), _mm512_loadu_ps(x[t].add(i + 16))];
                for r in 0..R {
                    for c in 0..2 {
                        acc[r][t][c] = _mm512_fmadd_ps(wv[r][c], xv[c], acc[r][t][c]);
                    }
                }
            }
            i += 32;
        }
        tail(&w, &x, k, i, &mut acc);
        reduce_pairs(&acc)
    }

    /// The blocks of a tile after its last whole step at `i`: at most two,
    /// a full one (even chain), then a masked one.
    #[inline(always)]
    unsafe fn tail<W: Rows16, const R: usize, const T: usize>(
        w: &[W; R],
        x: &[*const f32; T],
        k: usize,
        mut i: usize,
        acc: &mut [[[__m512; 2]; T]; R],
    ) {
        let mut c = 0;
        while i < k {
            let m = if k - i >= 16 { 0xffff } else { ((1u32 << (k - i)) - 1) as __mmask16 };
            let mut wv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                wv[r] = w[r].load16_masked(i, m);
            }
            for t in 0..T {
                let xv = _mm512_maskz_loadu_ps(m, x[t].add(i));
                for r in 0..R {
                    acc[r][t][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][t][c]);
                }
            }
            i += 16;
            c = 1;
        }
    }

    /// `out[r][i][t] = w row (o[r] + i) . x[t]` over `k` elements: `R`
    /// runs of rows (of one length), each one row after another, a row of
    /// each at a time, each row read once for all the tokens. Here, not in
    /// the caller, so that the tiles inline: a call a row cost a tenth of a
    /// batch-1 product.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL are available; rows `o[r]..o[r] + out[r].len()` of
    /// `w` and `k` elements of each `x[t]` are readable.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn gemv_tokens<W: Rows16, const R: usize, const T: usize>(
        w: W,
        x: [*const f32; T],
        k: usize,
        o: [usize; R],
        mut out: [&mut [[f32; T]]; R],
    ) {
        let n = out.iter().map(|run| run.len()).min().unwrap_or(0);
        for i in 0..n {
            let mut rows = [w; R];
            for (row, o) in rows.iter_mut().zip(o) {
                *row = w.row(o + i, k);
            }
            let v = lone_dots(rows, x, k);
            for (run, v) in out.iter_mut().zip(v) {
                run[i] = v;
            }
        }
    }

    /// An `R x T` [`tile`], bit for bit, for rows streamed from memory:
    /// each pair's two chains held as four 256-bit quarters (lanes
    /// `8q..8q + 8` of chain `q / 2`), each lane the same FMAs in the same
    /// order. On Zen 4 a row read through 16-byte widening loads and
    /// 256-bit FMAs streams faster than through 512-bit ones (an isolated
    /// two-thread harness on the 77 MB lm head, as a share of the bare
    /// read, seven paired sets: bf16 0.87-0.95 against 0.76-0.93, f32
    /// 0.93-1.04 against 0.88-0.96; the README's "CPU speed").
    ///
    /// # Safety
    /// As [`tile`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn lone_dots<W: Rows16, const R: usize, const T: usize>(
        w: [W; R],
        x: [*const f32; T],
        k: usize,
    ) -> [[f32; T]; R] {
        let mut q = [[[_mm256_setzero_ps(); 4]; T]; R];
        let mut i = 0;
        while i + 32 <= k {
            for (w, qr) in w.iter().zip(q.iter_mut()) {
                // The row's 32 weights widened once, for every token.
                let mut wv = [_mm256_setzero_ps(); 4];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = w.load8(i + 8 * j);
                }
                for (qt, xt) in qr.iter_mut().zip(x) {
                    for (j, q) in qt.iter_mut().enumerate() {
                        *q = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xt.add(i + 8 * j)), *q);
                    }
                }
            }
            i += 32;
        }
        let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
        for (ar, qr) in acc.iter_mut().zip(&q) {
            for (a, q) in ar.iter_mut().zip(qr) {
                *a = [join256(q[0], q[1]), join256(q[2], q[3])];
            }
        }
        tail(&w, &x, k, i, &mut acc);
        reduce_pairs(&acc)
    }

    /// `[lo | hi]` as one 512-bit register.
    #[inline(always)]
    pub(crate) unsafe fn join256(lo: __m256, hi: __m256) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castps_pd(_mm512_castps256_ps512(lo)),
            _mm256_castps_pd(hi),
        ))
    }

    /// `lane_sum` of each of 16 registers (a scan channel's or a tile
    /// pair's), as one register whose lane `k` is register `k`'s sum: the
    /// same adds in the same tree as `_mm512_reduce_add_ps` (lanes `j` and
    /// `j + w` for w = 8, 4, 2, 1), two registers' halves side by side in
    /// each add.
    #[inline(always)]
    pub(crate) unsafe fn lane_sums16(p: [__m512; 16]) -> __m512 {
        // Plain loops, not `array::from_fn`: a closure does not inherit
        // the caller's target features, so its intrinsics became calls.
        // w = 8: [a0..8 | b0..8] + [a8..16 | b8..16], channel pairs (2i, 2i+1).
        let mut s = [_mm512_setzero_ps(); 8];
        for (i, si) in s.iter_mut().enumerate() {
            let (a, b) = (p[2 * i], p[2 * i + 1]);
            *si = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            );
        }
        // w = 4: s[i] holds 128-bit groups [c0 lo, c0 hi, c1 lo, c1 hi].
        let mut t = [_mm512_setzero_ps(); 4];
        for (i, ti) in t.iter_mut().enumerate() {
            let (a, b) = (s[2 * i], s[2 * i + 1]);
            *ti = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            );
        }
        // t[i]: 128-bit group g is channel 4i + g's four partial sums.
        // w = 2 and w = 1 within each group, two registers at a time.
        let mut r = [_mm512_setzero_ps(); 2];
        for (i, ri) in r.iter_mut().enumerate() {
            let (a, b) = (t[2 * i], t[2 * i + 1]);
            *ri = _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
                _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
            );
        }
        // r[i], group g: [ch 4(2i)+g: 2 sums, ch 4(2i+1)+g: 2 sums].
        let v = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(r[0], r[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(r[0], r[1]),
        );
        // v, group g: channels [g, 4 + g, 8 + g, 12 + g]; put channel k in lane k.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, v)
    }

    /// Each pair's two chains added, then summed across lanes in
    /// `_mm512_reduce_add_ps`'s tree (lanes j and j + w, w = 8, 4, 2, 1):
    /// for tiles of 8 pairs or more, all of them through one transposing
    /// tree, the same adds in a third of the instructions.
    #[inline(always)]
    pub(crate) unsafe fn reduce_pairs<const R: usize, const T: usize>(
        acc: &[[[__m512; 2]; T]; R],
    ) -> [[f32; T]; R] {
        let mut out = [[0.0f32; T]; R];
        if R * T >= 8 {
            let mut p = [_mm512_setzero_ps(); 16];
            for r in 0..R {
                for t in 0..T {
                    p[r * T + t] = _mm512_add_ps(acc[r][t][0], acc[r][t][1]);
                }
            }
            let mut s = [0.0f32; 16];
            _mm512_storeu_ps(s.as_mut_ptr(), lane_sums16(p));
            for r in 0..R {
                out[r].copy_from_slice(&s[r * T..(r + 1) * T]);
            }
            return out;
        }
        for r in 0..R {
            for t in 0..T {
                out[r][t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][t][0], acc[r][t][1]));
            }
        }
        out
    }
}
