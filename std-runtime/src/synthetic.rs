//! Random weights of a published Mamba shape, to measure speed without a checkpoint.
//!
//! [`synthetic_model`] builds a [`LoadedModel`] in the Hugging Face layout
//! (`backbone.embeddings.weight`, tied head) whose tensors are drawn from a
//! seeded generator, scaled like a freshly initialised Mamba:
//!
//! - embedding: uniform with the standard deviation of N(0, 0.02);
//! - in_proj, x_proj: uniform in ±1/sqrt(fan_in) (torch's `Linear` default);
//!   out_proj the same divided by sqrt(n_layer) (Mamba's prenorm rescale);
//! - conv1d weight and bias: ±1/sqrt(d_conv); dt_proj weight: ±dt_rank^-1/2;
//! - dt_proj bias: softplus⁻¹ of dt log-uniform in [1e-3, 1e-1];
//! - A_log = ln(1..=d_state) on every row; D = 1; norms = 1.
//!
//! Every tensor is stored in the requested dtype; for Q8_0, the matrices
//! whose rows are whole 32-weight blocks are (quants uniform in ±127, one
//! f16 scale of bound / 127 per block) and the rest is f32. Values are a pure
//! function of the seed (not of the thread count): the big matrices are
//! filled in parallel, each chunk from its own generator seeded by the
//! tensor's and the chunk's index, straight into the one buffer the
//! [`TensorStore`] keeps (no copy): each tensor on a cache line, the buffer
//! on huge pages as a mapped weight file would be ([`LineBuf`]).

use std::path::PathBuf;

use half::{bf16, f16};
use mamba_core::{DType, Q8_BLOCK};
use rayon::prelude::*;

use crate::aligned::{line_starts, LineBuf};
use crate::config::{FileConfig, Layout};
use crate::error::{Error, Result};
use crate::model::{LoadedModel, Q8_SCALE_SUFFIX};
use crate::sampling::Rng;
use crate::weights::TensorStore;

/// The dimensions that differ between the published Mamba-1 models. The rest is
/// common to all: d_state 16, d_conv 4, expand 2, dt_rank = ceil(d_model / 16),
/// tied embeddings, no in/out_proj bias, a conv1d bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub name: &'static str,
    pub d_model: usize,
    pub n_layer: usize,
    pub vocab_size: usize,
}

/// `state-spaces/mamba-*` (and their `-hf` conversions).
pub const SHAPES: &[Shape] = &[
    Shape { name: "mamba-130m", d_model: 768, n_layer: 24, vocab_size: 50280 },
    Shape { name: "mamba-370m", d_model: 1024, n_layer: 48, vocab_size: 50280 },
    Shape { name: "mamba-790m", d_model: 1536, n_layer: 48, vocab_size: 50280 },
    Shape { name: "mamba-1.4b", d_model: 2048, n_layer: 48, vocab_size: 50280 },
    Shape { name: "mamba-2.8b", d_model: 2560, n_layer: 64, vocab_size: 50280 },
];

const D_STATE: usize = 16;
const D_CONV: usize = 4;
const EXPAND: usize = 2;

/// A shape by name: `130m`, `mamba-130m`, `mamba-130m-hf` (any case, an
/// `org/` prefix ignored).
pub fn shape(name: &str) -> Result<&'static Shape> {
    let lower = name.trim().to_ascii_lowercase();
    let base = lower.rsplit('/').next().unwrap_or("");
    let base = base.strip_suffix("-hf").unwrap_or(base);
    let base = base.strip_prefix("mamba-").unwrap_or(base);
    SHAPES.iter().find(|s| s.name.strip_prefix("mamba-") == Some(base)).ok_or_else(|| {
        let known: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
        Error::Input(format!("unknown model shape `{name}`; known shapes: {}", known.join(", ")))
    })
}

impl Shape {
    pub fn d_inner(&self) -> usize {
        EXPAND * self.d_model
    }
    pub fn dt_rank(&self) -> usize {
        self.d_model.div_ceil(16)
    }

    /// The configuration a `-hf` checkpoint of this shape carries.
    pub fn file_config(&self) -> FileConfig {
        FileConfig {
            layout: Layout::HuggingFace,
            d_model: self.d_model,
            d_inner: self.d_inner(),
            d_state: D_STATE,
            d_conv: D_CONV,
            dt_rank: self.dt_rank(),
            n_layer: self.n_layer,
            vocab_size: self.vocab_size,
            padded_vocab_size: self.vocab_size,
            eps: 1e-5,
            use_bias: false,
            use_conv_bias: true,
            residual_in_fp32: true,
            tie_embeddings: true,
            bos_token_id: Some(0),
            eos_token_ids: vec![0],
            pad_token_id: Some(0),
        }
    }
}

