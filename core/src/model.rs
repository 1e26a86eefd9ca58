//! The weights of a model, generic over how a backend holds a weight.

use crate::config::MambaConfig;

/// One Mamba block's weights. Shapes (rows, cols) as the checkpoints store them:
/// - `norm`: `[1, d_model]`
/// - `in_proj`: `[2*d_inner, d_model]`, `in_proj_bias`: `[1, 2*d_inner]`
/// - `conv_w`: `[d_inner, d_conv]` (the checkpoint's `[d_inner, 1, d_conv]`), `conv_b`: `[1, d_inner]`
/// - `x_proj`: `[dt_rank + 2*d_state, d_inner]`
/// - `dt_proj`: `[d_inner, dt_rank]`, `dt_bias`: `[1, d_inner]`
/// - `dt_proj_t`: `dt_proj` transposed in blocks of 64 channels,
///   `[ceil(d_inner / 64) * dt_rank, 64]` (see
///   [`crate::kernels::dt_avx512::blocked_at`]), in the same dtype, where
///   the host made it: the CPU backend's AVX-512 kernel reads it (a short
///   row's dot product is mostly its horizontal sum). Not a stored weight,
///   so [`LayerWeights::each`] leaves it out
/// - `a`: `[d_inner, d_state]`, f32, already `-exp(A_log)` (see [`crate::kernels::a_from_a_log`])
/// - `d`: `[1, d_inner]`
/// - `out_proj`: `[d_model, d_inner]`, `out_proj_bias`: `[1, d_model]`
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<W> {
    pub norm: W,
    pub in_proj: W,
    pub in_proj_bias: Option<W>,
    pub conv_w: W,
    pub conv_b: Option<W>,
    pub x_proj: W,
    pub dt_proj: W,
    pub dt_proj_t: Option<W>,
    pub dt_bias: W,
    pub a: W,
    pub d: W,
    pub out_proj: W,
    pub out_proj_bias: Option<W>,
}

impl<W> LayerWeights<W> {
    /// Every weight of the layer (biases only when present).
    pub fn each(&self) -> impl Iterator<Item = &W> {
        [
            Some(&self.norm),
            Some(&self.in_proj),
            self.in_proj_bias.as_ref(),
            Some(&self.conv_w),
            self.conv_b.as_ref(),
            Some(&self.x_proj),
            Some(&self.dt_proj),
            Some(&self.dt_bias),
            Some(&self.a),
            Some(&self.d),
            Some(&self.out_proj),
            self.out_proj_bias.as_ref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// A whole model. `layers` is caller storage (a `Vec`, a static array).
#[derive(Clone, Copy, Debug)]
pub struct Model<'m, W> {
    pub cfg: MambaConfig,
    /// `[vocab_size, d_model]`
    pub embedding: W,
    pub layers: &'m [LayerWeights<W>],
    /// `[1, d_model]`
    pub norm_f: W,
    /// `[vocab_size, d_model]`; `None` when tied to the embedding.
    pub lm_head: Option<W>,
}

impl<W> Model<'_, W> {
    /// The head's weight: its own, or the embedding when tied.
    pub fn head(&self) -> &W {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }
}

use crate::error::CoreError;
use crate::tensor::Tensor;

impl LayerWeights<Tensor<'_>> {
    /// Check every weight has the shape `cfg` implies.
    pub fn validate(&self, cfg: &MambaConfig) -> Result<(), CoreError> {
        let (dm, di, xp) = (cfg.d_model, cfg.d_inner, cfg.x_proj_dim());
        self.norm.expect_shape("norm", 1, dm)?;
        self.in_proj.expect_shape("in_proj", 2 * di, dm)?;
        if let Some(b) = &self.in_proj_bias {
            b.expect_shape("in_proj bias", 1, 2 * di)?;
        }
        self.conv_w.expect_shape("conv1d weight", di, cfg.d_conv)?;
        if let Some(b) = &self.conv_b {
            b.expect_shape("conv1d bias", 1, di)?;
        }
        self.x_proj.expect_shape("x_proj", xp, di)?;
        self.dt_proj.expect_shape("dt_proj weight", di, cfg.dt_rank)?;
        if let Some(t) = &self.dt_proj_t {
            let rows = crate::kernels::dt_avx512::blocked_rows(di, cfg.dt_rank);
            t.expect_shape("dt_proj weight transposed", rows, crate::kernels::dt_avx512::BLOCK)?;
        }
        self.dt_bias.expect_shape("dt_proj bias", 1, di)?;
        self.a.expect_shape("A", di, cfg.d_state)?;
        self.d.expect_shape("D", 1, di)?;
        self.out_proj.expect_shape("out_proj", dm, di)?;
        if let Some(b) = &self.out_proj_bias {
            b.expect_shape("out_proj bias", 1, dm)?;
        }
        let vectors = [
            ("norm", Some(&self.norm)),
            ("in_proj bias", self.in_proj_bias.as_ref()),
            ("conv1d weight", Some(&self.conv_w)),
            ("conv1d bias", self.conv_b.as_ref()),
            ("dt_proj bias", Some(&self.dt_bias)),
            ("A", Some(&self.a)),
            ("D", Some(&self.d)),
            ("out_proj bias", self.out_proj_bias.as_ref()),
        ];
        vectors.into_iter().try_for_each(|(what, t)| t.map_or(Ok(()), |t| t.expect_float(what)))
    }
}

impl Model<'_, Tensor<'_>> {
    /// Check the configuration and every weight's shape.
    pub fn validate(&self) -> Result<(), CoreError> {
        let cfg = &self.cfg;
        cfg.validate()?;
        if self.layers.len() != cfg.n_layer {
            return Err(CoreError::BadConfig("the number of layer weights differs from n_layer"));
        }
        self.embedding.expect_shape("embedding", cfg.vocab_size, cfg.d_model)?;
        self.norm_f.expect_shape("norm_f", 1, cfg.d_model)?;
        self.norm_f.expect_float("norm_f")?;
        if let Some(h) = &self.lm_head {
            h.expect_shape("lm_head", cfg.vocab_size, cfg.d_model)?;
        }
        self.layers.iter().try_for_each(|l| l.validate(cfg))
    }
}
