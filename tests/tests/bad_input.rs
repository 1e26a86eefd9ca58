//! Bad input never panics and always says what is wrong and where.
//!
//! Each loading test copies a fixture into a temporary directory, breaks one
//! thing (a file, a key, a tensor) and checks that loading returns an error
//! whose message names both the problem and the file, key or tensor at
//! fault. The session tests feed bad ids, slots and batches and check that
//! a refused call leaves every state slot as it was.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use mamba_core::Sequential;
use mamba_runtime::hub::resolve_in_cache;
use mamba_runtime::model::LoadedModel;
use mamba_runtime::session::{LogitsMode, Session};
use mamba_tests::{fixtures_dir, Truth, CASES};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A writable copy of a fixture's model files (the truth files are left out).
struct Scratch {
    _tmp: TempDir,
    dir: PathBuf,
}

/// One tensor of a safetensors file, owned, to be edited and written back.
struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn scratch(case: &str) -> Scratch {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join(case);
    fs::create_dir(&dir).unwrap();
    for entry in fs::read_dir(fixtures_dir().join(case)).expect("fixture dir") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".f64") || name == "truth.json" {
            continue;
        }
        fs::copy(&path, dir.join(&name)).unwrap();
    }
    Scratch { _tmp: tmp, dir }
}

impl Scratch {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn spec(&self) -> &str {
        self.dir.to_str().expect("utf-8 temp path")
    }

    fn read(&self, file: &str) -> Vec<u8> {
        fs::read(self.path(file)).unwrap()
    }

    fn write(&self, file: &str, bytes: impl AsRef<[u8]>) {
        fs::write(self.path(file), bytes).unwrap();
    }

    fn remove(&self, file: &str) {
        fs::remove_file(self.path(file)).unwrap();
    }

    /// Keep the first `keep` bytes of a file.
    fn truncate(&self, file: &str, keep: usize) {
        let bytes = self.read(file);
        assert!(keep < bytes.len());
        self.write(file, &bytes[..keep]);
    }

    /// Edit a JSON object file (config.json, the shard index, ...).
    fn edit_json(&self, file: &str, edit: impl FnOnce(&mut Map<String, Value>)) {
        let mut v: Value = serde_json::from_slice(&self.read(file)).unwrap();
        edit(v.as_object_mut().expect("a JSON object"));
        self.write(file, serde_json::to_vec_pretty(&v).unwrap());
    }

    fn set_config(&self, key: &str, value: Value) {
        self.edit_json("config.json", |m| {
            m.insert(key.to_string(), value);
        });
    }

    /// Read a safetensors file, let `edit` change its tensors, write it back.
    fn rewrite_safetensors(&self, file: &str, edit: impl FnOnce(&mut Vec<Stored>)) {
        let bytes = self.read(file);
        let st = SafeTensors::deserialize(&bytes).expect("fixture parses");
        let mut tensors: Vec<Stored> = st
            .tensors()
            .into_iter()
            .map(|(name, v)| Stored {
                name,
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            })
            .collect();
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        edit(&mut tensors);
        let views = tensors.iter().map(|t| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.data).expect("consistent test tensor");
            (t.name.clone(), view)
        });
        let out = safetensors::serialize(views, &None).expect("serialize");
        self.write(file, out);
    }

    /// Replace tensor `name` by a zero-filled one of `dtype` and `shape`.
    fn replace_tensor(&self, file: &str, name: &str, dtype: Dtype, shape: Vec<usize>) {
        self.rewrite_safetensors(file, |ts| {
            let t = ts.iter_mut().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name} in {file}"));
            let n: usize = shape.iter().product();
            t.data = vec![0u8; n * dtype.size()];
            t.dtype = dtype;
            t.shape = shape;
        });
    }

    fn drop_tensor(&self, file: &str, name: &str) {
        self.rewrite_safetensors(file, |ts| {
            let before = ts.len();
            ts.retain(|t| t.name != name);
            assert_eq!(ts.len() + 1, before, "{name} was in {file}");
        });
    }

    fn load_err(&self) -> String {
        load_err(self.spec())
    }

    fn load_ok(&self) -> LoadedModel {
        load_ok(self.spec())
    }
}

/// Load `spec`, expecting an error; a panic fails the test with its own message.
fn load_err(spec: &str) -> String {
    match catch_unwind(AssertUnwindSafe(|| LoadedModel::load(spec))) {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(_)) => panic!("loading {spec} succeeded; an error was expected"),
        Err(_) => panic!("loading {spec} panicked instead of returning an error"),
    }
}

fn load_ok(spec: &str) -> LoadedModel {
    match catch_unwind(AssertUnwindSafe(|| LoadedModel::load(spec))) {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => panic!("loading {spec} failed: {e}"),
        Err(_) => panic!("loading {spec} panicked"),
    }
}

/// Every one of `parts` appears in the message.
#[track_caller]
fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "the error message does not mention {p:?}:\n  {msg}");
    }
}

/// Whether `f` panicked; its result is dropped either way.
fn panics<T>(f: impl FnOnce() -> T) -> bool {
    catch_unwind(AssertUnwindSafe(f)).is_err()
}

// ---------------------------------------------------------------------------
// The controls: an untouched copy loads, and so does a rewritten one.
// ---------------------------------------------------------------------------

#[test]
fn untouched_copies_of_every_fixture_load() {
    for case in CASES {
        let s = scratch(case);
        let m = s.load_ok();
        assert!(m.cfg.n_layer > 0, "{case}");
    }
}

#[test]
fn a_safetensors_file_rewritten_unchanged_still_loads() {
    // The rewriting helper itself must not break a file, or the tests
    // below would pass for the wrong reason.
    let s = scratch("hf_f32_tied");
    s.rewrite_safetensors("model.safetensors", |_| {});
    s.load_ok();
    let s = scratch("hf_bf16_untied_sharded");
    s.rewrite_safetensors("model-00002-of-00002.safetensors", |_| {});
    s.load_ok();
}

// ---------------------------------------------------------------------------
// The model directory
// ---------------------------------------------------------------------------

#[test]
fn missing_model_directory_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-model");
    let err = load_err(missing.to_str().unwrap());
    assert_mentions(&err, &["no-such-model", "no such model directory"]);
}

