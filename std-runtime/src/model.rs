//! A loaded model: configuration, tensors, and the core's view of them.
//!
//! Tensor names are those of both layouts: `backbone.embeddings.weight`
//! (Hugging Face) or `backbone.embedding.weight` (original), then
//! `backbone.layers.{i}.norm.weight`, `backbone.layers.{i}.mixer.*`,
//! `backbone.norm_f.weight` and `lm_head.weight` (absent when tied).

use std::path::{Path, PathBuf};

use mamba_core::{
    kernels::{a_from_a_log, dt_avx512},
    DType, LayerWeights, MambaConfig, Model, Tensor, WData,
};

use crate::aligned::{line_starts, LineBuf};
use crate::config::{FileConfig, Layout};
use crate::error::{Error, Result};
use crate::hub::resolve_model_dir;
use crate::weights::{RawTensor, TensorStore};

const EMBEDDING_NAMES: [&str; 2] = ["backbone.embeddings.weight", "backbone.embedding.weight"];

/// A model ready to run: its files, configuration and weights.
pub struct LoadedModel {
    pub dir: PathBuf,
    pub file_config: FileConfig,
    /// Dimensions as the core runs them (`vocab_size` = embedding rows).
    pub cfg: MambaConfig,
    /// Stored dtype of the large matrices.
    pub dtype: DType,
    /// Stored bytes of one layer's A_log.
    a_log_bytes: usize,
    store: TensorStore,
    /// `A = -exp(A_log)`, `[n_layer, d_inner * d_state]`, computed once
    /// (one buffer: on huge pages, [`LineBuf`]).
    a: LineBuf,
    /// dt_proj transposed (see [`Transposed`]); empty where no kernel reads it.
    dt_proj_t: Transposed,
    embedding_name: &'static str,
    lm_head: bool,
}

/// The core's view of a loaded model (`layers` owned here).
pub struct ModelView<'a> {
    cfg: MambaConfig,
    embedding: Tensor<'a>,
    layers: Vec<LayerWeights<Tensor<'a>>>,
    norm_f: Tensor<'a>,
    lm_head: Option<Tensor<'a>>,
}

impl<'a> ModelView<'a> {
    /// The [`Model`] the core's driver runs.
    pub fn model(&self) -> Model<'_, Tensor<'a>> {
        Model {
            cfg: self.cfg,
            embedding: self.embedding,
            layers: &self.layers,
            norm_f: self.norm_f,
            lm_head: self.lm_head,
        }
    }
}

fn shape_err(t: &RawTensor<'_>, expected: &[usize]) -> Error {
    Error::TensorShape {
        name: t.name.to_string(),
        file: t.file.to_path_buf(),
        expected: expected.to_vec(),
        got: t.shape.to_vec(),
    }
}

/// View tensor `name` as `[rows, cols]` after checking its stored shape
/// equals `expected`. A Q8_0 tensor (int8 quants) takes its scales from
/// `<name>_scale`, `[rows, cols / 32]` f16.
fn view<'a>(
    store: &'a TensorStore,
    name: &str,
    expected: &[usize],
    rows: usize,
    cols: usize,
) -> Result<Tensor<'a>> {
    let t = store.get(name)?;
    if t.shape != expected {
        return Err(shape_err(&t, expected));
    }
    let what = "checkpoint tensor";
    if t.dtype != DType::Q8_0 {
        return Ok(Tensor::from_bytes(t.dtype, t.bytes, rows, cols, what)?);
    }
    let scale = store.get(&format!("{name}{Q8_SCALE_SUFFIX}"))?;
    let want = [rows, cols.div_ceil(mamba_core::Q8_BLOCK)];
    if scale.dtype != DType::F16 || scale.shape != want || !cols.is_multiple_of(mamba_core::Q8_BLOCK) {
        return Err(Error::Unsupported {
            path: t.file.to_path_buf(),
            msg: format!(
                "Q8_0 tensor `{name}` ({rows} x {cols}) needs rows of whole 32-weight blocks and an F16 \
                 `{}` of shape {want:?}; found {} {:?}",
                scale.name,
                scale.dtype.name(),
                scale.shape
            ),
        });
    }
    Ok(Tensor::from_q8_bytes(t.bytes, scale.bytes, rows, cols, what)?)
}

