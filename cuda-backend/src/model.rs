//! A whole model uploaded to the device.

use mamba_core::{LayerWeights, MambaConfig, Model, Tensor};

use crate::device::CudaBackend;
use crate::error::Result;
use crate::weight::{upload_f32, upload_f32_transposed, upload_stored, DeviceWeight};

/// The device copy of a model: matrices in their stored dtype, the rest in f32
/// (see [`crate::weight`]).
pub struct DeviceModel {
    pub cfg: MambaConfig,
    embedding: DeviceWeight,
    layers: Vec<LayerWeights<DeviceWeight>>,
    norm_f: DeviceWeight,
    lm_head: Option<DeviceWeight>,
}

impl DeviceModel {
    /// Check `m`'s shapes, then copy every weight to the device.
    pub fn upload(backend: &CudaBackend, m: &Model<'_, Tensor<'_>>) -> Result<Self> {
        m.validate()?;
        let st = &backend.stream;
        let layers = m
            .layers
            .iter()
            .map(|l| {
                let opt = |w: &Option<Tensor<'_>>| w.as_ref().map(|t| upload_f32(st, t)).transpose();
                Ok(LayerWeights {
                    norm: upload_f32(st, &l.norm)?,
                    in_proj: upload_stored(st, &l.in_proj)?,
                    in_proj_bias: opt(&l.in_proj_bias)?,
                    conv_w: upload_f32(st, &l.conv_w)?,
                    conv_b: opt(&l.conv_b)?,
                    x_proj: upload_stored(st, &l.x_proj)?,
                    // Transposed, [dt_rank, d_inner]: a warp of the dt kernel reads 32 channels of one rank.
                    dt_proj: upload_f32_transposed(st, &l.dt_proj)?,
                    dt_proj_t: None,
                    dt_bias: upload_f32(st, &l.dt_bias)?,
                    a: upload_f32(st, &l.a)?,
                    d: upload_f32(st, &l.d)?,
                    out_proj: upload_stored(st, &l.out_proj)?,
                    out_proj_bias: opt(&l.out_proj_bias)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = DeviceModel {
            cfg: m.cfg,
            embedding: upload_stored(st, &m.embedding)?,
            layers,
            norm_f: upload_f32(st, &m.norm_f)?,
            lm_head: m.lm_head.as_ref().map(|t| upload_stored(st, t)).transpose()?,
        };
        backend.synchronize()?;
        Ok(model)
    }

    /// The core's view of the model (shares the device memory).
    pub fn model(&self) -> Model<'_, DeviceWeight> {
        Model {
            cfg: self.cfg,
            embedding: self.embedding.clone(),
            layers: &self.layers,
            norm_f: self.norm_f.clone(),
            lm_head: self.lm_head.clone(),
        }
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.each().map(DeviceWeight::nbytes).sum::<usize>()).sum();
        layers
            + self.embedding.nbytes()
            + self.norm_f.nbytes()
            + self.lm_head.as_ref().map_or(0, DeviceWeight::nbytes)
    }

    /// Bytes of weights one decode step reads: every layer and the head
    /// (the embedding only for the looked-up rows, counted as none when untied).
    pub fn step_weight_bytes(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.each().map(DeviceWeight::nbytes).sum::<usize>()).sum();
        let head = self.lm_head.as_ref().unwrap_or(&self.embedding).nbytes();
        layers + self.norm_f.nbytes() + head
    }
}