#[test]
fn a_file_given_as_the_model_directory_is_refused() {
    let s = scratch("hf_f32_tied");
    let err = load_err(s.path("config.json").to_str().unwrap());
    assert_mentions(&err, &["config.json", "no such model directory"]);
}

#[test]
fn directory_without_config_json() {
    let s = scratch("hf_f32_tied");
    s.remove("config.json");
    let err = s.load_err();
    assert_mentions(&err, &[s.spec(), "no config.json"]);
}

#[test]
fn empty_directory_says_config_json_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_err(tmp.path().to_str().unwrap());
    assert_mentions(&err, &["no config.json"]);
}

#[test]
fn directory_without_any_weights_file() {
    for (case, weights) in [
        ("hf_f32_tied", &["model.safetensors"][..]),
        ("orig_bin", &["pytorch_model.bin"][..]),
        (
            "hf_bf16_untied_sharded",
            &[
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
            ][..],
        ),
    ] {
        let s = scratch(case);
        for w in weights {
            s.remove(w);
        }
        let err = s.load_err();
        assert_mentions(
            &err,
            &[
                s.spec(),
                "no weights",
                "model.safetensors",
                "model.safetensors.index.json",
                "pytorch_model.bin",
            ],
        );
    }
}

#[test]
fn two_unnamed_safetensors_files_are_not_guessed_between() {
    // Without an index, which of two stray files holds the model is unknown.
    let s = scratch("hf_f32_tied");
    fs::rename(s.path("model.safetensors"), s.path("a.safetensors")).unwrap();
    fs::copy(s.path("a.safetensors"), s.path("b.safetensors")).unwrap();
    let err = s.load_err();
    assert_mentions(&err, &["no weights", "model.safetensors.index.json"]);
}

// ---------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------

#[test]
fn truncated_config_json_is_malformed_json() {
    let s = scratch("hf_f32_tied");
    let text = s.read("config.json");
    s.write("config.json", &text[..text.len() / 2]);
    let err = s.load_err();
    assert_mentions(&err, &["config.json", "malformed JSON", "line"]);
}

#[test]
fn empty_and_binary_config_json_are_malformed_json() {
    let s = scratch("hf_f32_tied");
    s.write("config.json", b"");
    assert_mentions(&s.load_err(), &["config.json", "malformed JSON"]);
    s.write("config.json", [0xff, 0xfe, 0x00, 0x7b]);
    assert_mentions(&s.load_err(), &["config.json"]);
}

#[test]
fn config_json_that_is_an_array() {
    let s = scratch("hf_f32_tied");
    s.write("config.json", br#"[{"hidden_size": 16}]"#);
    let err = s.load_err();
    assert_mentions(&err, &["config.json", "top level", "expected a JSON object"]);
}

#[test]
fn config_key_of_the_wrong_type_is_named() {
    let cases = [
        ("hidden_size", json!("big"), "\"big\""),
        ("num_hidden_layers", json!(2.5), "2.5"),
        ("state_size", json!(-8), "-8"),
        ("conv_kernel", json!([4]), "[4]"),
        ("vocab_size", json!({"n": 50}), "50"),
        ("use_bias", json!("no"), "\"no\""),
        ("tie_word_embeddings", json!(1), "true or false"),
        ("layer_norm_epsilon", json!("1e-5"), "\"1e-5\""),
        ("layer_norm_epsilon", json!(-1e-5), "non-negative"),
        ("hidden_act", json!(7), "expected a string"),
        ("eos_token_id", json!("</s>"), "\"</s>\""),
        ("bos_token_id", json!(-1), "-1"),
    ];
    for (key, value, shown) in cases {
        let s = scratch("hf_f32_tied");
        s.set_config(key, value.clone());
        let err = s.load_err();
        assert_mentions(&err, &["config.json", &format!("`{key}`"), shown]);
    }
}

#[test]
fn hidden_act_gelu_is_unsupported() {
    let s = scratch("hf_f32_tied");
    s.set_config("hidden_act", json!("gelu"));
    let err = s.load_err();
    assert_mentions(&err, &["config.json", "hidden_act", "gelu", "unsupported", "silu"]);
}

#[test]
fn time_step_rank_wide() {
    let s = scratch("hf_f32_tied");
    s.set_config("time_step_rank", json!("wide"));
    let err = s.load_err();
    assert_mentions(&err, &["config.json", "time_step_rank", "wide", "auto"]);
    s.set_config("time_step_rank", json!(0));
    assert_mentions(&s.load_err(), &["config.json", "time_step_rank", "positive integer"]);
}

#[test]
fn model_type_other_than_mamba_is_unsupported() {
    let s = scratch("hf_f32_tied");
    s.set_config("model_type", json!("mamba2"));
    let err = s.load_err();
    assert_mentions(&err, &["config.json", "model_type", "mamba2", "unsupported"]);
}

#[test]
fn original_layout_mamba2_layer_is_unsupported() {
    let s = scratch("orig_st_bf16");
    s.edit_json("config.json", |m| {
        m["ssm_cfg"]["layer"] = json!("Mamba2");
    });
    let err = s.load_err();
    assert_mentions(&err, &["config.json", "ssm_cfg.layer", "Mamba2", "unsupported"]);
}

#[test]
fn original_layout_other_unsupported_blocks_are_named() {
    let cases: [(&str, Value, &str); 4] = [
        ("rms_norm", json!(false), "rms_norm"),
        ("d_intermediate", json!(64), "d_intermediate"),
        ("attn_layer_idx", json!([1]), "attn_layer_idx"),
        ("ssm_cfg", json!("Mamba1"), "ssm_cfg"),
    ];
    for (key, value, shown) in cases {
        let s = scratch("orig_bin");
        s.set_config(key, value);
        let err = s.load_err();
        assert_mentions(&err, &["config.json", shown]);
    }
}

#[test]
fn original_layout_missing_required_keys_are_named() {
    for key in ["d_model", "n_layer", "vocab_size"] {
        let s = scratch("orig_st_bf16");
        s.edit_json("config.json", |m| {
            m.remove(key);
        });
        let err = s.load_err();
        assert_mentions(&err, &["config.json", &format!("`{key}`"), "missing"]);
    }
}

#[test]
fn zero_and_out_of_range_dimensions_are_refused() {
    let zero = "`: expected a positive integer, got 0";
    let cases = [
        ("state_size", json!(0), format!("`state_size{zero}")),
        ("state_size", json!(300), "d_state is larger than 256".into()),
        ("conv_kernel", json!(0), format!("`conv_kernel{zero}")),
        ("conv_kernel", json!(17), "d_conv is larger than 16".into()),
        ("num_hidden_layers", json!(0), format!("`num_hidden_layers{zero}")),
        // A zero width is named by its key, not met as a tensor of the wrong shape.
        ("hidden_size", json!(0), format!("`hidden_size{zero}")),
        ("intermediate_size", json!(0), format!("`intermediate_size{zero}")),
        ("expand", json!(0), format!("`expand{zero}")),
        ("vocab_size", json!(0), format!("`vocab_size{zero}")),
        ("layer_norm_epsilon", json!(1e300), "layer_norm_epsilon".into()),
    ];
    for (key, value, shown) in cases {
        let s = scratch("hf_f32_tied");
        s.set_config(key, value);
        let err = s.load_err();
        assert_mentions(&err, &["config.json", &shown]);
    }
    let zeros: [(&str, &str); 3] =
        [("d_model", "d_model"), ("n_layer", "n_layer"), ("vocab_size", "vocab_size")];
    for (key, shown) in zeros {
        let s = scratch("orig_st_bf16");
        s.set_config(key, json!(0));
        assert_mentions(&s.load_err(), &["config.json", &format!("`{shown}{zero}")]);
    }
    for key in ["d_state", "d_conv", "expand"] {
        let s = scratch("orig_st_bf16");
        s.edit_json("config.json", |m| m["ssm_cfg"][key] = json!(0));
        assert_mentions(&s.load_err(), &["config.json", &format!("`{key}{zero}")]);
    }
}

#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    // The fixtures' vocabulary is far below 100000.
    for key in ["eos_token_id", "bos_token_id", "pad_token_id"] {
        let s = scratch("hf_f32_tied");
        s.set_config(key, json!(100000));
        assert_mentions(&s.load_err(), &["config.json", key, "token id 100000 is outside the vocabulary"]);
        let s = scratch("hf_f32_tied");
        s.write("generation_config.json", format!("{{\"{key}\": [0, 100000]}}").as_bytes());
        assert_mentions(&s.load_err(), &["generation_config.json", key, "token id 100000"]);
    }
    // The last id of the vocabulary is a token.
    let s = scratch("hf_f32_tied");
    let last = s.load_ok().cfg.vocab_size - 1;
    s.set_config("eos_token_id", json!(last));
    s.write("generation_config.json", format!("{{\"eos_token_id\": {last}}}").as_bytes());
    assert_eq!(s.load_ok().file_config.eos_token_ids, vec![last as u32]);
}

