//! `--device cuda` in every command: on a machine without a usable GPU it is
//! an error naming the reason (non-zero exit, no panic); with one, greedy
//! output equals the CPU's.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixture(case: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(case);
    p.to_string_lossy().into_owned()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mamba-rs")).args(args).output().expect("run mamba-rs")
}

/// `None` when CUDA device 0 opens; else why not.
fn no_gpu() -> Option<String> {
    mamba_cuda::CudaBackend::new(0).err().map(|e| e.to_string())
}

fn assert_clear_failure(args: &[&str]) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mamba-rs {args:?} should fail without a GPU");
    assert!(!err.contains("panicked"), "mamba-rs {args:?} panicked: {err}");
    assert!(err.contains("no CUDA"), "mamba-rs {args:?}: the error should name what is missing: {err}");
}

#[test]
fn without_a_gpu_every_command_says_why() {
    let Some(why) = no_gpu() else {
        println!("skipped: a CUDA device is present (this test covers machines without one)");
        return;
    };
    println!("no GPU here: {why}");
    let m = fixture("hf_f32_tied");
    assert_clear_failure(&[
        "generate",
        "--device",
        "cuda",
        "--model",
        &m,
        "--ids",
        "1,2",
        "--max-tokens",
        "2",
    ]);
    assert_clear_failure(&["logits", "--device", "cuda", "--model", &m, "--ids", "1,2"]);
    assert_clear_failure(&["bench", "--device", "cuda", "--shape", "130m", "--batch", "1"]);
    assert_clear_failure(&["serve", "--device", "cuda", "--model", &m, "--port", "0"]);
}

#[test]
fn an_unknown_device_is_an_error() {
    let out = run(&["logits", "--device", "tpu", "--model", &fixture("hf_f32_tied"), "--ids", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("expected cpu, cuda or cuda:N"), "{err}");
}

#[test]
fn with_a_gpu_greedy_generation_equals_the_cpu() {
    if let Some(why) = no_gpu() {
        println!("skipped: no CUDA device: {why}");
        return;
    }
    let m = fixture("hf_bf16_untied_sharded");
    let args = |d: &'static str| {
        vec![
            "generate",
            "--device",
            d,
            "--model",
            &m,
            "--ids",
            "1,2,3",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        ]
        .into_iter()
        .map(String::from)
        .chain(["--json".to_string(), "--ignore-eos".to_string()])
        .collect::<Vec<_>>()
    };
    let ids = |out: Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["generated_ids"].clone()
    };
    let cpu = ids(Command::new(env!("CARGO_BIN_EXE_mamba-rs")).args(args("cpu")).output().unwrap());
    let gpu = ids(Command::new(env!("CARGO_BIN_EXE_mamba-rs")).args(args("cuda")).output().unwrap());
    assert_eq!(cpu, gpu, "greedy tokens on the GPU and the CPU");
}
