//! Activations: SiLU and torch's softplus (threshold 20).

/// `x * sigmoid(x)`, with [`exp_fast`] (within 3e-7 relative of the exact value).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// `e^x` to about 2e-7 relative error, branch-free so loops over it
/// vectorise: `x = n ln2 + r`, `|r| <= ln2 / 2`, a degree-6 polynomial for
/// `e^r`, and `2^n` built in the exponent bits. Inputs are clamped to the
/// f32 range (below -87 the result is 0 to within f32's normal range).
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `ln(1 + e^x)`, passing `x` through above 20 as torch does.
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        libm::log1pf(libm::expf(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softplus_passes_large_values_through() {
        assert_eq!(softplus(25.0), 25.0);
        assert!((softplus(0.0) - core::f32::consts::LN_2).abs() < 1e-7);
        assert!((softplus(-30.0) - libm::expf(-30.0)).abs() < 1e-12);
    }

    #[test]
    fn exp_fast_is_accurate_over_the_range_the_scan_uses() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_fast(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_fast(-1000.0), exp_fast(-87.0));
        assert!(exp_fast(-1000.0) < 1e-37);
    }

    #[test]
    fn silu_matches_definition() {
        for &x in &[-8.0f32, -1.0, 0.0, 0.5, 3.0] {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!((silu(x) as f64 - want).abs() < 1e-6, "x={x}");
        }
    }
}