#[test]
fn absurdly_large_config_values_give_errors_not_panics() {
    let max = json!(u64::MAX);
    let huge = json!(1u64 << 40);
    let hf: [(&str, &Value); 9] = [
        ("hidden_size", &max),
        ("expand", &max),
        ("intermediate_size", &max),
        ("state_size", &max),
        ("conv_kernel", &max),
        ("time_step_rank", &max),
        ("num_hidden_layers", &max),
        ("num_hidden_layers", &huge),
        ("vocab_size", &max),
    ];
    for (key, value) in hf {
        let s = scratch("hf_f32_tied");
        s.set_config(key, value.clone());
        if key == "vocab_size" {
            // The vocabulary that counts comes from the embedding; the
            // sampler's is clamped to it.
            let m = s.load_ok();
            assert_eq!(m.sample_vocab(), m.cfg.vocab_size);
            continue;
        }
        let err = s.load_err();
        assert!(err.contains("config.json") || err.contains("backbone."), "{key} = {value}: {err}");
    }
    let orig: [(&str, &Value); 3] = [("d_model", &max), ("n_layer", &max), ("vocab_size", &max)];
    for (key, value) in orig {
        let s = scratch("orig_st_bf16");
        s.set_config(key, value.clone());
        let err = s.load_err();
        assert!(err.contains("config.json") || err.contains("backbone."), "{key} = {value}: {err}");
    }
    // The padding multiple only matters until the embedding is seen.
    let s = scratch("orig_st_bf16");
    s.set_config("pad_vocab_size_multiple", max.clone());
    assert_eq!(s.load_ok().cfg.vocab_size, 48);
    let s = scratch("orig_st_bf16");
    s.edit_json("config.json", |m| m["ssm_cfg"]["expand"] = max.clone());
    assert_mentions(&s.load_err(), &["config.json", "expand"]);
    let s = scratch("orig_st_bf16");
    s.edit_json("config.json", |m| m["ssm_cfg"]["dt_rank"] = max.clone());
    assert_mentions(&s.load_err(), &["x_proj.weight"]);
}

