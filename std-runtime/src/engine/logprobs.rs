//! Log-probabilities of tokens from a logits row: the chosen token's and
//! the top-n alternatives, over the real vocabulary (padded rows excluded).

/// Most alternatives a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One token's log-probability and its top alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// `log(sum(exp(row)))`, computed stably in f64.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return max;
    }
    max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln()
}

/// Log-softmax of `row[..vocab]` at `token`, with the `top_n` best alternatives.
pub fn token_logprob(row: &[f32], vocab: usize, token: u32, top_n: usize) -> TokenLogprob {
    let row = &row[..vocab.min(row.len())];
    let lse = log_sum_exp(row);
    let lp = |t: usize| (row[t] as f64 - lse) as f32;
    let logprob = if (token as usize) < row.len() { lp(token as usize) } else { f32::NEG_INFINITY };
    let n = top_n.min(MAX_TOP_LOGPROBS).min(row.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n);
    if n > 0 {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.select_nth_unstable_by(n - 1, |&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        idx.truncate(n);
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        top.extend(idx.into_iter().map(|t| (t as u32, lp(t))));
    }
    TokenLogprob { token, logprob, top }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_log_softmax_and_top_is_sorted() {
        let row = [1.0f32, 3.0, 2.0, 0.5, 9.0];
        let lp = token_logprob(&row, 4, 2, 3);
        let z: f64 = row[..4].iter().map(|&v| (v as f64).exp()).sum();
        assert!((lp.logprob as f64 - (2.0f64.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0], "padded row 4 excluded");
        let total: f64 = (0..4).map(|t| (token_logprob(&row, 4, t, 0).logprob as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
