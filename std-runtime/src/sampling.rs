//! Picking the next token from a logits row: penalties (repetition,
//! presence, frequency), then greedy, or temperature with top-k, top-p and
//! min-p, from a per-sequence seeded generator (same seed, same output,
//! whatever else runs in the batch).

/// Sampling settings of one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = no limit.
    pub top_k: usize,
    /// 1.0 = no limit.
    pub top_p: f32,
    /// Drop tokens below `min_p` times the top probability (0 = off).
    pub min_p: f32,
    /// Divide positive / multiply negative logits of seen tokens (1 = off), as HF.
    pub repetition_penalty: f32,
    /// Subtract from logits of tokens generated at least once (OpenAI).
    pub presence_penalty: f32,
    /// Subtract, per occurrence, from logits of generated tokens (OpenAI).
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Check ranges; the message names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition penalty must be > 0, got {}", self.repetition_penalty));
        }
        for (name, v) in [("presence", self.presence_penalty), ("frequency", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(format!("{name} penalty must be in [-2, 2], got {v}"));
            }
        }
        Ok(())
    }
}

/// SplitMix64: small, fast, and reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A per-sequence sampler.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

/// Index of the largest value (first on ties); NaN never wins (an all-NaN
/// or empty row gives 0).
///
/// Two passes the compiler vectorises: the largest value over 16 lanes,
/// then its first position. A vocabulary's worth of the branchy one-pass
/// loop was about 1% of a batch-1 decode step.
pub fn argmax(row: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            // `v > m` is false for NaN: it never replaces a value.
            *m = if v > *m { v } else { *m };
        }
    }
    let mut best = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        best = if v > best { v } else { best };
    }
    row.iter().position(|&v| v == best).unwrap_or(0)
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether any penalty is on (then [`sample_with_history`](Self::sample_with_history) matters).
    pub fn has_penalties(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
    }

    /// Apply the penalties to `row` given the prompt and the tokens generated so far.
    pub fn apply_penalties(&self, row: &mut [f32], prompt: &[u32], generated: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; row.len()];
            for &t in prompt.iter().chain(generated) {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (v, _) in row.iter_mut().zip(&seen).filter(|(_, &s)| s) {
                *v = if *v > 0.0 { *v / p.repetition_penalty } else { *v * p.repetition_penalty };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, u32>::new();
            for &t in generated {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(v) = row.get_mut(t as usize) {
                    *v -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Penalties, then [`sample`](Self::sample).
    pub fn sample_with_history(
        &mut self,
        logits: &[f32],
        vocab: usize,
        prompt: &[u32],
        generated: &[u32],
    ) -> u32 {
        if !self.has_penalties() {
            return self.sample(logits, vocab);
        }
        let mut row = logits[..vocab.min(logits.len())].to_vec();
        self.apply_penalties(&mut row, prompt, generated);
        self.sample(&row, vocab)
    }

    /// Pick a token among the first `vocab` entries of `logits` (padded rows never win).
    pub fn sample(&mut self, logits: &[f32], vocab: usize) -> u32 {
        let row = &logits[..vocab.min(logits.len())];
        let p = &self.params;
        if p.temperature == 0.0 || p.top_k == 1 {
            return argmax(row) as u32;
        }
        let mut cand: Vec<(usize, f32)> = row
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_nan())
            .map(|(i, &v)| (i, v / p.temperature))
            .collect();
        if cand.is_empty() {
            return 0;
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|&(_, v)| ((v - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.min_p > 0.0 {
            // Sorted descending: keep the prefix at or above min_p * top.
            let floor = probs[0] * p.min_p as f64;
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            probs.truncate(keep);
            let t: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= t);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    acc += q;
                    acc >= p.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let t: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= t);
        }
        let u = self.rng.next_f64();
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if u < acc {
                return cand[i].0 as u32;
            }
        }
        cand[probs.len() - 1].0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest_and_never_nan() {
        // The one-pass definition it replaced.
        let naive = |row: &[f32]| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] || row[best].is_nan() {
                    best = i;
                }
            }
            best
        };
        let mut rng = Rng::new(7);
        for n in (1..70).chain([50280]) {
            for case in 0..6 {
                let mut row: Vec<f32> = (0..n).map(|_| (rng.next_f64() * 8.0).floor() as f32).collect();
                match case {
                    1 => row[n / 2] = f32::NAN,
                    2 => row.iter_mut().step_by(3).for_each(|v| *v = f32::NAN),
                    3 => row.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                    4 => row[n - 1] = f32::INFINITY,
                    5 => row[0] = f32::NAN,
                    _ => {}
                }
                assert_eq!(argmax(&row), naive(&row), "n={n} case {case}: {:?}", &row[..n.min(20)]);
            }
        }
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_never_picks_padded_rows() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 0.9, 0.3, 5.0], 3), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7919) % 13) as f32 * 0.3).collect();
        let params =
            SamplingParams { temperature: 0.9, top_k: 20, top_p: 0.95, seed: 42, ..Default::default() };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..32).map(|_| s.sample(&logits, 50)).collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        let other = SamplingParams { seed: 43, ..params.clone() };
        assert_ne!(run(&params), run(&other));
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.0f32, 3.0, 1.0, 2.9];
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, top_k: 1, seed: 1, ..Default::default() });
        assert_eq!(s.sample(&logits, 4), 1);
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, top_p: 1e-6, seed: 1, ..Default::default() });
        for _ in 0..10 {
            assert_eq!(s.sample(&logits, 4), 1);
        }
    }

    #[test]
    fn min_p_keeps_only_tokens_near_the_top() {
        // Probabilities after softmax at T=1: token 1 dominates, token 3 is close.
        let logits = [0.0f32, 5.0, -3.0, 4.9];
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, min_p: 0.5, seed: 3, ..Default::default() });
        for _ in 0..50 {
            let t = s.sample(&logits, 4);
            assert!(t == 1 || t == 3, "{t}");
        }
    }

    #[test]
    fn penalties_follow_hf_and_openai_definitions() {
        let s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        });
        let mut row = vec![1.0f32, -1.0, 2.0, 3.0];
        s.apply_penalties(&mut row, &[0], &[1, 2, 2]);
        // token 0: in prompt only -> repetition: 1/2; not generated -> no presence.
        // token 1: generated once -> -1*2 - 0.5 - 0.25; token 2: twice -> 2/2 - 0.5 - 0.5.
        assert_eq!(row, vec![0.5, -2.75, 0.0, 3.0]);
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let bad = SamplingParams { min_p: 1.5, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("min-p"));
        let bad = SamplingParams { presence_penalty: 3.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("presence"));
    }
}