#[test]
fn malformed_generation_config_json_is_named() {
    let s = scratch("hf_f32_tied");
    s.write("generation_config.json", b"{\"eos_token_id\": ");
    assert_mentions(&s.load_err(), &["generation_config.json", "malformed JSON"]);
    s.write("generation_config.json", br#"{"eos_token_id": "end"}"#);
    assert_mentions(&s.load_err(), &["generation_config.json", "eos_token_id", "\"end\""]);
}

// ---------------------------------------------------------------------------
// model.safetensors.index.json
// ---------------------------------------------------------------------------

const INDEX: &str = "model.safetensors.index.json";
const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

#[test]
fn malformed_index_json_is_named() {
    let s = scratch("hf_bf16_untied_sharded");
    let text = s.read(INDEX);
    s.write(INDEX, &text[..text.len() - 10]);
    assert_mentions(&s.load_err(), &[INDEX, "malformed JSON"]);
    s.write(INDEX, b"[]");
    assert_mentions(&s.load_err(), &[INDEX, "expected a JSON object"]);
}

#[test]
fn index_without_a_weight_map() {
    let s = scratch("hf_bf16_untied_sharded");
    s.edit_json(INDEX, |m| {
        m.remove("weight_map");
    });
    assert_mentions(&s.load_err(), &[INDEX, "weight_map", "missing"]);
    s.edit_json(INDEX, |m| {
        m.insert("weight_map".into(), json!(["a.safetensors"]));
    });
    assert_mentions(&s.load_err(), &[INDEX, "weight_map"]);
}

#[test]
fn index_entry_that_is_not_a_file_name() {
    let s = scratch("hf_bf16_untied_sharded");
    s.edit_json(INDEX, |m| m["weight_map"]["backbone.norm_f.weight"] = json!(3));
    assert_mentions(&s.load_err(), &[INDEX, "weight_map.backbone.norm_f.weight", "file name"]);
    let s = scratch("hf_bf16_untied_sharded");
    s.edit_json(INDEX, |m| m["weight_map"]["backbone.norm_f.weight"] = json!("../elsewhere.safetensors"));
    assert_mentions(&s.load_err(), &[INDEX, "weight_map.backbone.norm_f.weight", "../elsewhere.safetensors"]);
}

#[test]
fn index_naming_a_shard_that_does_not_exist() {
    let s = scratch("hf_bf16_untied_sharded");
    s.edit_json(INDEX, |m| {
        m["weight_map"]["lm_head.weight"] = json!("model-00003-of-00003.safetensors");
    });
    let err = s.load_err();
    assert_mentions(&err, &["model-00003-of-00003.safetensors", "not found"]);
}

#[test]
fn shard_deleted_from_beside_its_index() {
    let s = scratch("hf_bf16_untied_sharded");
    s.remove(SHARD2);
    assert_mentions(&s.load_err(), &[SHARD2, "not found"]);
}

#[test]
fn tensor_missing_from_its_shard_is_named() {
    let s = scratch("hf_bf16_untied_sharded");
    s.drop_tensor(SHARD2, "backbone.layers.1.mixer.D");
    let err = s.load_err();
    assert_mentions(&err, &["backbone.layers.1.mixer.D", "missing"]);
}

// ---------------------------------------------------------------------------
// safetensors files
// ---------------------------------------------------------------------------

#[test]
fn safetensors_cut_in_half() {
    let s = scratch("hf_f32_tied");
    let len = s.read("model.safetensors").len();
    s.truncate("model.safetensors", len / 2);
    let err = s.load_err();
    assert_mentions(&err, &["model.safetensors", "not a valid safetensors file", "truncated"]);
}

#[test]
fn safetensors_missing_its_last_byte() {
    let s = scratch("hf_f32_tied");
    let len = s.read("model.safetensors").len();
    s.truncate("model.safetensors", len - 1);
    let err = s.load_err();
    assert_mentions(&err, &["model.safetensors", "not a valid safetensors file", "truncated"]);
    assert_mentions(&err, &[&(len - 1).to_string()]);
}

#[test]
fn safetensors_with_trailing_bytes() {
    let s = scratch("hf_f32_tied");
    let mut bytes = s.read("model.safetensors");
    bytes.extend_from_slice(b"junk");
    s.write("model.safetensors", bytes);
    assert_mentions(&s.load_err(), &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn safetensors_shard_cut_in_half_is_named() {
    let s = scratch("hf_bf16_untied_sharded");
    let len = s.read(SHARD2).len();
    s.truncate(SHARD2, len / 2);
    let err = s.load_err();
    assert_mentions(&err, &[SHARD2, "not a valid safetensors file"]);
    assert!(!err.contains(SHARD1), "only the broken shard is named: {err}");
}

#[test]
fn safetensors_header_length_garbage() {
    for prefix in [u64::MAX, 1 << 40, 200_000_000, 30_000] {
        let s = scratch("hf_f32_tied");
        let mut bytes = s.read("model.safetensors");
        bytes[..8].copy_from_slice(&prefix.to_le_bytes());
        s.write("model.safetensors", bytes);
        let err = s.load_err();
        assert_mentions(&err, &["model.safetensors", "not a valid safetensors file", "header"]);
    }
}

#[test]
fn safetensors_shorter_than_its_header_length() {
    for keep in [0, 3, 7, 8, 20] {
        let s = scratch("hf_f32_tied");
        s.truncate("model.safetensors", keep);
        let err = s.load_err();
        assert_mentions(&err, &["model.safetensors", "not a valid safetensors file"]);
    }
}

#[test]
fn safetensors_header_that_is_not_json() {
    let s = scratch("hf_f32_tied");
    let mut bytes = s.read("model.safetensors");
    bytes[8..40].fill(b'x');
    s.write("model.safetensors", &bytes);
    assert_mentions(&s.load_err(), &["model.safetensors", "not a valid safetensors file", "header"]);
    bytes[8..12].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
    s.write("model.safetensors", &bytes);
    assert_mentions(&s.load_err(), &["model.safetensors", "not a valid safetensors file", "UTF-8"]);
}

#[test]
fn safetensors_header_with_overlapping_offsets() {
    // Same length header, a tensor's offsets edited in place.
    let s = scratch("hf_f32_tied");
    let bytes = s.read("model.safetensors");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let pos = header.find("\"data_offsets\":[").expect("offsets in header") + "\"data_offsets\":[".len();
    let mut edited = bytes.clone();
    // The first offset's first digit becomes a different digit.
    edited[8 + pos] = if bytes[8 + pos] == b'1' { b'2' } else { b'1' };
    s.write("model.safetensors", edited);
    assert_mentions(&s.load_err(), &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn tensor_of_unsupported_dtype_names_tensor_and_dtype() {
    for (dtype, shown) in [(Dtype::F64, "F64"), (Dtype::I64, "I64"), (Dtype::U8, "U8"), (Dtype::BOOL, "BOOL")]
    {
        let s = scratch("hf_f32_tied");
        s.replace_tensor("model.safetensors", "backbone.norm_f.weight", dtype, vec![16]);
        let err = s.load_err();
        assert_mentions(&err, &["backbone.norm_f.weight", shown, "unsupported dtype", "model.safetensors"]);
    }
    // The same in the embedding, the A_log read first, and a shard.
    let s = scratch("hf_f32_tied");
    s.replace_tensor("model.safetensors", "backbone.embeddings.weight", Dtype::F64, vec![50, 16]);
    assert_mentions(&s.load_err(), &["backbone.embeddings.weight", "F64"]);
    let s = scratch("hf_f32_tied");
    s.replace_tensor("model.safetensors", "backbone.layers.0.mixer.A_log", Dtype::I32, vec![32, 8]);
    assert_mentions(&s.load_err(), &["backbone.layers.0.mixer.A_log", "I32"]);
    let s = scratch("hf_bf16_untied_sharded");
    s.replace_tensor(SHARD2, "lm_head.weight", Dtype::F64, vec![61, 24]);
    assert_mentions(&s.load_err(), &["lm_head.weight", "F64", SHARD2]);
}

#[test]
fn unused_tensor_of_unsupported_dtype_is_ignored() {
    // Extra tensors (e.g. int buffers some exports carry) are not the model's business.
    let s = scratch("hf_f32_tied");
    s.rewrite_safetensors("model.safetensors", |ts| {
        ts.push(Stored { name: "extra.step".into(), dtype: Dtype::I64, shape: vec![1], data: vec![0; 8] });
    });
    s.load_ok();
}

// ---------------------------------------------------------------------------
// Tensors missing or of the wrong shape
// ---------------------------------------------------------------------------

#[test]
fn missing_tensor_is_named() {
    for name in [
        "backbone.layers.1.mixer.D",
        "backbone.layers.0.mixer.A_log",
        "backbone.layers.1.mixer.conv1d.bias",
        "backbone.layers.0.norm.weight",
        "backbone.norm_f.weight",
        "backbone.embeddings.weight",
    ] {
        let s = scratch("hf_f32_tied");
        s.drop_tensor("model.safetensors", name);
        let err = s.load_err();
        assert_mentions(&err, &[name, "missing", s.spec()]);
    }
}

#[test]
fn missing_embedding_in_original_layout_names_a_candidate() {
    let s = scratch("orig_st_bf16");
    s.drop_tensor("model.safetensors", "backbone.embedding.weight");
    assert_mentions(&s.load_err(), &["`backbone.embedding.weight`", "missing"]);
}

#[test]
fn untied_config_without_lm_head_loads_as_tied() {
    // The issue's rule: a missing lm_head.weight means tied embeddings.
    let s = scratch("hf_bf16_untied_sharded");
    s.drop_tensor(SHARD2, "lm_head.weight");
    assert!(s.load_ok().cfg.tie_embeddings);
}

#[test]
fn bias_missing_when_config_says_use_bias() {
    let s = scratch("hf_bf16_untied_sharded");
    s.drop_tensor(SHARD2, "backbone.layers.1.mixer.out_proj.bias");
    assert_mentions(&s.load_err(), &["backbone.layers.1.mixer.out_proj.bias", "missing"]);
    let s = scratch("hf_f32_tied");
    s.set_config("use_bias", json!(true));
    assert_mentions(&s.load_err(), &["backbone.layers.0.mixer.in_proj.bias", "missing"]);
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let s = scratch("hf_f32_tied");
    s.replace_tensor("model.safetensors", "backbone.layers.0.mixer.in_proj.weight", Dtype::F32, vec![63, 16]);
    let err = s.load_err();
    assert_mentions(
        &err,
        &["backbone.layers.0.mixer.in_proj.weight", "[63, 16]", "[64, 16]", "model.safetensors"],
    );

    let cases: [(&str, Vec<usize>, &str); 6] = [
        ("backbone.layers.1.mixer.conv1d.weight", vec![32, 4], "[32, 1, 4]"),
        ("backbone.layers.1.mixer.x_proj.weight", vec![32, 17], "[17, 32]"),
        ("backbone.layers.1.mixer.dt_proj.weight", vec![32, 2], "[32, 1]"),
        ("backbone.layers.0.mixer.A_log", vec![32, 9], "[32, 8]"),
        ("backbone.layers.1.mixer.D", vec![1, 32], "[32]"),
        ("backbone.norm_f.weight", vec![15], "[16]"),
    ];
    for (name, shape, want) in cases {
        let s = scratch("hf_f32_tied");
        let got = format!("{shape:?}");
        s.replace_tensor("model.safetensors", name, Dtype::F32, shape);
        let err = s.load_err();
        assert_mentions(&err, &[name, &got, want]);
    }
}

#[test]
fn wrong_shape_in_a_bf16_shard_names_the_shard() {
    let s = scratch("hf_bf16_untied_sharded");
    s.replace_tensor(SHARD2, "lm_head.weight", Dtype::BF16, vec![60, 24]);
    let err = s.load_err();
    assert_mentions(&err, &["lm_head.weight", SHARD2, "[60, 24]", "[61, 24]"]);
}

#[test]
fn config_with_more_layers_than_the_file() {
    let s = scratch("hf_f32_tied");
    s.set_config("num_hidden_layers", json!(3));
    let err = s.load_err();
    assert_mentions(&err, &["backbone.layers.2.", "missing"]);
    let s = scratch("orig_bin");
    s.set_config("n_layer", json!(3));
    assert_mentions(&s.load_err(), &["backbone.layers.2.", "missing"]);
}

#[test]
fn config_d_model_mismatching_the_tensors() {
    let s = scratch("hf_f32_tied");
    s.set_config("hidden_size", json!(20));
    let err = s.load_err();
    assert_mentions(&err, &["backbone.embeddings.weight", "[50, 16]", "[50, 20]"]);
    let s = scratch("orig_st_bf16");
    s.set_config("d_model", json!(32));
    let err = s.load_err();
    assert_mentions(&err, &["backbone.embedding.weight", "[48, 16]", "[48, 32]"]);
}

#[test]
fn config_inner_dimensions_mismatching_the_tensors() {
    let cases = [
        ("intermediate_size", json!(48), "backbone.layers.0.mixer.A_log"),
        ("state_size", json!(4), "backbone.layers.0.mixer.A_log"),
        ("conv_kernel", json!(3), "backbone.layers.0.mixer.conv1d.weight"),
        ("time_step_rank", json!(2), "backbone.layers.0.mixer.x_proj.weight"),
    ];
    for (key, value, tensor) in cases {
        let s = scratch("hf_f32_tied");
        s.set_config(key, value);
        let err = s.load_err();
        assert_mentions(&err, &[tensor, "has shape", "expected"]);
    }
}

#[test]
fn original_embedding_with_fewer_rows_than_the_vocabulary() {
    let s = scratch("orig_st_bf16");
    s.set_config("vocab_size", json!(60));
    let err = s.load_err();
    assert_mentions(&err, &["backbone.embedding.weight", "[48, 16]", "[64, 16]"]);
}

// ---------------------------------------------------------------------------
// pytorch_model.bin
// ---------------------------------------------------------------------------

#[test]
fn pytorch_model_bin_truncated() {
    let len = fs::metadata(fixtures_dir().join("orig_bin/pytorch_model.bin")).unwrap().len() as usize;
    for keep in [len / 2, len - 1, len - 22, 100, 0] {
        let s = scratch("orig_bin");
        s.truncate("pytorch_model.bin", keep);
        let err = s.load_err();
        assert_mentions(&err, &["pytorch_model.bin"]);
        assert!(err.contains("zip") || err.contains("truncated"), "kept {keep} bytes: {err}");
    }
}

#[test]
fn pytorch_model_bin_that_is_not_a_zip() {
    let s = scratch("orig_bin");
    s.write("pytorch_model.bin", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n");
    let err = s.load_err();
    assert_mentions(&err, &["pytorch_model.bin", "not a valid torch.save zip archive"]);
    // A legacy (pre-1.6) torch.save file starts with a pickle, not a zip.
    s.write("pytorch_model.bin", [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8]);
    assert_mentions(&s.load_err(), &["pytorch_model.bin", "zip"]);
}

/// IEEE CRC-32, as zip archives store it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn le16(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}

fn le32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

/// Where an uncompressed zip entry's data lies, and every place its CRC is
/// stored (central directory, local header, data descriptor).
fn stored_entry(zip: &[u8], suffix: &str) -> (std::ops::Range<usize>, Vec<usize>) {
    let mut at = 0;
    while at + 46 <= zip.len() {
        if zip[at..at + 4] == [0x50, 0x4b, 0x01, 0x02] {
            let (nlen, xlen, clen) = (le16(zip, at + 28), le16(zip, at + 30), le16(zip, at + 32));
            let name = &zip[at + 46..at + 46 + nlen];
            if name.ends_with(suffix.as_bytes()) {
                assert_eq!(le16(zip, at + 10), 0, "{suffix} is stored, not deflated");
                let size = le32(zip, at + 24);
                let local = le32(zip, at + 42);
                let data = local + 30 + le16(zip, local + 26) + le16(zip, local + 28);
                let mut crcs = vec![at + 16, local + 14];
                let desc = data + size;
                crcs.push(if zip[desc..desc + 4] == [0x50, 0x4b, 0x07, 0x08] { desc + 4 } else { desc });
                return (data..data + size, crcs);
            }
            at += 46 + nlen + xlen + clen;
        } else {
            at += 1;
        }
    }
    panic!("no {suffix} entry in the zip");
}

#[test]
fn pytorch_model_bin_with_a_corrupt_entry_is_caught_by_its_crc() {
    let s = scratch("orig_bin");
    let mut bytes = s.read("pytorch_model.bin");
    let (data, _) = stored_entry(&bytes, "/data/2");
    bytes[data.start + 5] ^= 0x40;
    s.write("pytorch_model.bin", &bytes);
    assert_mentions(&s.load_err(), &["pytorch_model.bin"]);
}

#[test]
fn pytorch_model_bin_with_a_corrupt_pickle_never_panics() {
    // Every byte of data.pkl flipped in turn (low and high bit alternately),
    // the CRCs fixed up so the pickle reader itself sees the damage. Loading
    // may succeed (a byte no one reads) or fail, but must never panic or abort.
    let s = scratch("orig_bin");
    let original = s.read("pytorch_model.bin");
    let (pkl, crcs) = stored_entry(&original, "/data.pkl");
    let mut failed = 0;
    let mut panicked = vec![];
    for i in pkl.clone() {
        let flip = if i % 2 == 0 { 0x01u8 } else { 0x80 };
        let mut bytes = original.clone();
        bytes[i] ^= flip;
        let crc = crc32(&bytes[pkl.clone()]).to_le_bytes();
        for &c in &crcs {
            if le32(&original, c) != 0 {
                bytes[c..c + 4].copy_from_slice(&crc);
            }
        }
        s.write("pytorch_model.bin", &bytes);
        match catch_unwind(AssertUnwindSafe(|| LoadedModel::load(s.spec()))) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                failed += 1;
                let msg = e.to_string();
                assert!(msg.contains("pytorch_model.bin") || msg.contains("backbone."), "{msg}");
            }
            Err(_) => panicked.push((i - pkl.start, flip)),
        }
    }
    assert!(panicked.is_empty(), "loading panicked for (data.pkl offset, xor) {panicked:?}");
    assert!(failed > 0, "flipping pickle bytes never gave an error");
}

// ---------------------------------------------------------------------------
// safetensors header bytes, one at a time
// ---------------------------------------------------------------------------

#[test]
fn safetensors_with_a_corrupt_header_byte_never_panics() {
    // Each byte of the length prefix and the JSON header replaced in turn by
    // a digit, a quote, a sign or a brace: shapes, offsets, dtypes and names
    // all get damaged somewhere. Never a panic; any error names the file or
    // a tensor.
    let s = scratch("hf_f32_tied");
    let original = s.read("model.safetensors");
    let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let mut panicked = vec![];
    for i in 0..8 + n {
        let value = [b'9', b'"', b'-', b'}'][i % 4];
        if original[i] == value {
            continue;
        }
        let mut bytes = original.clone();
        bytes[i] = value;
        s.write("model.safetensors", &bytes);
        match catch_unwind(AssertUnwindSafe(|| LoadedModel::load(s.spec()))) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(msg.contains("model.safetensors") || msg.contains("backbone."), "{msg}");
            }
            Err(_) => panicked.push((i, value as char)),
        }
    }
    assert!(panicked.is_empty(), "loading panicked for (byte, new value) {panicked:?}");
}

// ---------------------------------------------------------------------------
// The Hugging Face cache
// ---------------------------------------------------------------------------

#[test]
fn repo_not_in_the_cache_says_how_to_download_it() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_in_cache("state-spaces/mamba-130m-hf", cache.path()).unwrap_err().to_string();
    assert_mentions(
        &err,
        &["state-spaces/mamba-130m-hf", "not in the local Hugging Face cache", "huggingface-cli download"],
    );
    assert_mentions(&err, &["models--state-spaces--mamba-130m-hf"]);
}

#[test]
fn repo_in_the_cache_without_a_usable_snapshot() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--name");
    // refs/main names a snapshot that is not there, and two others are.
    fs::create_dir_all(repo.join("snapshots/aaa")).unwrap();
    fs::create_dir_all(repo.join("snapshots/bbb")).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), "ccc\n").unwrap();
    let err = resolve_in_cache("org/name", cache.path()).unwrap_err().to_string();
    assert_mentions(&err, &["org/name", "download"]);
}

