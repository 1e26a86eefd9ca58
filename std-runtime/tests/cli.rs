//! The `mamba-rs` binary end to end on the transformers fixtures.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(case: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(case);
    p.to_string_lossy().into_owned()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mamba-rs")).args(args).output().expect("run mamba-rs")
}

fn ok_stdout(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "mamba-rs {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn err_text(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "mamba-rs {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "mamba-rs {args:?} panicked: {err}");
    err
}

fn truth(case: &str) -> Value {
    let text = std::fs::read_to_string(PathBuf::from(fixture(case)).join("truth.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read_f64(case: &str, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(PathBuf::from(fixture(case)).join(name)).unwrap();
    bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn ids_arg(v: &Value) -> String {
    v.as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn max_diff(rows: &Value, want: &[f64]) -> f64 {
    let got: Vec<f64> = rows
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

#[test]
fn logits_command_matches_truth_for_a_ragged_batch_in_prefill_and_step() {
    let case = "hf_bf16_untied_sharded";
    let t = truth(case);
    let prompts = t["prompts"].as_array().unwrap();
    let model = fixture(case);
    let mut args = vec!["logits".to_string(), "--model".into(), model, "--all".into()];
    for p in prompts {
        args.push("--ids".into());
        args.push(ids_arg(&p["ids"]));
    }
    for extra in [None, Some("--step")] {
        let mut a = args.clone();
        a.extend(extra.map(String::from));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = ok_stdout(&refs);
        let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), prompts.len(), "one JSON line per sequence");
        for (line, p) in lines.iter().zip(prompts) {
            assert_eq!(line["ids"], p["ids"], "lines come in input order");
            let d = max_diff(&line["logits"], &read_f64(case, p["logits"].as_str().unwrap()));
            assert!(d < 1e-3, "{extra:?}: max |diff| {d}");
        }
    }
}

#[test]
fn logits_without_all_prints_the_last_row() {
    let case = "orig_bin";
    let t = truth(case);
    let p = &t["prompts"][1];
    let out = ok_stdout(&["logits", "-m", &fixture(case), "--ids", &ids_arg(&p["ids"])]);
    let line: Value = serde_json::from_str(out.trim()).unwrap();
    let rows = line["logits"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    let want = read_f64(case, p["logits"].as_str().unwrap());
    let v = t["padded_vocab_size"].as_u64().unwrap() as usize;
    assert!(max_diff(&line["logits"], &want[want.len() - v..]) < 1e-3);
}

#[test]
fn greedy_generate_json_matches_transformers() {
    for case in ["hf_f32_tied", "orig_st_bf16"] {
        let t = truth(case);
        let p = &t["prompts"][1];
        let out = ok_stdout(&[
            "generate",
            "-m",
            &fixture(case),
            "--ids",
            &ids_arg(&p["ids"]),
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--json",
        ]);
        let line: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(line["prompt_ids"], p["ids"]);
        assert_eq!(line["generated_ids"], p["greedy"], "{case}");
        assert_eq!(line["finish_reason"], "length");
        assert!(line["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(line["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn generate_with_text_prompt_uses_the_tokenizer_and_streams_text() {
    let case = "hf_f32_tied";
    let t = truth(case);
    let p = t["prompts"].as_array().unwrap().iter().find(|p| p["text"].is_string()).unwrap();
    let text = p["text"].as_str().unwrap();
    let args =
        ["generate", "-m", &fixture(case), "--prompt", text, "--temperature", "0", "--max-tokens", "12"];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let line: Value = serde_json::from_str(ok_stdout(&json_args).trim()).unwrap();
    assert_eq!(line["prompt_ids"], p["ids"], "the tokenizer gives the fixture's ids");
    assert_eq!(line["generated_ids"], p["greedy"]);
    let streamed = ok_stdout(&args);
    assert!(streamed.starts_with(text), "{streamed}");
    let gen_text = line["text"].as_str().unwrap();
    assert!(!gen_text.is_empty());
    assert!(gen_text.starts_with(' '), "the continuation keeps its leading space: {gen_text:?}");
    assert_eq!(streamed.trim_end(), format!("{text}{gen_text}"), "streamed text equals the JSON text");
}

#[test]
fn same_seed_gives_same_sample() {
    let m = fixture("hf_f32_tied");
    let args = ["generate", "-m", &m, "--ids", "3,4,5", "--temperature", "1.0", "--seed", "7", "--json"];
    let a: Value = serde_json::from_str(ok_stdout(&args).trim()).unwrap();
    let b: Value = serde_json::from_str(ok_stdout(&args).trim()).unwrap();
    assert_eq!(a["generated_ids"], b["generated_ids"]);
}

#[test]
fn inspect_reports_state_bytes_and_parameters() {
    let out = ok_stdout(&["inspect", "-m", &fixture("hf_bf16_untied_sharded"), "--json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    // n_layer * d_inner * (d_conv + d_state) * 4 = 2 * 48 * (3 + 16) * 4
    assert_eq!(v["state_bytes_per_sequence"], 2 * 48 * (3 + 16) * 4);
    assert_eq!(v["dtype"], "bf16");
    assert_eq!(v["dt_rank"], 5);
    assert_eq!(v["tied_embeddings"], false);
    assert_eq!(v["weight_files"].as_array().unwrap().len(), 2);
    assert_eq!(v["layer_norm_epsilon"], 1e-5);
}

#[test]
fn bad_arguments_are_clear_errors() {
    let m = fixture("hf_f32_tied");
    assert!(err_text(&["logits", "-m", &m, "--ids", "1,x"]).contains("`x` is not a token id"));
    assert!(err_text(&["logits", "-m", &m, "--ids", "1,50"]).contains("token id 50 is out of range"));
    assert!(err_text(&["generate", "-m", &m]).contains("--prompt TEXT or --ids"));
    assert!(
        err_text(&["generate", "-m", &fixture("orig_bin"), "--prompt", "hi"]).contains("no tokenizer.json")
    );
    assert!(err_text(&["generate", "-m", &m, "--ids", "1", "--top-p", "0"]).contains("top-p"));
    assert!(err_text(&["inspect", "-m", "/no/such/model/dir"]).contains("no such model directory"));
    let e = err_text(&["inspect", "-m", "someorg/some-model-that-is-not-cached"]);
    assert!(e.contains("huggingface-cli download someorg/some-model-that-is-not-cached"), "{e}");
}
