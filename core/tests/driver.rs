//! The core on its own: a tiny model held in plain arrays, run through the
//! driver with the CPU backend, checked for chunk and batch invariance and
//! for its errors.

mod common;

use half::bf16;
use mamba_core::{
    driver, CoreError, CpuBackend, LayerWeights, MambaConfig, Model, Ragged, ScratchPlan, Tensor, WData,
};

const CFG: MambaConfig = MambaConfig {
    d_model: 8,
    d_inner: 16,
    d_state: 4,
    d_conv: 3,
    dt_rank: 2,
    n_layer: 2,
    vocab_size: 11,
    eps: 1e-5,
    use_bias: true,
    use_conv_bias: true,
    residual_in_fp32: true,
    tie_embeddings: true,
};

/// Deterministic pseudo-random values in [-scale, scale].
fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    common::values(n, seed, -scale, scale)
}

struct Owned {
    emb: Vec<bf16>,
    layers: Vec<[Vec<f32>; 12]>,
    norm_f: Vec<f32>,
}

fn owned() -> Owned {
    let c = CFG;
    let (dm, di, n, k, r) = (c.d_model, c.d_inner, c.d_state, c.d_conv, c.dt_rank);
    let emb = values(c.vocab_size * dm, 1, 1.0).into_iter().map(bf16::from_f32).collect();
    let layers = (0..c.n_layer as u32)
        .map(|l| {
            let s = 10 * (l + 1);
            [
                values(dm, s, 0.2).iter().map(|v| v + 1.0).collect(),
                values(2 * di * dm, s + 1, 0.4),
                values(2 * di, s + 2, 0.1),
                values(di * k, s + 3, 0.5),
                values(di, s + 4, 0.1),
                values((r + 2 * n) * di, s + 5, 0.3),
                values(di * r, s + 6, 0.5),
                values(di, s + 7, 1.0).iter().map(|v| v - 2.0).collect(),
                (0..di * n).map(|i| -((i % n) as f32 + 1.0)).collect(),
                values(di, s + 8, 0.2).iter().map(|v| v + 1.0).collect(),
                values(dm * di, s + 9, 0.3),
                values(dm, s + 10, 0.1),
            ]
        })
        .collect();
    Owned { emb, layers, norm_f: values(dm, 99, 0.1).iter().map(|v| v + 1.0).collect() }
}

fn t(v: &[f32], rows: usize, cols: usize) -> Tensor<'_> {
    Tensor::new(WData::F32(v), rows, cols, "test").unwrap()
}

fn layers(o: &Owned) -> Vec<LayerWeights<Tensor<'_>>> {
    let c = CFG;
    let (dm, di, n, k, r) = (c.d_model, c.d_inner, c.d_state, c.d_conv, c.dt_rank);
    o.layers
        .iter()
        .map(|w| LayerWeights {
            norm: t(&w[0], 1, dm),
            in_proj: t(&w[1], 2 * di, dm),
            in_proj_bias: Some(t(&w[2], 1, 2 * di)),
            conv_w: t(&w[3], di, k),
            conv_b: Some(t(&w[4], 1, di)),
            x_proj: t(&w[5], r + 2 * n, di),
            dt_proj: t(&w[6], di, r),
            dt_proj_t: None,
            dt_bias: t(&w[7], 1, di),
            a: t(&w[8], di, n),
            d: t(&w[9], 1, di),
            out_proj: t(&w[10], dm, di),
            out_proj_bias: Some(t(&w[11], 1, dm)),
        })
        .collect()
}

fn model<'a>(o: &'a Owned, layers: &'a [LayerWeights<Tensor<'a>>]) -> Model<'a, Tensor<'a>> {
    Model {
        cfg: CFG,
        embedding: Tensor::new(WData::BF16(&o.emb), CFG.vocab_size, CFG.d_model, "emb").unwrap(),
        layers,
        norm_f: t(&o.norm_f, 1, CFG.d_model),
        lm_head: None,
    }
}

/// Prefill `seqs` as one ragged batch into slots 0..n; all-position logits per sequence.
fn prefill(
    m: &Model<'_, Tensor<'_>>,
    seqs: &[&[u32]],
    states: &mut [f32],
) -> Result<Vec<Vec<f32>>, CoreError> {
    let tokens: Vec<u32> = seqs.concat();
    let mut offsets = vec![0];
    for s in seqs {
        offsets.push(offsets.last().unwrap() + s.len());
    }
    let slots: Vec<usize> = (0..seqs.len()).collect();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let plan = ScratchPlan::new(&CFG, tokens.len(), rows.len());
    let mut buf = vec![0.0; plan.total()];
    let mut s = plan.split(&mut buf)?;
    let batch = Ragged { offsets: &offsets, slots: &slots };
    driver::prefill(&CpuBackend::default(), m, &tokens, batch, &rows, states, &mut s)?;
    let v = CFG.vocab_size;
    Ok(seqs.iter().enumerate().map(|(i, _)| s.logits[offsets[i] * v..offsets[i + 1] * v].to_vec()).collect())
}

fn step(
    m: &Model<'_, Tensor<'_>>,
    tokens: &[u32],
    slots: &[usize],
    states: &mut [f32],
) -> Result<Vec<f32>, CoreError> {
    let plan = ScratchPlan::new(&CFG, tokens.len(), tokens.len());
    let mut buf = vec![0.0; plan.total()];
    let mut s = plan.split(&mut buf)?;
    driver::step(&CpuBackend::default(), m, tokens, slots, states, &mut s)?;
    Ok(s.logits[..tokens.len() * CFG.vocab_size].to_vec())
}