#[test]
fn cached_snapshot_without_files_says_what_is_missing() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--name");
    fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), "abc").unwrap();
    let dir = resolve_in_cache("org/name", cache.path()).unwrap();
    let err = load_err(dir.to_str().unwrap());
    assert_mentions(&err, &["abc", "no config.json"]);
    // An interrupted download: config.json only.
    fs::copy(fixtures_dir().join("hf_f32_tied/config.json"), dir.join("config.json")).unwrap();
    assert_mentions(&load_err(dir.to_str().unwrap()), &["no weights"]);
}

// ---------------------------------------------------------------------------
// Run-time input to a session
// ---------------------------------------------------------------------------

fn tied() -> (Truth, LoadedModel) {
    let t = Truth::load("hf_f32_tied");
    let m = load_ok(t.dir_str());
    assert_eq!(m.cfg.vocab_size, 50);
    (t, m)
}

fn all_states(s: &Session<'_>) -> Vec<Vec<f32>> {
    (0..s.slots()).map(|i| s.slot_state(i).unwrap().to_vec()).collect()
}

/// A session of `n` slots, each already holding a non-zero state.
fn warm_session<'m>(m: &'m LoadedModel, n: usize) -> Session<'m> {
    let mut s = Session::new(m, &Sequential, n).unwrap();
    let seqs: Vec<Vec<u32>> = (0..n as u32).map(|i| vec![3 + i, 7, 11 + i]).collect();
    let seqs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let slots: Vec<usize> = (0..n).collect();
    s.prefill(&seqs, &slots, LogitsMode::Last).unwrap();
    assert!(all_states(&s).iter().all(|st| st.iter().any(|&x| x != 0.0)));
    s
}

