//! Scoring text: perplexity over a token sequence of any length.
//!
//! The sequence is fed in windows that carry the recurrent state from one
//! to the next (a Mamba state is the whole past), so every position is
//! scored with its full context and memory stays one window of logits.

use crate::engine::logprobs::log_sum_exp;
use crate::error::{Error, Result};
use crate::session::{LogitsMode, Session};

/// Tokens per window (one prefill call; its logits are `window x vocab` f32).
pub const DEFAULT_WINDOW: usize = 512;

/// The negative log-likelihood of a text under a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    /// Positions scored: every token but the first, which is context only.
    pub tokens: usize,
    /// Sum of `-ln p(token | all before it)`, nats.
    pub nats: f64,
}

impl Score {
    /// `exp(mean nats)`.
    pub fn perplexity(&self) -> f64 {
        (self.nats / self.tokens.max(1) as f64).exp()
    }
}

/// Run `ids` through slot 0 of each session (reset first) in windows of
/// `window` tokens, in lockstep; `f(p, rows)` sees each session's logits
/// row that predicts position `p + 1` (`p` from 0 to `ids.len() - 2`).
pub fn for_each_prediction(
    sessions: &mut [&mut Session<'_>],
    ids: &[u32],
    window: usize,
    mut f: impl FnMut(usize, &[&[f32]]),
) -> Result<()> {
    if ids.len() < 2 {
        return Err(Error::Input(format!("scoring needs at least 2 tokens, got {}", ids.len())));
    }
    let window = window.max(1);
    for s in sessions.iter_mut() {
        s.reset(0)?;
    }
    // The last token predicts nothing that is scored.
    for (w, piece) in ids[..ids.len() - 1].chunks(window).enumerate() {
        let mut out = Vec::with_capacity(sessions.len());
        for s in sessions.iter_mut() {
            let rows = s.prefill(&[piece], &[0], LogitsMode::All)?.remove(0);
            out.push((s.cfg().vocab_size, rows));
        }
        for j in 0..piece.len() {
            let rows: Vec<&[f32]> = out.iter().map(|(v, r)| &r[j * v..(j + 1) * v]).collect();
            f(w * window + j, &rows);
        }
    }
    Ok(())
}

/// `-ln softmax(row)[target]`, over the first `vocab` entries (the real
/// vocabulary: checkpoints pad the embedding).
pub fn nll(row: &[f32], vocab: usize, target: u32) -> f64 {
    let row = &row[..vocab.min(row.len())];
    row.get(target as usize).map_or(f64::INFINITY, |&v| log_sum_exp(row) - v as f64)
}

/// The score of `ids` (see [`for_each_prediction`]).
pub fn score(session: &mut Session<'_>, ids: &[u32], window: usize) -> Result<Score> {
    let vocab = session.model().sample_vocab();
    let mut s = Score { tokens: 0, nats: 0.0 };
    for_each_prediction(&mut [session], ids, window, |p, rows| {
        s.nats += nll(rows[0], vocab, ids[p + 1]);
        s.tokens += 1;
    })?;
    Ok(s)
}

/// How a model's predictions differ from a reference's on the same text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Comparison {
    pub reference: Score,
    pub other: Score,
    /// Largest and mean |logit difference| over every position and every
    /// token of the real vocabulary.
    pub max_abs_logit_diff: f64,
    pub mean_abs_logit_diff: f64,
    /// Positions whose most likely next token is the same in both.
    pub top1_agree: usize,
}

/// Score `ids` under both sessions' models and compare their logits.
pub fn compare<'m>(
    reference: &mut Session<'m>,
    other: &mut Session<'m>,
    ids: &[u32],
    window: usize,
) -> Result<Comparison> {
    let vocab = reference.model().sample_vocab();
    if other.model().sample_vocab() != vocab {
        return Err(Error::Input(format!(
            "the models' vocabularies differ ({vocab} and {} tokens)",
            other.model().sample_vocab()
        )));
    }
    let zero = Score { tokens: 0, nats: 0.0 };
    let mut c = Comparison {
        reference: zero,
        other: zero,
        max_abs_logit_diff: 0.0,
        mean_abs_logit_diff: 0.0,
        top1_agree: 0,
    };
    let mut sum = 0.0;
    for_each_prediction(&mut [reference, other], ids, window, |p, rows| {
        let (a, b) = (&rows[0][..vocab], &rows[1][..vocab]);
        for (s, r) in [(&mut c.reference, a), (&mut c.other, b)] {
            s.nats += nll(r, vocab, ids[p + 1]);
            s.tokens += 1;
        }
        for (&x, &y) in a.iter().zip(b) {
            let d = (x as f64 - y as f64).abs();
            c.max_abs_logit_diff = c.max_abs_logit_diff.max(d);
            sum += d;
        }
        c.top1_agree += usize::from(crate::sampling::argmax(a) == crate::sampling::argmax(b));
    })?;
    c.mean_abs_logit_diff = sum / (c.reference.tokens * vocab).max(1) as f64;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{synthetic_model, Shape};
    use mamba_core::{DType, Sequential};

    const TINY: Shape = Shape { name: "tiny", d_model: 32, n_layer: 2, vocab_size: 40 };

    #[test]
    fn windows_carry_the_state_so_the_score_does_not_depend_on_them() {
        let m = synthetic_model(&TINY, DType::F32, 1).unwrap();
        let ids: Vec<u32> = (0..50).map(|i| (i * 7 % 40) as u32).collect();
        let mut s = Session::new(&m, &Sequential, 1).unwrap();
        let whole = score(&mut s, &ids, 1000).unwrap();
        assert_eq!(whole.tokens, 49);
        // By hand: every prefix's last row.
        let mut want = 0.0;
        for p in 0..49 {
            s.reset(0).unwrap();
            let row = s.prefill(&[&ids[..=p]], &[0], LogitsMode::Last).unwrap().remove(0);
            want += nll(&row, 40, ids[p + 1]);
        }
        assert!((whole.nats - want).abs() < 1e-9 * want, "{} vs {want}", whole.nats);
        for w in [1, 7, 16] {
            let got = score(&mut s, &ids, w).unwrap();
            assert_eq!(got, whole, "window {w}");
        }
        assert!(score(&mut s, &ids[..1], 8).unwrap_err().to_string().contains("at least 2 tokens"));
        // A model against itself: no difference at all.
        let mut t = Session::new(&m, &Sequential, 1).unwrap();
        let c = compare(&mut s, &mut t, &ids, 9).unwrap();
        assert_eq!((c.reference, c.other), (whole, whole));
        assert_eq!((c.max_abs_logit_diff, c.top1_agree), (0.0, 49));
    }
}