/// Every layer's dt_proj (`[d_inner, dt_rank]`) transposed in blocks of 64
/// channels ([`dt_avx512::blocked_at`]) in its dtype, for the AVX-512
/// dt_proj kernel (which the SIMD switch turns on before the model loads),
/// in one buffer (on huge pages, as the weights: [`LineBuf`]). A Q8_0
/// weight is not transposed (its blocks run along the rows).
#[derive(Default)]
struct Transposed {
    words: LineBuf<u64>,
    /// Per layer: the dtype and the first word (on a cache line), or `None`.
    layers: Vec<Option<(DType, usize)>>,
}

impl Transposed {
    fn of(dt_proj: &[Tensor<'_>]) -> Self {
        // Bytes of a layer's layout; none for Q8_0.
        let size = |t: &Tensor<'_>| match t.dtype() {
            DType::Q8_0 => 0,
            d => dt_avx512::blocked_rows(t.rows, t.cols) * dt_avx512::BLOCK * d.size(),
        };
        let (starts, total) = line_starts(dt_proj.iter().map(|t| size(t).div_ceil(8)));
        let layers: Vec<_> = dt_proj
            .iter()
            .zip(starts)
            .map(|(t, at)| (t.dtype() != DType::Q8_0).then_some((t.dtype(), at)))
            .collect();
        let mut words = LineBuf::<u64>::zeroed_huge(total);
        fn flip<T: bytemuck::Pod>(v: &[T], di: usize, r: usize, out: &mut [u64]) {
            let out = &mut bytemuck::cast_slice_mut::<u64, T>(out)
                [..dt_avx512::blocked_rows(di, r) * dt_avx512::BLOCK];
            dt_avx512::to_blocked(v, di, r, out);
        }
        for (t, at) in dt_proj.iter().zip(&layers) {
            let Some((_, w0)) = *at else { continue };
            let out = &mut words[w0..w0 + size(t).div_ceil(8)];
            match t.data {
                WData::F32(v) => flip(v, t.rows, t.cols, out),
                WData::F16(v) => flip(v, t.rows, t.cols, out),
                WData::BF16(v) => flip(v, t.rows, t.cols, out),
                WData::Q8_0 { .. } => {}
            }
        }
        Transposed { words, layers }
    }

    /// Layer `i`'s view of the layout, for a `[d_inner, dt_rank]` dt_proj.
    fn tensor(&self, i: usize, d_inner: usize, dt_rank: usize) -> Result<Option<Tensor<'_>>> {
        let Some(&Some((dtype, w0))) = self.layers.get(i) else { return Ok(None) };
        let rows = dt_avx512::blocked_rows(d_inner, dt_rank);
        let len = rows * dt_avx512::BLOCK * dtype.size();
        let bytes = &bytemuck::cast_slice::<u64, u8>(&self.words[w0..])[..len];
        Ok(Some(Tensor::from_bytes(dtype, bytes, rows, dt_avx512::BLOCK, "dt_proj transposed")?))
    }
}

/// The name of a Q8_0 weight's scales: the weight's name and this.
pub const Q8_SCALE_SUFFIX: &str = "_scale";

impl LoadedModel {
    /// Load `spec`: a model directory, or `ORG/NAME` from the local Hugging Face cache.
    pub fn load(spec: &str) -> Result<Self> {
        let dir = resolve_model_dir(spec)?;
        Self::load_dir(&dir)
    }

