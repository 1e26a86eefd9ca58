//! bf16 products through AVX-512 BF16's `vdpbf16ps` (`simd::enable_bf16_dot`):
//! within f32 rounding of the exact product over activations rounded to
//! bf16, the same bits in every tile shape, feature split, stride and
//! `dot`, and non-finite activations non-finite. A test binary of its own:
//! switching SIMD on is process-wide.

mod common;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::common;
    use half::bf16;
    use mamba_core::kernels::{dot, linear, simd};
    use mamba_core::{Tensor, WData};

    fn product(x: &[f32], rows: usize, w: &Tensor<'_>, f: (usize, usize)) -> Vec<f32> {
        let n = w.rows;
        let mut out = vec![f32::NAN; rows * n];
        linear(x, rows, w, None, f, |t, o, v| out[t * n + o..t * n + o + v.len()].copy_from_slice(v));
        out
    }

    /// `v` rounded to bf16, ties to even (as `vcvtneps2bf16`).
    fn round(v: f32) -> f64 {
        bf16::from_f32(v).to_f64()
    }

    fn check_shapes() {
        // Under one block, one and a part, whole blocks, an odd length, the 130m rows.
        for k in [1, 5, 24, 32, 33, 48, 64, 95, 96, 768, 1536] {
            let n_out = 10;
            let w: Vec<bf16> =
                common::values(n_out * k, k as u32, -1.0, 1.0).into_iter().map(bf16::from_f32).collect();
            let wt = Tensor::new(WData::BF16(&w), n_out, k, "w").unwrap();
            for rows in [1, 2, 3, 4, 9] {
                let x = common::values(rows * k, 7 + rows as u32, -3.0, 3.0);
                let whole = product(&x, rows, &wt, (0, n_out));
                for t in 0..rows {
                    let xt = &x[t * k..(t + 1) * k];
                    for o in 0..n_out {
                        let wo = &w[o * k..(o + 1) * k];
                        let exact: f64 = wo.iter().zip(xt).map(|(w, &v)| w.to_f64() * round(v)).sum();
                        let size: f64 = wo.iter().zip(xt).map(|(w, &v)| (w.to_f64() * round(v)).abs()).sum();
                        let got = whole[t * n_out + o] as f64;
                        // f32 sums over at most k / 16 steps a lane, then the lanes.
                        let bound = size * (k as f64 / 16.0 + 6.0) * f32::EPSILON as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "k={k} rows={rows} token {t} feature {o}: {got} vs {exact}"
                        );
                        if t == 0 {
                            assert_eq!(dot(wt.row(o), xt).to_bits(), whole[o].to_bits(), "k={k}: dot");
                        }
                    }
                }
                // Features split as threads split them, rows read in place from
                // a wider buffer, and each token alone: the same bits.
                // (One to three tokens stream a range's two halves side by
                // side; 2..9 leaves a row after them.)
                let parts = [(3, 7), (2, 9)].map(|f| (f, product(&x, rows, &wt, f)));
                let strided = common::strided_product(&x, rows, &wt, k + 5);
                assert_eq!(common::bits(&strided), common::bits(&whole), "k={k} rows={rows}: strided");
                for t in 0..rows {
                    let at = format!("k={k} rows={rows} token {t}");
                    let row = &whole[t * n_out..(t + 1) * n_out];
                    for ((f0, f1), part) in &parts {
                        assert_eq!(
                            common::bits(&part[t * n_out + f0..t * n_out + f1]),
                            common::bits(&row[*f0..*f1]),
                            "{at}: split {f0}..{f1}"
                        );
                    }
                    let alone = product(&x[t * k..(t + 1) * k], 1, &wt, (0, n_out));
                    assert_eq!(common::bits(&alone), common::bits(row), "{at}: alone");
                }
            }
        }
    }

    /// A NaN or an infinity among the activations makes the products
    /// non-finite, as in f32; zeros and values below bf16's normals add nothing.
    fn check_special_activations() {
        let k = 96;
        let w: Vec<bf16> = common::values(2 * k, 3, 0.5, 1.0).into_iter().map(bf16::from_f32).collect();
        let wt = Tensor::new(WData::BF16(&w), 2, k, "w").unwrap();
        let mut x = common::values(k, 11, -1.0, 1.0);
        x[32..64].fill(0.0);
        x[64..96].iter_mut().for_each(|v| *v *= 1e-39);
        let v = product(&x, 1, &wt, (0, 2));
        let head: f64 = (0..32).map(|i| w[i].to_f64() * round(x[i])).sum();
        assert!((v[0] as f64 - head).abs() <= 1e-5, "{v:?} vs {head}");
        common::non_finite_activations_stay_non_finite("bf16 dot", &x, |xr, rows| {
            product(xr, rows, &wt, (0, 2))
        });
    }

    #[test]
    fn bf16_dot_products_round_activations_and_agree_on_every_path() {
        if !(common::has_avx512() && std::is_x86_feature_detected!("avx512bf16")) {
            eprintln!("skipped: this CPU lacks AVX-512 BF16");
            return;
        }
        // SAFETY: the features were detected just above.
        #[allow(unsafe_code)]
        unsafe {
            simd::enable_bf16_dot()
        };
        check_shapes();
        check_special_activations();
        simd::disable_avx512();
        assert!(!simd::bf16_dot_enabled());
    }
}