#[test]
fn prefill_token_out_of_vocabulary_in_the_second_sequence() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 2);
    let before = all_states(&s);
    let err = s.prefill(&[&[1, 2, 3], &[4, 77, 5]], &[0, 1], LogitsMode::All).unwrap_err().to_string();
    assert_mentions(&err, &["token id 77", "50", "sequence 1", "position 1"]);
    assert_eq!(all_states(&s), before, "a refused prefill changed a slot's state");
}

#[test]
fn prefill_token_out_of_vocabulary_in_a_later_chunk() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 2);
    s.chunk_tokens = 2;
    let before = all_states(&s);
    let seq: Vec<u32> = vec![3, 4, 5, 6, 7, 8, 9, u32::MAX];
    let err = s.prefill(&[&[1, 2, 3], &seq], &[1, 0], LogitsMode::Last).unwrap_err().to_string();
    assert_mentions(&err, &[&format!("token id {}", u32::MAX), "50", "sequence 1", "position 7"]);
    assert_eq!(all_states(&s), before, "a refused chunked prefill changed a slot's state");
}

#[test]
fn prefill_accepts_the_last_id_and_refuses_the_first_past_the_end() {
    let (_t, m) = tied();
    let mut s = Session::new(&m, &Sequential, 1).unwrap();
    s.prefill(&[&[49]], &[0], LogitsMode::Last).unwrap();
    let before = all_states(&s);
    let err = s.prefill(&[&[50]], &[0], LogitsMode::Last).unwrap_err().to_string();
    assert_mentions(&err, &["token id 50", "50 entries"]);
    assert_eq!(all_states(&s), before);
}