fn slot_len() -> usize {
    CFG.state_layout().slot_len()
}

fn close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}: index {i}: {x} vs {y}");
    }
}

#[test]
fn state_size_is_independent_of_sequence_length() {
    let fp = CFG.footprint();
    assert_eq!(fp.state_bytes_per_seq(), 2 * 16 * (3 + 4) * 4);
    assert!(fp.prefill_scratch_bytes(100, 1) > fp.prefill_scratch_bytes(10, 1));
}

#[test]
fn step_path_equals_prefill_path_at_every_position() {
    let o = owned();
    let l = layers(&o);
    let m = model(&o, &l);
    m.validate().unwrap();
    let seq: Vec<u32> = (0..23).map(|i| (i * 7 % 11) as u32).collect();
    let mut a = vec![0.0; slot_len()];
    let whole = prefill(&m, &[&seq], &mut a).unwrap().remove(0);
    let mut b = vec![0.0; slot_len()];
    let v = CFG.vocab_size;
    for (pos, &tok) in seq.iter().enumerate() {
        let row = step(&m, &[tok], &[0], &mut b).unwrap();
        close(&row, &whole[pos * v..(pos + 1) * v], 1e-5, &format!("position {pos}"));
    }
    close(&a, &b, 1e-5, "final states");
}

#[test]
fn prefill_in_pieces_from_saved_state_equals_one_piece() {
    let o = owned();
    let l = layers(&o);
    let m = model(&o, &l);
    let seq: Vec<u32> = (0..40).map(|i| (i * 5 % 11) as u32).collect();
    let mut whole_state = vec![0.0; slot_len()];
    let whole = prefill(&m, &[&seq], &mut whole_state).unwrap().remove(0);
    // Pieces shorter than d_conv exercise the conv history carried in the state.
    for cut in [[1, 2], [2, 3], [5, 20], [39, 39]] {
        let mut st = vec![0.0; slot_len()];
        let mut got = vec![];
        for piece in [&seq[..cut[0]], &seq[cut[0]..cut[1]], &seq[cut[1]..]] {
            if !piece.is_empty() {
                got.extend(prefill(&m, &[piece], &mut st).unwrap().remove(0));
            }
        }
        assert_eq!(got, whole, "cut {cut:?}");
        assert_eq!(st, whole_state, "cut {cut:?}");
    }
}

#[test]
fn ragged_sequences_keep_their_own_state() {
    let o = owned();
    let l = layers(&o);
    let m = model(&o, &l);
    let seqs: [&[u32]; 3] = [&[1, 2, 3, 4, 5], &[6], &[7, 8, 9, 10, 0, 1, 2]];
    let mut together = vec![0.0; 3 * slot_len()];
    let all = prefill(&m, &seqs, &mut together).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let mut alone = vec![0.0; slot_len()];
        let one = prefill(&m, &[s], &mut alone).unwrap().remove(0);
        assert_eq!(one, all[i], "sequence {i}");
        assert_eq!(alone[..], together[i * slot_len()..(i + 1) * slot_len()], "state {i}");
    }
}

#[test]
fn bad_batches_and_inputs_are_errors_not_panics() {
    let o = owned();
    let l = layers(&o);
    let m = model(&o, &l);
    let mut states = vec![0.0; 2 * slot_len()];
    let e = prefill(&m, &[&[3, 11]], &mut states).unwrap_err();
    assert_eq!(e, CoreError::TokenOutOfRange { token: 11, vocab: 11 });
    let e = step(&m, &[1, 2], &[0, 0], &mut states).unwrap_err();
    assert!(matches!(e, CoreError::BadBatch(_)), "{e}");
    let e = step(&m, &[1], &[2], &mut states).unwrap_err();
    assert_eq!(e, CoreError::SlotOutOfRange { slot: 2, slots: 2 });
    let e = step(&m, &[1], &[0, 1], &mut states).unwrap_err();
    assert!(matches!(e, CoreError::BadBatch(_)), "{e}");
    // Offsets that do not cover the tokens.
    let plan = ScratchPlan::new(&CFG, 3, 1);
    let mut buf = vec![0.0; plan.total()];
    let mut s = plan.split(&mut buf).unwrap();
    let bad = Ragged { offsets: &[0, 2], slots: &[0] };
    let e =
        driver::prefill(&CpuBackend::default(), &m, &[1, 2, 3], bad, &[2], &mut states, &mut s).unwrap_err();
    assert!(matches!(e, CoreError::BadBatch(_)), "{e}");
    let ok = Ragged { offsets: &[0, 3], slots: &[0] };
    let e =
        driver::prefill(&CpuBackend::default(), &m, &[1, 2, 3], ok, &[3], &mut states, &mut s).unwrap_err();
    assert!(matches!(e, CoreError::BadBatch(_)), "a logits row past the end: {e}");
    // A scratch buffer that is too small.
    let mut small = vec![0.0; 10];
    assert!(matches!(plan.split(&mut small), Err(CoreError::BufferTooSmall { .. })));
    // Weights of the wrong shape are caught by validate.
    let mut wrong = layers(&o);
    wrong[1].x_proj = t(&o.layers[1][5][..(2 + 7) * 16], 9, 16);
    let m2 = model(&o, &wrong);
    assert!(matches!(m2.validate(), Err(CoreError::BadShape { what: "x_proj", .. })));
}
