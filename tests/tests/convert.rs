//! `mamba_runtime::convert` on the transformers fixtures: copies as stored
//! or cast to another float dtype load from one safetensors file whose
//! tensors start on cache lines, keep every weight or round it once, and a
//! widening cast gives the same logits bit for bit.

use half::{bf16, f16};
use mamba_core::{DType, Sequential};
use mamba_runtime::convert::{convert_model, Target, TENSOR_ALIGN};
use mamba_runtime::model::LoadedModel;
use mamba_tests::{bits, solo_logits, Truth, CASES};

fn convert(case: &str, target: Target) -> (Truth, LoadedModel, tempfile::TempDir, LoadedModel) {
    let t = Truth::load(case);
    let src = LoadedModel::load(t.dir_str()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sum = convert_model(&src, dir.path(), target, false).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(sum.converted + sum.kept, src.tensors().names().count(), "{case}: {sum:?}");
    let copy = LoadedModel::load_dir(dir.path()).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(copy.tensors().files, vec![dir.path().join("model.safetensors")], "{case}: one file");
    on_cache_lines(case, &copy);
    (t, src, dir, copy)
}

/// Mapped in place, every tensor whose size is whole cache lines starts on one.
fn on_cache_lines(case: &str, m: &LoadedModel) {
    let store = m.tensors();
    for name in store.names() {
        let t = store.get(name).unwrap();
        if t.bytes.len().is_multiple_of(TENSOR_ALIGN) {
            assert_eq!(t.bytes.as_ptr() as usize % TENSOR_ALIGN, 0, "{case}: {name}");
        }
    }
}

/// Every prompt's logits at every position, each prompt alone, as bits.
fn logits(m: &LoadedModel, t: &Truth) -> Vec<Vec<u32>> {
    let seqs: Vec<&[u32]> = t.prompts.iter().map(|p| p.ids.as_slice()).collect();
    solo_logits(m, &Sequential, &seqs).iter().map(|l| bits(l)).collect()
}

/// The values of tensor `name` as f32.
fn values(m: &LoadedModel, name: &str) -> (DType, Vec<f32>) {
    let t = m.tensors().get(name).unwrap();
    let n = t.shape.iter().product();
    let w = mamba_core::Tensor::from_bytes(t.dtype, t.bytes, 1, n, "w").unwrap();
    (t.dtype, (0..n).map(|i| w.data.get(i)).collect())
}

#[test]
fn copies_as_stored_and_widened_give_the_same_logits_bit_for_bit() {
    for case in CASES {
        // Sharded, `.bin` and both layouts come out as one safetensors file.
        let (t, src, _dir, copy) = convert(case, Target::AsStored);
        assert_eq!(logits(&copy, &t), logits(&src, &t), "{case}: as stored");
        assert_eq!(copy.dtype, src.dtype, "{case}");
        // f32 holds every bf16 and f16 value: the products see the same numbers.
        let (_, _, _dir, wide) = convert(case, Target::Float(DType::F32));
        assert_eq!(wide.dtype, DType::F32, "{case}");
        assert_eq!(logits(&wide, &t), logits(&src, &t), "{case}: widened to f32");
    }
}

#[test]
fn narrowing_casts_round_each_value_once_and_name_the_dtype() {
    for (to, torch) in [(DType::BF16, "bfloat16"), (DType::F16, "float16")] {
        let (_, src, dir, copy) = convert("hf_f32_tied", Target::Float(to));
        assert_eq!(copy.dtype, to);
        for name in src.tensors().names() {
            let ((from, a), (got, b)) = (values(&src, name), values(&copy, name));
            assert_eq!((from, got), (DType::F32, to), "{name}");
            let round = |v: f32| {
                if to == DType::BF16 {
                    bf16::from_f32(v).to_f32()
                } else {
                    f16::from_f32(v).to_f32()
                }
            };
            assert!(a.iter().zip(&b).all(|(&x, &y)| round(x).to_bits() == y.to_bits()), "{name}");
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["torch_dtype"], torch);
        let card = std::fs::read_to_string(dir.path().join("README.md")).unwrap();
        assert!(card.contains(&format!("cast to {}", to.name())), "{card}");
    }
}

#[test]
fn converting_refuses_q8_models_their_own_directory_and_overwrites() {
    let t = Truth::load("hf_f32_tied");
    let src = LoadedModel::load(t.dir_str()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    convert_model(&src, dir.path(), Target::Q8_0, false).unwrap();
    let e = convert_model(&src, dir.path(), Target::AsStored, false).unwrap_err().to_string();
    assert!(e.contains("already holds a model") && e.contains("--force"), "{e}");
    let q = LoadedModel::load_dir(dir.path()).unwrap();
    let other = tempfile::tempdir().unwrap();
    let e = convert_model(&q, other.path(), Target::Float(DType::F32), false).unwrap_err().to_string();
    assert!(e.contains("already Q8_0"), "{e}");
    let e = convert_model(&src, &src.dir, Target::AsStored, true).unwrap_err().to_string();
    assert!(e.contains("own directory"), "{e}");
    let e = convert_model(&src, other.path(), Target::Float(DType::Q8_0), false).unwrap_err().to_string();
    assert!(e.contains("quantize"), "{e}");
}

#[test]
fn a_cast_that_fails_halfway_leaves_the_model_already_there_whole() {
    // A copy of the fixture with one value past f16's range, in a tensor
    // written after others.
    let (_, src, bad, _) = convert("hf_f32_tied", Target::AsStored);
    let file = bad.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let name = "backbone.norm_f.weight";
    let at = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor(name).unwrap().data().as_ptr() as usize - bytes.as_ptr() as usize
    };
    bytes[at..at + 4].copy_from_slice(&1e6f32.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let bad = LoadedModel::load_dir(bad.path()).unwrap();

    let out = tempfile::tempdir().unwrap();
    convert_model(&src, out.path(), Target::Float(DType::BF16), false).unwrap();
    let before = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let e = convert_model(&bad, out.path(), Target::Float(DType::F16), true).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("f16's range"), "{e}");
    assert_eq!(
        std::fs::read(out.path().join("model.safetensors")).unwrap(),
        before,
        "the bf16 copy is untouched"
    );
    assert!(!out.path().join("model.safetensors.partial").exists(), "no partial file left");
    LoadedModel::load_dir(out.path()).unwrap();
}