#[test]
fn padded_vocabulary_rows_are_valid_ids_and_the_padded_size_is_the_limit() {
    // orig_bin: vocab_size 50 padded to 56 embedding rows.
    let t = Truth::load("orig_bin");
    let m = load_ok(t.dir_str());
    assert_eq!(m.cfg.vocab_size, 56);
    let mut s = Session::new(&m, &Sequential, 1).unwrap();
    s.prefill(&[&[52, 55]], &[0], LogitsMode::Last).unwrap();
    let err = s.step(&[56], &[0]).unwrap_err().to_string();
    assert_mentions(&err, &["token id 56", "56 entries"]);
}

#[test]
fn step_token_out_of_vocabulary() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 3);
    let before = all_states(&s);
    let err = s.step(&[1, 2, 1000], &[0, 1, 2]).unwrap_err().to_string();
    assert_mentions(&err, &["token id 1000", "50", "slot 2"]);
    assert_eq!(all_states(&s), before, "a refused step changed a slot's state");
    let err = s.step(&[u32::MAX], &[1]).unwrap_err().to_string();
    assert_mentions(&err, &[&u32::MAX.to_string(), "50"]);
    assert_eq!(all_states(&s), before);
}

#[test]
fn empty_sequence_is_refused() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 2);
    let before = all_states(&s);
    let err = s.prefill(&[&[1, 2], &[]], &[0, 1], LogitsMode::Last).unwrap_err().to_string();
    assert_mentions(&err, &["sequence 1", "empty"]);
    assert_eq!(all_states(&s), before);
}

#[test]
fn empty_batches_do_nothing() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 2);
    let before = all_states(&s);
    match catch_unwind(AssertUnwindSafe(|| s.prefill(&[], &[], LogitsMode::All).map(|v| v.len()))) {
        Ok(Ok(n)) => assert_eq!(n, 0),
        Ok(Err(_)) => {}
        Err(_) => panic!("an empty prefill panicked"),
    }
    match catch_unwind(AssertUnwindSafe(|| s.step(&[], &[]).map(<[f32]>::len))) {
        Ok(Ok(n)) => assert_eq!(n, 0),
        Ok(Err(_)) => {}
        Err(_) => panic!("an empty step panicked"),
    }
    assert_eq!(all_states(&s), before);
}

