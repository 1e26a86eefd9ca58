//! Activations: SiLU and torch's softplus (threshold 20).

/// `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
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
    fn silu_matches_definition() {
        for &x in &[-8.0f32, -1.0, 0.0, 0.5, 3.0] {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!((silu(x) as f64 - want).abs() < 1e-6, "x={x}");
        }
    }
}
