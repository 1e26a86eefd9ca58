//! f16 weights widen to the bits of `half`'s conversion in every SIMD mode.
//! A binary of its own: switching SIMD modes is process-wide, and a test
//! beside it that switched them mid-run (`simd.rs`) made either one run
//! in the other's mode.

mod common;

use half::f16;
use mamba_core::WData;

#[test]
fn f16_weights_widen_to_the_bits_of_the_scalar_conversion() {
    // Every f16 bit pattern; from an odd start and short of the end, so the
    // eight-wide loop has a tail.
    let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let want: Vec<f32> = all.iter().map(|h| h.to_f32()).collect();
    common::in_every_mode(|mode| {
        for start in [0, 3] {
            let mut out = vec![0.0f32; all.len() - start - 5];
            WData::F16(&all).widen_into(start, &mut out);
            for (i, (o, e)) in out.iter().zip(&want[start..]).enumerate() {
                // A NaN stays a NaN (F16C quiets a signalling one).
                let same = o.to_bits() == e.to_bits() || (o.is_nan() && e.is_nan());
                assert!(same, "{mode}: f16 {:#06x} widened to {o:e}, not {e:e}", start + i);
            }
        }
    });
}