/// How a tensor's values are made.
enum Init {
    /// Uniform in `[-bound, bound)`, filled in parallel.
    Uniform(f32),
    /// Every element the same.
    Const(f32),
    /// Each row `ln(1..=cols)` (A_log).
    ALog { cols: usize },
    /// softplus⁻¹ of dt log-uniform in [1e-3, 1e-1].
    DtBias,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

/// u64 words per independently seeded chunk (128 KiB).
const CHUNK_WORDS: usize = 16 * 1024;

/// A seed for item `b` of the stream `a` (two bijective SplitMix64 rounds).
fn mix(a: u64, b: u64) -> u64 {
    Rng::new(Rng::new(a).next_u64() ^ b).next_u64()
}

/// The little-endian bit pattern of `v` in `dtype` (in the low bits).
#[inline(always)]
fn bits(dtype: DType, v: f32) -> u64 {
    match dtype {
        DType::F32 => v.to_bits() as u64,
        DType::BF16 => bf16::from_f32(v).to_bits() as u64,
        DType::F16 => f16::from_f32(v).to_bits() as u64,
        // A quant: the value rounded into -127..=127.
        DType::Q8_0 => v.round().clamp(-127.0, 127.0) as i8 as u8 as u64,
    }
}

/// Fill `words` with `n` elements of `dtype`, element `i` being `value(i)`.
fn fill_with(words: &mut [u64], dtype: DType, n: usize, value: impl Fn(usize) -> f32) {
    let per = 8 / dtype.size();
    let width = 8 * dtype.size() as u32;
    for (w, word) in words.iter_mut().enumerate() {
        let mut acc = 0u64;
        for lane in 0..per {
            let i = w * per + lane;
            if i < n {
                acc |= bits(dtype, value(i)) << (width * lane as u32);
            }
        }
        *word = acc.to_le();
    }
}

/// f32 to bf16 bits, rounding to nearest even (finite values only).
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

/// f32 to f16 bits for |v| < 65504, rounding to nearest, magnitudes below
/// f16's smallest normal (2^-14) flushed to zero. Branch-free, unlike a full conversion.
#[inline(always)]
fn f16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7fff_ffff;
    let h = if a < 0x3880_0000 { 0 } else { (a - 0x3800_0000 + 0x1000) >> 13 };
    (sign | h) as u16
}

/// Four 16-bit lanes per draw: plenty of resolution for 8 or 11 mantissa bits.
#[inline(always)]
fn fill_16(chunk: &mut [u64], rng: &mut Rng, scale: f32, conv: impl Fn(f32) -> u16) {
    for word in chunk.iter_mut() {
        let r = rng.next_u64();
        let mut acc = 0u64;
        for lane in 0..4 {
            let v = ((r >> (16 * lane)) as u16 as i16) as f32 * scale;
            acc |= (conv(v) as u64) << (16 * lane);
        }
        *word = acc.to_le();
    }
}

/// Uniform values in `[-bound, bound)` (`bound` < 65504), each chunk of
/// words from its own generator.
fn fill_uniform(words: &mut [u64], dtype: DType, n: usize, bound: f32, seed: u64) {
    let per = 8 / dtype.size();
    words.par_chunks_mut(CHUNK_WORDS).enumerate().for_each(|(c, chunk)| {
        let mut rng = Rng::new(mix(seed, c as u64));
        match dtype {
            DType::F32 => {
                // Two 32-bit lanes per draw.
                let scale = bound / 2147483648.0;
                for word in chunk.iter_mut() {
                    let r = rng.next_u64();
                    let lo = (r as u32 as i32) as f32 * scale;
                    let hi = ((r >> 32) as u32 as i32) as f32 * scale;
                    *word = (lo.to_bits() as u64 | (hi.to_bits() as u64) << 32).to_le();
                }
            }
            DType::BF16 => fill_16(chunk, &mut rng, bound / 32768.0, bf16_bits),
            DType::F16 => fill_16(chunk, &mut rng, bound / 32768.0, f16_bits),
            // Quants uniform in -127..=127 (their scale, bound / 127, is a tensor of its own).
            DType::Q8_0 => {
                for word in chunk.iter_mut() {
                    let r = rng.next_u64().to_le_bytes().map(|b| (b as i8).max(-127) as u8);
                    *word = u64::from_le_bytes(r).to_le();
                }
            }
        }
        // Elements past the end share the last word; keep them zero.
        let end = (c * CHUNK_WORDS + chunk.len()) * per;
        if end > n {
            let bits_kept = 8 * dtype.size() * (per - (end - n));
            if let Some(last) = chunk.last_mut() {
                *last = (u64::from_le(*last) & ((1u64 << bits_kept) - 1)).to_le();
            }
        }
    });
}