#[test]
fn slot_out_of_range() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 2);
    let before = all_states(&s);
    let err = s.prefill(&[&[1], &[2]], &[0, 2], LogitsMode::Last).unwrap_err().to_string();
    assert_mentions(&err, &["slot 2", "2 slots"]);
    let err = s.step(&[1, 2], &[usize::MAX, 0]).unwrap_err().to_string();
    assert_mentions(&err, &[&format!("slot {}", usize::MAX), "2 slots"]);
    assert_mentions(&s.reset(5).unwrap_err().to_string(), &["slot 5", "2 slots"]);
    assert_mentions(&s.slot_state(2).unwrap_err().to_string(), &["slot 2", "2 slots"]);
    assert_mentions(&s.set_slot_state(9, &before[0]).unwrap_err().to_string(), &["slot 9", "2 slots"]);
    assert_eq!(all_states(&s), before);
}

#[test]
fn a_session_without_slots_refuses_every_slot() {
    let (_t, m) = tied();
    let mut s = Session::new(&m, &Sequential, 0).unwrap();
    assert_eq!(s.slots(), 0);
    assert_mentions(&s.step(&[1], &[0]).unwrap_err().to_string(), &["slot 0", "0 slots"]);
    assert_mentions(
        &s.prefill(&[&[1]], &[0], LogitsMode::Last).unwrap_err().to_string(),
        &["slot 0", "0 slots"],
    );
}

#[test]
fn a_session_too_large_to_address_is_an_error() {
    let (_t, m) = tied();
    match catch_unwind(AssertUnwindSafe(|| Session::new(&m, &Sequential, usize::MAX).map(|s| s.slots()))) {
        Ok(Err(e)) => assert_mentions(&e.to_string(), &["slots"]),
        Ok(Ok(n)) => panic!("a session of {n} slots was made"),
        Err(_) => panic!("Session::new(usize::MAX slots) panicked"),
    }
}

#[test]
fn same_slot_twice_in_one_batch() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 3);
    let before = all_states(&s);
    let err = s.prefill(&[&[1], &[2], &[3]], &[2, 0, 2], LogitsMode::Last).unwrap_err().to_string();
    assert_mentions(&err, &["slot 2", "twice"]);
    let err = s.step(&[1, 2], &[1, 1]).unwrap_err().to_string();
    assert_mentions(&err, &["slot 1", "twice"]);
    assert_eq!(all_states(&s), before);
}

#[test]
fn mismatched_sequence_and_slot_counts() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 3);
    let before = all_states(&s);
    let err = s.prefill(&[&[1], &[2]], &[0], LogitsMode::Last).unwrap_err().to_string();
    assert_mentions(&err, &["2 sequences", "1 slot"]);
    let err = s.prefill(&[&[1]], &[0, 1], LogitsMode::Last).unwrap_err().to_string();
    assert_mentions(&err, &["1 sequence", "2 slots"]);
    let err = s.step(&[1, 2, 3], &[0, 1]).unwrap_err().to_string();
    assert_mentions(&err, &["3 tokens", "2 slots"]);
    let err = s.step(&[1], &[]).unwrap_err().to_string();
    assert_mentions(&err, &["1 token", "0 slots"]);
    assert_eq!(all_states(&s), before);
}

#[test]
fn saved_state_of_the_wrong_length_is_refused() {
    let (_t, m) = tied();
    let mut s = warm_session(&m, 1);
    let before = all_states(&s);
    let short = vec![0.0f32; before[0].len() - 1];
    let err = s.set_slot_state(0, &short).unwrap_err().to_string();
    assert_mentions(&err, &[&short.len().to_string(), &before[0].len().to_string()]);
    assert_eq!(all_states(&s), before);
}

#[test]
fn a_session_works_normally_after_refused_calls() {
    let (t, m) = tied();
    let ids = &t.prompts.iter().find(|p| p.ids.len() > 3).unwrap().ids;
    let mut fresh = Session::new(&m, &Sequential, 2).unwrap();
    let want = fresh.prefill(&[ids], &[1], LogitsMode::All).unwrap();

    let mut s = Session::new(&m, &Sequential, 2).unwrap();
    s.chunk_tokens = 3;
    assert!(s.prefill(&[ids, &[99]], &[1, 0], LogitsMode::All).is_err());
    assert!(s.prefill(&[ids, &[]], &[1, 0], LogitsMode::All).is_err());
    assert!(s.prefill(&[ids, ids], &[1, 1], LogitsMode::All).is_err());
    assert!(s.step(&[60], &[1]).is_err());
    assert!(s.step(&[1], &[7]).is_err());
    let got = s.prefill(&[ids], &[1], LogitsMode::All).unwrap();
    assert_eq!(got, want, "logits after refused calls differ from a fresh session's");
    assert_eq!(s.slot_state(1).unwrap(), fresh.slot_state(1).unwrap());
    assert!(s.slot_state(0).unwrap().iter().all(|&x| x == 0.0), "slot 0 was never used");
}

#[test]
fn no_call_with_bad_input_panics() {
    // A sweep of odd ids, slots and lengths: every call returns, Ok or Err.
    let (_t, m) = tied();
    let ids: [u32; 5] = [0, 49, 50, 1 << 31, u32::MAX];
    let slots: [usize; 4] = [0, 1, 2, usize::MAX];
    let mut s = Session::new(&m, &Sequential, 2).unwrap();
    for chunk in [0, 1, 2, 7] {
        s.chunk_tokens = chunk;
        for &a in &ids {
            for &b in &ids {
                for &sa in &slots {
                    for &sb in &slots {
                        let seqs: [&[u32]; 2] = [&[a, 1, 2], &[3, b]];
                        assert!(!panics(|| s.prefill(&seqs, &[sa, sb], LogitsMode::All).map(|_| ())));
                        assert!(!panics(|| s.step(&[a, b], &[sa, sb]).map(|_| ())));
                        assert!(!panics(|| s.prefill(&[&[a]], &[sa], LogitsMode::Last).map(|_| ())));
                    }
                }
            }
        }
    }
}
