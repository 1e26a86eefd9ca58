//! Helpers for the workspace integration tests: the fixtures that
//! `tools/gen_fixtures.py` wrote with `transformers` in float64.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The fixtures folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every fixture case, by folder name.
pub const CASES: [&str; 5] =
    ["hf_f32_tied", "hf_bf16_untied_sharded", "hf_f16_k2", "orig_bin", "orig_st_bf16"];

/// One prompt of a case and its float64 truth.
#[derive(Debug, Deserialize)]
pub struct PromptTruth {
    pub ids: Vec<u32>,
    pub logits: String,
    pub conv_state: String,
    pub ssm_state: String,
    pub greedy: Vec<u32>,
    #[serde(default)]
    pub text: Option<String>,
}

/// `truth.json` of a case.
#[derive(Debug, Deserialize)]
pub struct Truth {
    pub case: String,
    pub layout: String,
    pub storage_dtype: String,
    pub n_layer: usize,
    pub d_model: usize,
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
    pub vocab_size: usize,
    pub padded_vocab_size: usize,
    pub prompts: Vec<PromptTruth>,
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Truth {
    pub fn load(case: &str) -> Truth {
        let dir = fixtures_dir().join(case);
        let text = std::fs::read_to_string(dir.join("truth.json")).expect("truth.json");
        let mut t: Truth = serde_json::from_str(&text).expect("truth.json parses");
        t.dir = dir;
        t
    }

    /// Raw little-endian f64 values of a truth file.
    pub fn read_f64(&self, name: &str) -> Vec<f64> {
        let bytes = std::fs::read(self.dir.join(name)).expect("truth file");
        bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }
}

/// Largest |a - b| and where it is; panics naming the case when over `tol`.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs truth {}", got.len(), want.len());
    let mut worst = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w).abs();
        if d > worst.0 || d.is_nan() {
            worst = (d, i);
        }
    }
    let (d, i) = worst;
    assert!(d <= tol, "{what}: max |diff| {d:.3e} > {tol:.0e} at index {i}: got {} want {}", got[i], want[i]);
    d
}

/// The bit patterns of `v`, to compare logits exactly.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Every position's logits of each sequence, each prefilled alone (in its
/// own slot of one session) through `par`.
pub fn solo_logits(
    m: &mamba_runtime::model::LoadedModel,
    par: &dyn mamba_core::Parallel,
    seqs: &[&[u32]],
) -> Vec<Vec<f32>> {
    use mamba_runtime::session::{LogitsMode, Session};
    let mut s = Session::new(m, par, seqs.len()).expect("a session");
    seqs.iter()
        .enumerate()
        .map(|(i, q)| s.prefill(&[q], &[i], LogitsMode::All).expect("prefill").remove(0))
        .collect()
}