/// Fill `words` (the tensor's `ceil(bytes / 8)` words, zeros) with `spec`'s values in `dtype`.
fn fill(spec: &Spec, dtype: DType, seed: u64, words: &mut [u64]) {
    let n: usize = spec.shape.iter().product();
    match spec.init {
        Init::Uniform(bound) => fill_uniform(words, dtype, n, bound, seed),
        Init::Const(v) => fill_with(words, dtype, n, |_| v),
        Init::ALog { cols } => fill_with(words, dtype, n, |i| ((i % cols + 1) as f32).ln()),
        Init::DtBias => {
            let mut rng = Rng::new(seed);
            let (lo, hi) = (1e-3f64.ln(), 1e-1f64.ln());
            let vals: Vec<f32> = (0..n)
                .map(|_| {
                    let dt = (lo + rng.next_f64() * (hi - lo)).exp().max(1e-4);
                    // softplus(y) = dt  <=>  y = dt + ln(1 - exp(-dt))
                    (dt + (-(-dt).exp_m1()).ln()) as f32
                })
                .collect();
            fill_with(words, dtype, n, |i| vals[i]);
        }
    }
}

/// The tensors of `shape`, Hugging Face names, in load order.
fn specs(shape: &Shape) -> Vec<Spec> {
    let (dm, di, n, k, r, l) =
        (shape.d_model, shape.d_inner(), D_STATE, D_CONV, shape.dt_rank(), shape.n_layer);
    let inv_sqrt = |f: usize| 1.0 / (f as f32).sqrt();
    let spec = |name: String, shape: &[usize], init| Spec { name, shape: shape.to_vec(), init };
    let mut v = vec![spec(
        "backbone.embeddings.weight".into(),
        &[shape.vocab_size, dm],
        Init::Uniform(0.02 * 3f32.sqrt()),
    )];
    for i in 0..l {
        let p = format!("backbone.layers.{i}");
        let m = format!("{p}.mixer");
        v.push(spec(format!("{p}.norm.weight"), &[dm], Init::Const(1.0)));
        v.push(spec(format!("{m}.in_proj.weight"), &[2 * di, dm], Init::Uniform(inv_sqrt(dm))));
        v.push(spec(format!("{m}.conv1d.weight"), &[di, 1, k], Init::Uniform(inv_sqrt(k))));
        v.push(spec(format!("{m}.conv1d.bias"), &[di], Init::Uniform(inv_sqrt(k))));
        v.push(spec(format!("{m}.x_proj.weight"), &[r + 2 * n, di], Init::Uniform(inv_sqrt(di))));
        v.push(spec(format!("{m}.dt_proj.weight"), &[di, r], Init::Uniform(inv_sqrt(r))));
        v.push(spec(format!("{m}.dt_proj.bias"), &[di], Init::DtBias));
        v.push(spec(format!("{m}.A_log"), &[di, n], Init::ALog { cols: n }));
        v.push(spec(format!("{m}.D"), &[di], Init::Const(1.0)));
        let out_bound = inv_sqrt(di) * inv_sqrt(l);
        v.push(spec(format!("{m}.out_proj.weight"), &[dm, di], Init::Uniform(out_bound)));
    }
    v.push(spec("backbone.norm_f.weight".into(), &[dm], Init::Const(1.0)));
    v
}