    /// Load a model directory.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let file_config = FileConfig::read(dir)?;
        let store = TensorStore::open(dir)?;
        Self::from_parts(dir, file_config, store)
    }

    /// A model from a configuration and tensors already at hand (`dir` names
    /// where they came from, for messages).
    pub fn from_parts(dir: &Path, file_config: FileConfig, store: TensorStore) -> Result<Self> {
        let fc = &file_config;
        let embedding_name = *EMBEDDING_NAMES.iter().find(|n| store.contains(n)).ok_or_else(|| {
            let name = EMBEDDING_NAMES[usize::from(fc.layout == Layout::Original)];
            Error::MissingTensor { name: name.into(), dir: dir.to_path_buf() }
        })?;
        let emb = store.get(embedding_name)?;
        if emb.shape.len() != 2 || emb.shape[1] != fc.d_model {
            return Err(shape_err(&emb, &[fc.padded_vocab_size, fc.d_model]));
        }
        // The vocabulary comes from the embedding: checkpoints pad it.
        let vocab_rows = emb.shape[0];
        if vocab_rows < fc.vocab_size && fc.layout == Layout::Original {
            return Err(shape_err(&emb, &[fc.padded_vocab_size, fc.d_model]));
        }
        let dtype = emb.dtype;
        // A checkpoint without `lm_head.weight` has tied embeddings, whatever its config says.
        let lm_head = !fc.tie_embeddings && store.contains("lm_head.weight");
        let cfg = MambaConfig {
            d_model: fc.d_model,
            d_inner: fc.d_inner,
            d_state: fc.d_state,
            d_conv: fc.d_conv,
            dt_rank: fc.dt_rank,
            n_layer: fc.n_layer,
            vocab_size: vocab_rows,
            eps: fc.eps,
            use_bias: fc.use_bias,
            use_conv_bias: fc.use_conv_bias,
            residual_in_fp32: fc.residual_in_fp32,
            tie_embeddings: !lm_head,
        };
        cfg.validate().map_err(|e| {
            let msg = match e {
                mamba_core::CoreError::BadConfig(why) => why.to_string(),
                e => e.to_string(),
            };
            Error::Unsupported { path: dir.join("config.json"), msg }
        })?;
        // No capacity from n_layer: a huge one in config.json fails on a
        // missing layer, not an allocation (A's buffer is made once all are found).
        let mut a_log = Vec::new();
        for i in 0..cfg.n_layer {
            let name = format!("backbone.layers.{i}.mixer.A_log");
            let t = view(&store, &name, &[cfg.d_inner, cfg.d_state], cfg.d_inner, cfg.d_state)?;
            t.expect_float("A_log")?;
            a_log.push(t);
        }
        let a_log_bytes = a_log.last().map_or(0, Tensor::nbytes);
        let per = cfg.d_inner * cfg.d_state;
        let mut a = LineBuf::zeroed_huge(cfg.n_layer * per);
        for (t, out) in a_log.iter().zip(a.chunks_exact_mut(per.max(1))) {
            a_from_a_log(t.data, out);
        }
        drop(a_log);
        let mut model = LoadedModel {
            dir: dir.to_path_buf(),
            file_config,
            cfg,
            dtype,
            a_log_bytes,
            store,
            a,
            dt_proj_t: Transposed::default(),
            embedding_name,
            lm_head,
        };
        // Resolve every tensor once so a bad checkpoint fails here, not mid-run.
        let view = model.view()?;
        view.model().validate()?;
        // The kernels are chosen before the weights are laid out for them.
        crate::cpu::init_simd();
        if mamba_core::kernels::simd::avx512_enabled() {
            let dt_proj: Vec<Tensor<'_>> = view.layers.iter().map(|l| l.dt_proj).collect();
            model.dt_proj_t = Transposed::of(&dt_proj);
        }
        Ok(model)
    }

    /// The real vocabulary size: ids the sampler may produce.
    pub fn sample_vocab(&self) -> usize {
        self.file_config.vocab_size.clamp(1, self.cfg.vocab_size)
    }

    /// Build the core's view of the weights.
    pub fn view(&self) -> Result<ModelView<'_>> {
        let c = &self.cfg;
        let (dm, di, n, k, r) = (c.d_model, c.d_inner, c.d_state, c.d_conv, c.dt_rank);
        // Saturating: an absurd dt_rank is a shape mismatch, not an overflow.
        let xp = r.saturating_add(2 * n);
        let s = &self.store;
        let t = |name: &str, shape: &[usize], rows: usize, cols: usize| view(s, name, shape, rows, cols);
        let opt = |name: &str,
                   shape: &[usize],
                   rows: usize,
                   cols: usize,
                   want: bool|
         -> Result<Option<Tensor<'_>>> {
            if want {
                t(name, shape, rows, cols).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("backbone.layers.{i}");
            let m = format!("{p}.mixer");
            layers.push(LayerWeights {
                norm: t(&format!("{p}.norm.weight"), &[dm], 1, dm)?,
                in_proj: t(&format!("{m}.in_proj.weight"), &[2 * di, dm], 2 * di, dm)?,
                in_proj_bias: opt(&format!("{m}.in_proj.bias"), &[2 * di], 1, 2 * di, c.use_bias)?,
                conv_w: t(&format!("{m}.conv1d.weight"), &[di, 1, k], di, k)?,
                conv_b: opt(&format!("{m}.conv1d.bias"), &[di], 1, di, c.use_conv_bias)?,
                x_proj: t(&format!("{m}.x_proj.weight"), &[xp, di], xp, di)?,
                dt_proj: t(&format!("{m}.dt_proj.weight"), &[di, r], di, r)?,
                dt_proj_t: self.dt_proj_t.tensor(i, di, r)?,
                dt_bias: t(&format!("{m}.dt_proj.bias"), &[di], 1, di)?,
                a: Tensor::new(mamba_core::WData::F32(&self.a[i * di * n..(i + 1) * di * n]), di, n, "A")?,
                d: t(&format!("{m}.D"), &[di], 1, di)?,
                out_proj: t(&format!("{m}.out_proj.weight"), &[dm, di], dm, di)?,
                out_proj_bias: opt(&format!("{m}.out_proj.bias"), &[dm], 1, dm, c.use_bias)?,
            });
        }
        let v = c.vocab_size;
        Ok(ModelView {
            cfg: *c,
            embedding: t(self.embedding_name, &[v, dm], v, dm)?,
            layers,
            norm_f: t("backbone.norm_f.weight", &[dm], 1, dm)?,
            lm_head: if self.lm_head { Some(t("lm_head.weight", &[v, dm], v, dm)?) } else { None },
        })
    }

    /// Parameters stored (the tied head counted once).
    pub fn parameter_count(&self) -> usize {
        self.view().map_or(0, |v| {
            let m = v.model();
            let layers: usize = m.layers.iter().flat_map(|l| l.each()).map(Tensor::len).sum();
            layers + m.embedding.len() + m.norm_f.len() + m.lm_head.map_or(0, |h| h.len())
        })
    }

    /// Bytes of stored weights (A counted as its stored A_log).
    pub fn weight_bytes(&self) -> usize {
        self.view().map_or(0, |v| {
            let m = v.model();
            let layers: usize = m
                .layers
                .iter()
                .map(|l| l.each().map(Tensor::nbytes).sum::<usize>() - l.a.nbytes() + self.a_log_bytes)
                .sum();
            layers + m.embedding.nbytes() + m.norm_f.nbytes() + m.lm_head.map_or(0, |h| h.nbytes())
        })
    }

    /// Every stored tensor, by name.
    pub fn tensors(&self) -> &TensorStore {
        &self.store
    }

    /// The weight files read.
    pub fn weight_files(&self) -> &[PathBuf] {
        &self.store.files
    }
}
