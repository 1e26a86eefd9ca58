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
    let out =
        ok_stdout(&["inspect", "-m", &fixture("hf_bf16_untied_sharded"), "--json", "--state-memory", "1MiB"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["sequences_fit_in_budget"], (1 << 20) / (2 * 48 * (3 + 16) * 4));
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

#[test]
fn logits_last_n_in_prefill_and_step_paths() {
    let case = "hf_f16_k2";
    let t = truth(case);
    let v = t["padded_vocab_size"].as_u64().unwrap() as usize;
    let p = &t["prompts"][2];
    let want = read_f64(case, p["logits"].as_str().unwrap());
    let model = fixture(case);
    for extra in [None, Some("--step")] {
        let mut args = vec!["logits", "-m", &model];
        let ids = ids_arg(&p["ids"]);
        args.extend(["--ids", &ids, "--last", "3"]);
        args.extend(extra);
        let out = ok_stdout(&args);
        let line: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(line["logits"].as_array().unwrap().len(), 3);
        assert!(max_diff(&line["logits"], &want[want.len() - 3 * v..]) < 1e-3, "{extra:?}");
    }
}

#[test]
fn several_prompts_run_as_one_batch_and_print_in_input_order() {
    let case = "hf_f32_tied";
    let t = truth(case);
    let prompts = t["prompts"].as_array().unwrap();
    let model = fixture(case);
    let mut args = vec!["generate".to_string(), "-m".into(), model, "--temperature".into(), "0".into()];
    args.extend(["--max-tokens".into(), "12".into(), "--json".into(), "--n".into(), "2".into()]);
    args.extend(["--logprobs".into(), "2".into(), "--echo".into()]);
    for p in prompts.iter().take(4) {
        args.extend(["--ids".into(), ids_arg(&p["ids"])]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ok_stdout(&refs);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8, "4 prompts x 2 samples");
    for (k, line) in lines.iter().enumerate() {
        let p = &prompts[k / 2];
        assert_eq!(line["prompt_index"], k / 2);
        assert_eq!(line["index"], k % 2);
        assert_eq!(line["prompt_ids"], p["ids"]);
        assert_eq!(line["generated_ids"], p["greedy"], "line {k}");
        let lps = line["logprobs"].as_array().unwrap();
        assert_eq!(lps.len(), 12);
        assert_eq!(lps[0]["top"].as_array().unwrap().len(), 2);
        let plp = line["prompt_logprobs"].as_array().unwrap();
        assert_eq!(plp.len(), p["ids"].as_array().unwrap().len());
        assert!(plp[0].is_null());
    }
}

#[test]
fn prompts_file_and_stop_strings() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("prompts.txt");
    std::fs::write(&f, "the cat sat\n\nthe dog\n").unwrap();
    let model = fixture("hf_f32_tied");
    let base = ["generate", "-m", &model, "--temperature", "0", "--max-tokens", "12", "--json"];
    let mut args = base.to_vec();
    let fs = f.to_string_lossy().into_owned();
    args.extend(["--prompts-file", &fs]);
    let out = ok_stdout(&args);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "blank lines are skipped");
    let text = lines[0]["text"].as_str().unwrap().to_string();
    let words: Vec<&str> = text.split_whitespace().collect();
    let stop = words[2];
    let mut args = base.to_vec();
    args.extend(["--prompt", "the cat sat", "--stop", stop]);
    let line: Value = serde_json::from_str(ok_stdout(&args).trim()).unwrap();
    assert_eq!(line["finish_reason"], "stop");
    let cut = line["text"].as_str().unwrap();
    assert_eq!(cut, &text[..text.find(stop).unwrap()], "cut right before the first {stop:?}");
}

