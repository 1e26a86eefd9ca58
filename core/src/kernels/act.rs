//! Activations: SiLU and torch's softplus (threshold 20).

/// `x * sigmoid(x)`, with [`exp_fast`] (within 3e-7 relative of the exact value).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

// exp_fast's constants, shared with the AVX-512 exponentials.
/// `log2(e)`.
pub(crate) const LOG2E: f32 = core::f32::consts::LOG2_E;
/// `ln 2` in two parts: `n * LN2_HI` is exact for `|n| <= 127`.
pub(crate) const LN2_HI: f32 = 0.693_145_75;
pub(crate) const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding it rounds to an integer.
pub(crate) const ROUND: f32 = 12_582_912.0;
/// The inputs' clamp: the f32 range of `e^x`.
pub(crate) const EXP_LO: f32 = -87.0;
pub(crate) const EXP_HI: f32 = 88.0;

/// `e^x` to about 2e-7 relative error, branch-free so loops over it
/// vectorise: `x = n ln2 + r`, `|r| <= ln2 / 2`, a degree-6 polynomial for
/// `e^r`, and `2^n` built in the exponent bits. Inputs are clamped to the
/// f32 range (below -87 the result is 0 to within f32's normal range).
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    let x = x.clamp(EXP_LO, EXP_HI);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `shifted` is ROUND + n exactly (|n| <= 127; ROUND's ulp is 1), so its
    // low bits are n: integer steps that vectorise, where `n as i32` (a
    // saturating conversion) went lane by lane. A NaN gives a NaN `p`.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `ln(1 + e^x)`, passing `x` through above 20 as torch does.
///
/// Branch-free so the dt loop vectorises (libm's `log1pf(expf(x))` was a
/// few percent of a decode step): `max(x, 0) + ln(1 + e^-|x|)`, within
/// 4e-7 relative of the exact value.
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    let v = x.max(0.0) + log1p_unit(exp_fast(-x.abs()));
    if x > 20.0 {
        x
    } else {
        v
    }
}

/// `ln(1 + u)` for `u` in `[0, 1]`, branch-free, relative error about 1e-7
/// also for tiny `u`: `w = 1 + u` is rounded, so the result is scaled by
/// `u / (w - 1)` (exact when `w > 1`); `w == 1` means `ln(1 + u) = u` to f32.
#[inline(always)]
fn log1p_unit(u: f32) -> f32 {
    let w = 1.0 + u;
    // w in [1, 2]: halve the upper part so m stays in [0.75, 1.5).
    let big = w > 1.5;
    let m = if big { w * 0.5 } else { w };
    let e = if big { core::f32::consts::LN_2 } else { 0.0 };
    // ln(m) = 2 atanh(s), s = (m - 1) / (m + 1) in [-1/7, 1/5].
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let ln_m = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0)))));
    let ln_w = e + ln_m;
    let wm1 = w - 1.0;
    if wm1 == 0.0 {
        u
    } else {
        ln_w * (u / wm1)
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
    fn exp_fast_takes_the_exponent_from_the_rounding_bits_as_a_conversion_would() {
        // The same steps with `n as i32` for the power of two.
        fn converted(x: f32) -> f32 {
            let x = x.clamp(-87.0, 88.0);
            let n = (x * core::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
            let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
            let p = 1.0
                + r * (1.0
                    + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
            p * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp_fast(x).to_bits(), converted(x).to_bits(), "x = {x}");
            x += 0.000_37;
        }
        for x in [f32::INFINITY, f32::NEG_INFINITY, f32::MAX, f32::MIN, 0.0, -0.0, 1e-30] {
            assert_eq!(exp_fast(x).to_bits(), converted(x).to_bits(), "x = {x}");
        }
        assert!(exp_fast(f32::NAN).is_nan());
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
    fn softplus_is_accurate_everywhere() {
        // Relative error down to e^-80; below, f32's exp leaves the normal range.
        let mut worst = (0.0f64, 0.0f32);
        let mut x = -80.0f32;
        while x < 30.0 {
            let xd = x as f64;
            let want = if xd > 20.0 { xd } else { xd.exp().ln_1p() };
            let rel = ((softplus(x) as f64 - want) / want).abs();
            if rel > worst.0 {
                worst = (rel, x);
            }
            x += 0.00731;
        }
        assert!(worst.0 < 1e-6, "worst relative error {:e} at {}", worst.0, worst.1);
        assert!(softplus(-200.0) < 1e-37);
    }

    #[test]
    fn silu_matches_definition() {
        for &x in &[-8.0f32, -1.0, 0.0, 0.5, 3.0] {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!((silu(x) as f64 - want).abs() < 1e-6, "x={x}");
        }
    }
}