/// A model of `shape` with random weights in `dtype`, the same for the same seed.
/// Its `dir` is `synthetic:<name>` (used in messages only).
pub fn synthetic_model(shape: &Shape, dtype: DType, seed: u64) -> Result<LoadedModel> {
    let origin = PathBuf::from(format!("synthetic:{}", shape.name));
    // (tensor, its dtype, its generator's seed), in load order.
    let tensors: Vec<(Spec, DType, u64)> = specs(shape)
        .into_iter()
        .enumerate()
        .flat_map(|(i, s)| {
            let seed = mix(seed, i as u64);
            match (dtype, &s.init, &s.shape[..]) {
                // Q8_0 for the matrices whose rows are whole blocks (the
                // quantizer's rule); their scale makes the same uniform range.
                (DType::Q8_0, &Init::Uniform(bound), &[rows, cols]) if cols % Q8_BLOCK == 0 => {
                    let scale = Spec {
                        name: format!("{}{Q8_SCALE_SUFFIX}", s.name),
                        shape: vec![rows, cols / Q8_BLOCK],
                        init: Init::Const(bound / 127.0),
                    };
                    vec![(s, DType::Q8_0, seed), (scale, DType::F16, 0)]
                }
                // The rest stays f32, as a quantized f32 checkpoint keeps it.
                (DType::Q8_0, ..) => vec![(s, DType::F32, seed)],
                _ => vec![(s, dtype, seed)],
            }
        })
        .collect();
    // One buffer for all (a weight file's layout): its whole 2 MiB pages
    // are huge ones, which a buffer a tensor would waste memory rounding
    // up to. Each tensor starts a cache line.
    let words_of =
        |(s, d, _): &(Spec, DType, u64)| (s.shape.iter().product::<usize>() * d.size()).div_ceil(8);
    let (starts, total) = line_starts(tensors.iter().map(words_of));
    let mut arena = LineBuf::<u64>::zeroed_huge(total);
    // Each tensor's run reaches the next one's start (the last, the end).
    let ends = starts.iter().skip(1).copied().chain([total]);
    let mut parts = Vec::with_capacity(tensors.len());
    let mut rest = &mut arena[..];
    for ((t, &start), end) in tensors.iter().zip(&starts).zip(ends) {
        let (part, tail) = rest.split_at_mut(end - start);
        parts.push(&mut part[..words_of(t)]);
        rest = tail;
    }
    tensors.par_iter().zip(parts).for_each(|((s, d, seed), part)| fill(s, *d, *seed, part));
    let entries = tensors.into_iter().zip(starts).map(|((s, d, _), at)| (s.name, d, s.shape, at)).collect();
    let store = TensorStore::from_arena(&origin, arena, entries)?;
    LoadedModel::from_parts(&origin, shape.file_config(), store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{LogitsMode, Session};
    use mamba_core::Sequential;

    const TINY: Shape = Shape { name: "tiny", d_model: 24, n_layer: 2, vocab_size: 37 };

    #[test]
    fn shape_names() {
        for n in ["130m", "mamba-130m", "mamba-130m-hf", "state-spaces/mamba-130m", "Mamba-130M-HF"] {
            assert_eq!(shape(n).unwrap().name, "mamba-130m", "{n}");
        }
        assert_eq!(shape("2.8b").unwrap().d_model, 2560);
        let e = shape("mamba-7b").unwrap_err().to_string();
        assert!(e.contains("mamba-7b") && e.contains("mamba-130m") && e.contains("mamba-2.8b"), "{e}");
    }

    #[test]
    fn fast_half_conversions_match_the_half_crate() {
        let mut rng = Rng::new(5);
        for i in 0..200_000 {
            let v = ((rng.next_f64() * 2.0 - 1.0) * if i % 2 == 0 { 0.5 } else { 1e-3 }) as f32;
            assert_eq!(bf16_bits(v), bf16::from_f32(v).to_bits(), "{v}");
            let (fast, exact) = (f16_bits(v), f16::from_f32(v));
            if v.abs() >= 2f32.powi(-14) {
                // Equal but for ties, which round up here and to even there.
                assert!(fast.abs_diff(exact.to_bits()) <= 1, "{v}");
            } else {
                assert_eq!(f16::from_bits(fast).to_f32(), 0.0);
            }
        }
        assert_eq!(bf16_bits(-1.0), bf16::from_f32(-1.0).to_bits());
        assert_eq!(f16_bits(-0.25), f16::from_f32(-0.25).to_bits());
    }

    fn first_values(m: &LoadedModel) -> Vec<f32> {
        let v = m.view().unwrap();
        let model = v.model();
        let w = model.layers[1].in_proj;
        (0..w.len()).map(|i| w.data.get(i)).chain((0..50).map(|i| model.embedding.data.get(i))).collect()
    }

    #[test]
    fn same_seed_same_weights_in_every_dtype() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let a = synthetic_model(&TINY, dtype, 7).unwrap();
            let b = synthetic_model(&TINY, dtype, 7).unwrap();
            let c = synthetic_model(&TINY, dtype, 8).unwrap();
            assert_eq!(a.dtype, dtype);
            assert_eq!(first_values(&a), first_values(&b));
            assert_ne!(first_values(&a), first_values(&c));
            let bound = 1.0 / (TINY.d_model as f32).sqrt();
            assert!(first_values(&a).iter().all(|v| v.abs() <= bound * 1.01));
        }
    }

    #[test]
    fn values_are_scaled_like_a_real_model() {
        let m = synthetic_model(&TINY, DType::F32, 1).unwrap();
        let v = m.view().unwrap();
        let model = v.model();
        let l = &model.layers[0];
        let mean_sq = |t: &mamba_core::Tensor<'_>| {
            (0..t.len()).map(|i| (t.data.get(i) as f64).powi(2)).sum::<f64>() / t.len() as f64
        };
        let emb_std = mean_sq(&model.embedding).sqrt();
        assert!((emb_std - 0.02).abs() < 0.003, "{emb_std}");
        // Uniform in ±b has mean square b²/3.
        let b2 = 1.0 / TINY.d_model as f64;
        assert!((mean_sq(&l.in_proj) / (b2 / 3.0) - 1.0).abs() < 0.1);
        // A = -exp(A_log) = -(1..=d_state) on each row; D = 1; softplus(dt bias) in [1e-3, 1e-1].
        assert_eq!(l.a.data.get(0), -1.0);
        assert!((l.a.data.get(D_STATE - 1) + D_STATE as f32).abs() < 1e-4);
        assert_eq!(l.d.data.get(3), 1.0);
        for i in 0..l.dt_bias.len() {
            let dt = mamba_core::kernels::softplus(l.dt_bias.data.get(i));
            assert!((0.99e-3..=1.01e-1).contains(&dt), "{dt}");
        }
    }

    #[test]
    fn dt_proj_is_transposed_in_blocks_where_the_avx512_kernel_reads_it() {
        use mamba_core::kernels::{dt_avx512, simd};
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::Q8_0] {
            let m = synthetic_model(&TINY, dtype, 3).unwrap();
            let v = m.view().unwrap();
            let (di, r) = (m.cfg.d_inner, m.cfg.dt_rank);
            for l in v.model().layers {
                let Some(t) = l.dt_proj_t else {
                    assert!(!simd::avx512_enabled(), "{dtype:?}: no transposed dt_proj with AVX-512 on");
                    continue;
                };
                assert!(simd::avx512_enabled(), "{dtype:?}: a transposed dt_proj nothing reads");
                assert_eq!((t.rows, t.cols), (dt_avx512::blocked_rows(di, r), dt_avx512::BLOCK));
                let mut seen = vec![false; t.len()];
                for d in 0..di {
                    for k in 0..r {
                        let at = dt_avx512::blocked_at(d, k, r);
                        assert_eq!(t.data.get(at).to_bits(), l.dt_proj.data.get(d * r + k).to_bits());
                        seen[at] = true;
                    }
                }
                // The padding of a partial last block is zero.
                assert!((0..t.len()).all(|i| seen[i] || t.data.get(i) == 0.0));
            }
        }
    }

    #[test]
    fn mamba_130m_bf16_has_the_published_parameter_count_and_runs() {
        let s = shape("mamba-130m").unwrap();
        let m = synthetic_model(s, DType::BF16, 0).unwrap();
        // transformers' MambaForCausalLM("state-spaces/mamba-130m-hf").num_parameters():
        // A_log [d_inner, d_state] counted once per layer, the tied head once.
        assert_eq!(m.parameter_count(), 129_135_360);
        assert_eq!(m.weight_bytes(), 2 * 129_135_360);
        assert_eq!((m.cfg.vocab_size, m.cfg.dt_rank, m.cfg.d_inner), (50280, 48, 1536));
        {
            // One arena, every tensor on a cache line, on pages asked to be huge.
            let v = m.view().unwrap();
            let model = v.model();
            let at = |t: &mamba_core::Tensor<'_>| match t.data {
                mamba_core::WData::BF16(d) => d.as_ptr(),
                other => panic!("{:?} in a bf16 model", other.dtype()),
            };
            for l in model.layers {
                for t in [&l.in_proj, &l.x_proj, &l.dt_proj, &l.out_proj, &l.conv_w] {
                    assert_eq!(at(t) as usize % 64, 0, "a tensor off its cache line");
                }
            }
            #[cfg(target_os = "linux")]
            assert_ne!(
                crate::aligned::advised_huge(at(&model.embedding)),
                Some(false),
                "weights on small pages"
            );
        }
        let par = Sequential;
        let mut s = Session::new(&m, &par, 2).unwrap();
        let out = s.prefill(&[&[1, 2, 3], &[4, 5]], &[0, 1], LogitsMode::Last).unwrap();
        assert!(out.iter().all(|r| r.len() == 50280 && r.iter().all(|v| v.is_finite())));
        let logits = s.step(&[6, 7], &[0, 1]).unwrap();
        assert_eq!(logits.len(), 2 * 50280);
        assert!(logits.iter().all(|v| v.is_finite()));
        assert!(logits.iter().any(|&v| v != logits[0]));
    }
}