#[test]
fn bench_reports_one_json_line_per_batch_size() {
    let model = fixture("hf_bf16_untied_sharded");
    let args =
        ["bench", "-m", &model, "--batch", "1,3", "--prompt-len", "9", "--gen-len", "4", "--repeat", "1"];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = ok_stdout(&json_args);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (line, batch) in lines.iter().zip([1, 3]) {
        assert_eq!(line["batch"], batch);
        assert_eq!(line["dtype"], "bf16");
        assert!(line["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(line["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(line["state_bytes_per_seq"], 2 * 48 * (3 + 16) * 4);
        // Steps held against read passes: a batch-1 figure.
        let share = &line["decode_bound_share_paired"];
        assert_eq!(share.as_f64().is_some_and(|s| s > 0.0), batch == 1, "{share}");
    }
    assert!(err_text(&["bench", "--shape", "9000b"]).contains("130m"));
    assert!(err_text(&["bench", "-m", &model, "--batch", "0"]).contains("at least 1"));

    // --profile: the same line with the time per op, and a table per phase in text.
    json_args.push("--profile");
    let line: Value = serde_json::from_str(ok_stdout(&json_args).lines().next().unwrap()).unwrap();
    let ops: Vec<&str> = line["profile"]["decode_step"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["op"].as_str().unwrap())
        .collect();
    // A step's dt_proj and scan are timed as one op.
    for op in ["in_proj", "conv1d", "x_proj", "dt_proj+scan", "out_proj", "lm_head"] {
        assert!(ops.contains(&op), "{op} in {ops:?}");
    }
    let text = ok_stdout(&[&args[..], &["--profile"]].concat());
    assert!(text.contains("decode step") && text.contains("total"), "{text}");
    assert!(err_text(&["bench", "--device", "cuda", "--shape", "130m", "--profile"]).contains("--profile"));
}

#[test]
fn bf16_dot_runs_the_dot_products_or_says_why_it_cannot() {
    let case = "hf_bf16_untied_sharded";
    let (t, model) = (truth(case), fixture(case));
    let p = &t["prompts"][2];
    let ids = ids_arg(&p["ids"]);
    let args = ["logits", "-m", &model, "--all", "--ids", &ids, "--bf16-dot"];
    // On CUDA it would change nothing: said before any device is opened.
    for cmd in [&["logits", "--ids", "1,2"][..], &["generate", "--prompt", "a"], &["bench", "--gen-len", "1"]]
    {
        let e = err_text(&[cmd, &["-m", &model, "--device", "cuda", "--bf16-dot"]].concat());
        assert!(e.contains("--bf16-dot") && e.contains("--device cuda"), "{cmd:?}: {e}");
    }
    #[cfg(target_arch = "x86_64")]
    let can = std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    let can = false;
    if !can {
        let e = err_text(&args);
        assert!(e.contains("--bf16-dot") && e.contains("AVX-512"), "{e}");
        eprintln!("--bf16-dot checked as an error only: this CPU lacks AVX-512 BF16");
        return;
    }
    // Near the float64 truth, but not at the f32 products' 1e-3.
    let line: Value = serde_json::from_str(ok_stdout(&args).trim()).unwrap();
    let want = read_f64(case, p["logits"].as_str().unwrap());
    let d = max_diff(&line["logits"], &want);
    assert!(d > 1e-4 && d < 0.1, "max |diff| {d} with bf16 dot products");
    let bench = [
        "bench",
        "-m",
        &model,
        "--prompt-len",
        "5",
        "--gen-len",
        "2",
        "--repeat",
        "1",
        "--json",
        "--bf16-dot",
    ];
    let line: Value = serde_json::from_str(ok_stdout(&bench).trim()).unwrap();
    assert!(line["kernels"].as_str().unwrap().ends_with("+bf16dot"), "{line}");
    // Without the AVX-512 tiles, and on weights it does not change.
    let out =
        Command::new(env!("CARGO_BIN_EXE_mamba-rs")).args(args).env("MAMBA_SIMD", "avx2").output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("--bf16-dot") && e.contains("tiles are off"), "{e}");
    let f32_model = fixture("hf_f32_tied");
    let out = run(&["logits", "-m", &f32_model, "--ids", "1,2", "--bf16-dot"]);
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && note.contains("bf16 products only"), "{note}");
}

