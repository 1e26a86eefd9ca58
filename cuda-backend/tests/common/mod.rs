//! Helpers shared by the GPU and the emulated-kernel tests.
#![allow(dead_code)]

use mamba_core::{driver, CpuBackend, LayerWeights, MambaConfig, Model, ScratchPlan, Tensor, WData};

/// A random f32 model with the given state size, built in memory.
pub struct HostModel {
    pub cfg: MambaConfig,
    mats: Vec<Vec<f32>>,
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

impl HostModel {
    pub fn new(d_state: usize, d_conv: usize, bias: bool) -> HostModel {
        let cfg = MambaConfig {
            d_model: 64,
            d_inner: 128,
            d_state,
            d_conv,
            dt_rank: 4,
            n_layer: 2,
            vocab_size: 97,
            eps: 1e-5,
            use_bias: bias,
            use_conv_bias: bias,
            residual_in_fp32: true,
            tie_embeddings: true,
        };
        let mut seed = d_state as u64 * 7919 + d_conv as u64;
        let mut r = |n: usize, scale: f32| (0..n).map(|_| lcg(&mut seed) * scale).collect::<Vec<f32>>();
        let (dm, di, xp) = (cfg.d_model, cfg.d_inner, cfg.x_proj_dim());
        let mut mats = vec![r(cfg.vocab_size * dm, 1.0), r(dm, 0.1).iter().map(|v| 1.0 + v).collect()];
        for _ in 0..cfg.n_layer {
            mats.push(r(dm, 0.1).iter().map(|v| 1.0 + v).collect()); // norm
            mats.push(r(2 * di * dm, 0.125)); // in_proj
            mats.push(r(2 * di, 0.1)); // in_proj bias
            mats.push(r(di * d_conv, 0.5)); // conv w
            mats.push(r(di, 0.1)); // conv b
            mats.push(r(xp * di, 0.09)); // x_proj
            mats.push(r(di * cfg.dt_rank, 0.5)); // dt_proj
            mats.push(r(di, 1.0).iter().map(|v| v - 3.0).collect()); // dt bias
            mats.push((0..di * d_state).map(|i| -(1.0 + (i % d_state) as f32)).collect()); // A
            mats.push(vec![1.0; di]); // D
            mats.push(r(dm * di, 0.09)); // out_proj
            mats.push(r(dm, 0.1)); // out_proj bias
        }
        HostModel { cfg, mats }
    }

    pub fn model(&self) -> (Vec<LayerWeights<Tensor<'_>>>, Tensor<'_>, Tensor<'_>) {
        let c = &self.cfg;
        let t = |i: usize, rows: usize, cols: usize| {
            Tensor::new(WData::F32(&self.mats[i]), rows, cols, "w").unwrap()
        };
        let (dm, di) = (c.d_model, c.d_inner);
        let layers = (0..c.n_layer)
            .map(|l| {
                let b = 2 + l * 12;
                LayerWeights {
                    norm: t(b, 1, dm),
                    in_proj: t(b + 1, 2 * di, dm),
                    in_proj_bias: c.use_bias.then(|| t(b + 2, 1, 2 * di)),
                    conv_w: t(b + 3, di, c.d_conv),
                    conv_b: c.use_conv_bias.then(|| t(b + 4, 1, di)),
                    x_proj: t(b + 5, c.x_proj_dim(), di),
                    dt_proj: t(b + 6, di, c.dt_rank),
                    dt_proj_t: None,
                    dt_bias: t(b + 7, 1, di),
                    a: t(b + 8, di, c.d_state),
                    d: t(b + 9, 1, di),
                    out_proj: t(b + 10, dm, di),
                    out_proj_bias: c.use_bias.then(|| t(b + 11, 1, dm)),
                }
            })
            .collect();
        (layers, t(0, c.vocab_size, dm), t(1, 1, dm))
    }
}

/// CPU logits of every position of one prompt (the reference backend).
pub fn cpu_all_logits(m: &Model<'_, Tensor<'_>>, ids: &[u32]) -> Vec<f32> {
    let cfg = m.cfg;
    let plan = ScratchPlan::new(&cfg, ids.len(), ids.len());
    let mut buf = vec![0.0f32; plan.total()];
    let mut s = plan.split(&mut buf).unwrap();
    let mut states = vec![0.0f32; cfg.state_layout().slot_len()];
    let rows: Vec<usize> = (0..ids.len()).collect();
    let batch = mamba_core::Ragged { offsets: &[0, ids.len()], slots: &[0] };
    driver::prefill(&CpuBackend::default(), m, ids, batch, &rows, &mut states, &mut s).unwrap();
    s.logits[..ids.len() * cfg.vocab_size].to_vec()
}