#[test]
fn convert_command_writes_a_cast_copy_and_names_bad_dtypes() {
    let model = fixture("hf_f32_tied");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16");
    let args = ["convert", "-m", &model, "--out", out.to_str().unwrap(), "--dtype", "bf16", "--json"];
    let v: Value = serde_json::from_str(ok_stdout(&args).trim()).unwrap();
    assert_eq!(v["converted_tensors"], 22);
    assert!(v["bytes_out"].as_u64().unwrap() * 2 == v["bytes_in"].as_u64().unwrap(), "{v}");
    assert!(v["max_abs_logit_diff"].as_f64().unwrap() > 0.0, "{v}");
    let line = ok_stdout(&["logits", "-m", out.to_str().unwrap(), "--ids", "1,2,3"]);
    assert!(line.contains("logits"), "{line}");
    let o = out.to_str().unwrap();
    assert!(err_text(&["convert", "-m", &model, "--out", o, "--dtype", "bf16"]).contains("--force"));
    assert!(
        err_text(&["convert", "-m", &model, "--out", o, "--dtype", "int4"]).contains("unknown dtype `int4`")
    );
    assert!(err_text(&["convert", "-m", &model, "--out", o, "--dtype", "q8"]).contains("mamba-rs quantize"));
}

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/mamba-demo")
}

#[test]
fn perplexity_command_gives_the_demo_models_trained_figure_in_any_window() {
    let eval: Value =
        serde_json::from_str(&std::fs::read_to_string(demo().join("eval.json")).unwrap()).unwrap();
    let want = eval["heldout"]["perplexity_per_token"].as_f64().unwrap();
    let file = demo().join("heldout.txt");
    for window in ["512", "100"] {
        let out = ok_stdout(&["perplexity", "--file", file.to_str().unwrap(), "--window", window, "--json"]);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["tokens_scored"], 1350);
        let got = v["perplexity"].as_f64().unwrap();
        assert!((got / want - 1.0).abs() < 1e-4, "window {window}: perplexity {got} vs trained {want}");
    }
    let e = err_text(&["perplexity", "--file", "/nonexistent/text.txt"]);
    assert!(e.contains("/nonexistent/text.txt"), "{e}");
}

#[test]
fn quantize_command_writes_a_q8_model_that_loads_generates_and_keeps_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8");
    let heldout = demo().join("heldout.txt");
    let args = ["quantize", "--out", out.to_str().unwrap(), "--eval", heldout.to_str().unwrap(), "--json"];
    let v: Value = serde_json::from_str(ok_stdout(&args).trim()).unwrap();
    eprintln!("{v}");
    // Embedding, in/x/out_proj of 4 layers; the dt_proj rows (12) are not whole blocks.
    assert_eq!(v["quantized_tensors"], 13);
    assert_eq!(v["not_quantized_matrices"].as_array().unwrap().len(), 4);
    assert_eq!(v["eval_tokens"], 1350);
    let change = v["perplexity_change"].as_f64().unwrap();
    assert!(change.abs() < 0.005, "perplexity change {change}");
    assert!(v["top1_agreement"].as_f64().unwrap() > 0.97, "{v}");
    assert!(v["bytes_out"].as_u64().unwrap() * 10 < v["bytes_in"].as_u64().unwrap() * 6, "{v}");
    let info: Value =
        serde_json::from_str(&ok_stdout(&["inspect", "-m", out.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(info["dtype"], "q8_0");
    let text = ok_stdout(&[
        "generate",
        "-m",
        out.to_str().unwrap(),
        "--prompt",
        "And God said",
        "--max-tokens",
        "8",
    ]);
    assert!(text.starts_with("And God said"), "{text}");
    // Again into the same place: refused without --force.
    let e = err_text(&args);
    assert!(e.contains("--force"), "{e}");
}

#[test]
fn q8_checkpoints_with_missing_scales_or_foreign_quantization_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8");
    ok_stdout(&["quantize", "--out", out.to_str().unwrap(), "--json"]);
    let cfg_path = out.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, cfg.replace("\"q8_0\"", "\"gptq\"")).unwrap();
    let e = err_text(&["inspect", "-m", out.to_str().unwrap()]);
    assert!(e.contains("quant_method") && e.contains("gptq"), "{e}");
    std::fs::write(&cfg_path, cfg).unwrap();
    // Drop one scale tensor from the file.
    let path = out.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keep: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "backbone.layers.2.mixer.out_proj.weight_scale")
        .collect();
    let data = safetensors::serialize(keep, &None).unwrap();
    std::fs::write(&path, data).unwrap();
    let e = err_text(&["inspect", "-m", out.to_str().unwrap()]);
    assert!(e.contains("backbone.layers.2.mixer.out_proj.weight_scale") && e.contains("missing"), "{e}");
}
