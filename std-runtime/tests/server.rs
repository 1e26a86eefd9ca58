//! The OpenAI-compatible server over real HTTP on loopback: a `reqwest`
//! client against the server started in-process on a free port (or the
//! `mamba-rs serve` binary, for signals), on the tiny fixture model.
//!
//! Greedy results are checked against the fixture's `transformers` truth,
//! the CLI, and the same requests run alone; log-probs against the float64
//! reference logits; the prefix cache against a server without one.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mamba_core::Sequential;
use mamba_runtime::generate::{generate, GenerateParams};
use mamba_runtime::model::LoadedModel;
use mamba_runtime::sampling::{Rng, SamplingParams};
use mamba_runtime::server::{Loader, Server, ServerConfig, ServerError, ShutdownHandle};
use mamba_runtime::session::Session;
use mamba_runtime::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::{json, Value};

const NAME: &str = "tiny";

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(case)
}

fn truth(case: &str) -> Value {
    let text = std::fs::read_to_string(fixture(case).join("truth.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

fn config() -> ServerConfig {
    ServerConfig {
        port: 0,
        model_names: vec![NAME.into()],
        max_batch: 8,
        threads: 1,
        shutdown_grace: Duration::from_secs(2),
        ..ServerConfig::default()
    }
}

fn loader(dir: PathBuf) -> Loader {
    Box::new(move || LoadedModel::load_dir(&dir).map_err(|e| e.to_string()))
}

struct Srv {
    base: String,
    http: reqwest::Client,
    stop: ShutdownHandle,
    task: tokio::task::JoinHandle<Result<(), ServerError>>,
}

impl Srv {
    async fn start(cfg: ServerConfig) -> Srv {
        let s = Self::spawn(cfg, loader(fixture("hf_f32_tied"))).await;
        s.wait_ready().await;
        s
    }

    async fn spawn(cfg: ServerConfig, loader: Loader) -> Srv {
        let server = Server::bind(cfg, loader).await.unwrap();
        let base = format!("http://{}", server.local_addr().unwrap());
        let stop = server.shutdown_handle();
        let task = tokio::spawn(server.run());
        Srv { base, http: reqwest::Client::new(), stop, task }
    }

    async fn wait_ready(&self) {
        let t0 = Instant::now();
        while self.get("/health").await.0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(20), "the server never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>, key: Option<&str>) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        req = req.header("content-type", "application/json");
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}")))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_raw(path, body.to_string(), None).await
    }

    /// A 200 answer's body.
    async fn ok(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.post(path, body.clone()).await;
        assert_eq!(status, 200, "{body} -> {v}");
        v
    }

    /// The `data:` payloads of a stream, in order.
    async fn stream(&self, path: &str, body: Value) -> Vec<String> {
        let r = self.http.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text = r.text().await.unwrap();
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect()
    }

    async fn metrics(&self) -> String {
        let (status, text) = self.get("/metrics").await;
        assert_eq!(status, 200);
        text
    }

    /// A sample's value (`name` with its labels, as printed).
    async fn metric(&self, name: &str) -> f64 {
        metric_in(&self.metrics().await, name)
    }

    /// Wait until `name` reads `want`.
    async fn await_metric(&self, name: &str, want: f64) {
        let t0 = Instant::now();
        loop {
            let got = self.metric(name).await;
            if got == want {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{name} stays at {got}, expected {want}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn shutdown(self) {
        self.stop.shutdown();
        self.task.await.unwrap().unwrap();
    }
}

fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "a stream ends with [DONE]");
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_loading_then_models_and_metrics_answer() {
    let slow: Loader = Box::new(|| {
        std::thread::sleep(Duration::from_millis(400));
        LoadedModel::load_dir(&fixture("hf_f32_tied")).map_err(|e| e.to_string())
    });
    let srv = Srv::spawn(config(), slow).await;
    let (status, body) = srv.get("/health").await;
    assert_eq!((status, body.as_str()), (503, r#"{"status":"loading"}"#));
    let (status, err) = srv.post("/v1/completions", json!({"prompt": [1]})).await;
    assert_eq!(status, 503);
    assert_eq!(err["error"]["type"], "server_error");
    assert_eq!(srv.metric("mamba_model_loaded").await, 0.0);
    srv.wait_ready().await;
    assert_eq!(srv.metric("mamba_model_loaded").await, 1.0);
    let (status, models) = srv.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], NAME);
    assert_eq!(models["object"], "list");
    assert_eq!(srv.get("/v1/models/tiny").await.0, 200);
    assert_eq!(srv.get("/v1/models/other").await.0, 404);
    let m = srv.metrics().await;
    for name in [
        "mamba_http_requests_total{endpoint=\"/health\",status=\"503\"}",
        "mamba_http_requests_total{endpoint=\"/v1/completions\",status=\"503\"}",
        "mamba_prompt_tokens_total",
        "mamba_generation_tokens_total",
        "mamba_generation_tokens_per_second",
        "mamba_requests_running",
        "mamba_requests_waiting",
        "mamba_slots_in_use",
        "mamba_slots_free",
        "mamba_time_to_first_token_seconds_bucket{le=\"+Inf\"}",
        "mamba_inter_token_latency_seconds_count",
        "mamba_prefix_cache_hits_total",
        "mamba_prefix_cache_misses_total",
        "mamba_prefix_cache_tokens_saved_total",
    ] {
        assert!(m.lines().any(|l| l.starts_with(&format!("{name} "))), "/metrics lacks {name}:\n{m}");
    }
    assert_eq!(metric_in(&m, "mamba_slots_free"), 8.0);
    srv.shutdown().await;

    // A model that fails to load ends the server with the loader's error.
    let broken: Loader = Box::new(|| Err("no such model".into()));
    let srv = Srv::spawn(config(), broken).await;
    match srv.task.await.unwrap() {
        Err(ServerError::Load(e)) => assert_eq!(e, "no such model"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completions_equal_the_transformers_truth_and_the_cli() {
    let srv = Srv::start(config()).await;
    let t = truth("hf_f32_tied");
    let prompts = t["prompts"].as_array().unwrap();
    // One request per prompt, and all of them as one request of several prompts.
    let all: Vec<Vec<u32>> = prompts.iter().map(|p| ids(&p["ids"])).collect();
    let many = srv
        .ok("/v1/completions", json!({"model": NAME, "prompt": all, "max_tokens": 12, "temperature": 0}))
        .await;
    assert_eq!(many["choices"].as_array().unwrap().len(), prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let greedy = ids(&p["greedy"]);
        let v = srv
            .ok("/v1/completions", json!({"prompt": p["ids"], "max_tokens": greedy.len(), "temperature": 0}))
            .await;
        let c = &v["choices"][0];
        assert_eq!(ids(&c["token_ids"]), greedy, "prompt {i}");
        assert_eq!(c["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens"], p["ids"].as_array().unwrap().len());
        assert_eq!(v["usage"]["completion_tokens"], greedy.len());
        assert_eq!(v["object"], "text_completion");
        assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
        assert_eq!(many["choices"][i]["index"], i);
        assert_eq!(ids(&many["choices"][i]["token_ids"]), greedy, "prompt {i} among several");
    }
    // A text prompt: the text of the greedy ids.
    let p = prompts.iter().find(|p| p["text"].is_string()).unwrap();
    let tok = Tokenizer::from_dir(&fixture("hf_f32_tied")).unwrap().unwrap();
    let greedy = ids(&p["greedy"]);
    let v = srv.ok("/v1/completions", json!({"prompt": p["text"], "max_tokens": 12, "temperature": 0})).await;
    assert_eq!(ids(&v["choices"][0]["token_ids"]), greedy);
    assert_eq!(v["choices"][0]["text"].as_str().unwrap().trim(), tok.decode(&greedy).unwrap());
    // The CLI says the same.
    let p = &prompts[2];
    let csv: Vec<String> = ids(&p["ids"]).iter().map(u32::to_string).collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mamba-rs"))
        .args(["generate", "--model", fixture("hf_f32_tied").to_str().unwrap(), "--ids", &csv.join(",")])
        .args(["--temperature", "0", "--max-tokens", "12", "--json", "--threads", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    let v = srv.ok("/v1/completions", json!({"prompt": p["ids"], "max_tokens": 12, "temperature": 0})).await;
    assert_eq!(v["choices"][0]["token_ids"], line["generated_ids"]);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_samples_seeds_and_stop_strings() {
    let srv = Srv::start(config()).await;
    let sampled = |seed: u64| json!({"prompt": [3, 34, 8], "max_tokens": 10, "temperature": 1.0, "top_p": 0.95, "seed": seed, "n": 3});
    let a = srv.ok("/v1/completions", sampled(42)).await;
    let b = srv.ok("/v1/completions", sampled(42)).await;
    let c = srv.ok("/v1/completions", sampled(43)).await;
    let toks = |v: &Value| -> Vec<Value> {
        v["choices"].as_array().unwrap().iter().map(|c| c["token_ids"].clone()).collect()
    };
    assert_eq!(toks(&a).len(), 3);
    for (i, ch) in a["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(ch["index"], i);
    }
    assert_eq!(toks(&a), toks(&b), "the same seed gives the same samples");
    assert_ne!(toks(&a), toks(&c), "another seed gives others");
    assert!(toks(&a)[0] != toks(&a)[1] || toks(&a)[1] != toks(&a)[2], "the n samples differ");
    assert_eq!(a["usage"]["completion_tokens"], 30);
    assert_eq!(a["usage"]["prompt_tokens"], 3);
    // Greedy samples of one prompt are all the greedy continuation.
    let t = truth("hf_f32_tied");
    let p = &t["prompts"][1];
    let v = srv
        .ok("/v1/completions", json!({"prompt": p["ids"], "max_tokens": 12, "temperature": 0, "n": 4}))
        .await;
    for ch in v["choices"].as_array().unwrap() {
        assert_eq!(ids(&ch["token_ids"]), ids(&p["greedy"]));
    }
    // Stop strings: the text ends right before the first one, as a string or a list.
    let p = &t["prompts"][2];
    let body = |stop: Value| json!({"prompt": p["ids"], "max_tokens": 12, "temperature": 0, "stop": stop});
    let full = srv.ok("/v1/completions", body(Value::Null)).await["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(full, " saw cat house bird green sat bird house books saw sat sky");
    for stop in [json!("house bird"), json!(["zebra", "bird green", "house b"])] {
        let v = srv.ok("/v1/completions", body(stop.clone())).await;
        let ch = &v["choices"][0];
        assert_eq!(ch["text"], " saw cat ", "stop {stop}");
        assert_eq!(ch["finish_reason"], "stop");
        assert_eq!(ids(&ch["token_ids"]), ids(&p["greedy"])[..4].to_vec(), "generation ends at the stop");
    }
    // EOS ends a sequence unless ignored; stop_token_ids add more.
    let v = srv
        .ok(
            "/v1/completions",
            json!({"prompt": p["ids"], "max_tokens": 12, "temperature": 0, "stop_token_ids": [26]}),
        )
        .await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(ids(&v["choices"][0]["token_ids"]), vec![39, 18, 26]);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_carry_the_same_text_and_end_with_done() {
    let srv = Srv::start(config()).await;
    let body = json!({"prompt": ["the cat sat", "a dog"], "max_tokens": 7, "temperature": 0, "n": 2});
    let whole = srv.ok("/v1/completions", body.clone()).await;
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let events = chunks(&srv.stream("/v1/completions", stream_body).await);
    let mut text: HashMap<u64, String> = HashMap::new();
    let mut finish: HashMap<u64, String> = HashMap::new();
    for e in &events[..events.len() - 1] {
        assert_eq!(e["object"], "text_completion");
        assert_eq!(e["id"], events[0]["id"]);
        assert!(e["usage"].is_null());
        for c in e["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap();
            *text.entry(i).or_default() += c["text"].as_str().unwrap();
            if let Some(r) = c["finish_reason"].as_str() {
                assert!(finish.insert(i, r.to_string()).is_none(), "choice {i} finished twice");
            }
        }
    }
    let usage = events.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    assert_eq!(text.len(), 4);
    for (i, ch) in whole["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(text[&(i as u64)], ch["text"].as_str().unwrap(), "choice {i}");
        assert_eq!(finish[&(i as u64)], "length");
    }
    // Without include_usage there is no usage chunk.
    let mut plain = body.clone();
    plain["stream"] = json!(true);
    let events = chunks(&srv.stream("/v1/completions", plain).await);
    assert!(events.iter().all(|e| e.get("usage").is_none() && !e["choices"].as_array().unwrap().is_empty()));

    // Chat: a role chunk, content deltas, a finish chunk.
    let chat =
        json!({"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6, "temperature": 0});
    let whole = srv.ok("/v1/chat/completions", chat.clone()).await;
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let mut s = chat.clone();
    s["stream"] = json!(true);
    let events = chunks(&srv.stream("/v1/chat/completions", s).await);
    assert_eq!(events[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let content: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect::<Vec<_>>()
        .concat();
    assert_eq!(content, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let last = events.last().unwrap();
    assert_eq!(last["object"], "chat.completion.chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    srv.shutdown().await;
}

fn read_f64(path: &Path) -> Vec<f64> {
    std::fs::read(path).unwrap().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_with_echo_match_the_reference_logits() {
    let srv = Srv::start(config()).await;
    let t = truth("hf_f32_tied");
    let p = &t["prompts"][2];
    let prompt = ids(&p["ids"]);
    let greedy = ids(&p["greedy"]);
    let vocab = t["vocab_size"].as_u64().unwrap() as usize;
    let logits = read_f64(&fixture("hf_f32_tied").join(p["logits"].as_str().unwrap()));
    let log_softmax = |row: &[f64], tok: u32| {
        let max = row.iter().cloned().fold(f64::MIN, f64::max);
        row[tok as usize] - max - row.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
    };
    let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 3, "echo": true});
    let v = srv.ok("/v1/completions", body.clone()).await;
    let ch = &v["choices"][0];
    let lp = &ch["logprobs"];
    let n = prompt.len() + 4;
    for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[k].as_array().unwrap().len(), n, "{k}");
    }
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.concat(), ch["text"].as_str().unwrap(), "the token strings make the echoed text");
    assert!(ch["text"].as_str().unwrap().starts_with("the cat sat on the warm mat saw"));
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    let mut at = 0;
    for (o, t) in offsets.iter().zip(&tokens) {
        assert_eq!(*o, at);
        at += t.chars().count() as u64;
    }
    for i in 1..prompt.len() {
        let row = &logits[(i - 1) * vocab..i * vocab];
        let got = lp["token_logprobs"][i].as_f64().unwrap();
        assert!((got - log_softmax(row, prompt[i])).abs() < 1e-3, "prompt token {i}: {got}");
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() <= 3 && !top.is_empty());
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        let want = (0..vocab as u32).map(|t| log_softmax(row, t)).fold(f64::MIN, f64::max);
        assert!((best - want).abs() < 1e-3, "top alternative of {i}");
    }
    let last = &logits[(prompt.len() - 1) * vocab..prompt.len() * vocab];
    let first_gen = lp["token_logprobs"][prompt.len()].as_f64().unwrap();
    assert!((first_gen - log_softmax(last, greedy[0])).abs() < 1e-3);
    for i in prompt.len()..n {
        // Greedy: the chosen token is the best alternative.
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3);
        let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert_eq!(best, lp["token_logprobs"][i].as_f64().unwrap());
        assert_eq!(top[tokens[i]].as_f64(), lp["token_logprobs"][i].as_f64());
    }
    // Without echo: the generated tokens only, offsets after the prompt text.
    let v = srv
        .ok("/v1/completions", json!({"prompt": p["text"], "max_tokens": 4, "temperature": 0, "logprobs": 0}))
        .await;
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["text_offset"][0], p["text"].as_str().unwrap().len());
    assert_eq!(lp["top_logprobs"][0], json!({}));
    // Echo without log-probs prepends the prompt.
    let v = srv
        .ok("/v1/completions", json!({"prompt": p["text"], "max_tokens": 2, "temperature": 0, "echo": true}))
        .await;
    assert_eq!(v["choices"][0]["text"], "the cat sat on the warm mat saw cat");
    assert!(v["choices"][0]["logprobs"].is_null());
    // Streamed: each chunk carries its token's log-probs.
    let mut s = body.clone();
    s["stream"] = json!(true);
    let events = chunks(&srv.stream("/v1/completions", s).await);
    let echoed = &events[0]["choices"][0];
    assert_eq!(echoed["logprobs"]["tokens"].as_array().unwrap().len(), prompt.len());
    let streamed: Vec<f64> = events[1..]
        .iter()
        .filter_map(|e| e["choices"][0]["logprobs"]["token_logprobs"][0].as_f64())
        .collect();
    let whole: Vec<f64> = v_lps(&srv.ok("/v1/completions", body).await)[prompt.len()..].to_vec();
    assert_eq!(streamed, whole);
    // Chat log-probs: token, logprob, bytes, top_logprobs.
    let chat = json!({"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 3, "temperature": 0,
                      "logprobs": true, "top_logprobs": 2});
    let v = srv.ok("/v1/chat/completions", chat).await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    let joined: String = content.iter().map(|c| c["token"].as_str().unwrap()).collect();
    assert_eq!(joined, v["choices"][0]["message"]["content"].as_str().unwrap());
    for c in content {
        assert_eq!(c["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(c["top_logprobs"][0]["logprob"], c["logprob"]);
        assert_eq!(c["bytes"], json!(c["token"].as_str().unwrap().as_bytes()));
    }
    srv.shutdown().await;
}

fn v_lps(v: &Value) -> Vec<f64> {
    let lps = v["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap();
    lps.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()
}

/// A copy of the tiny fixture with a `tokenizer_config.json`.
fn with_tokenizer_config(cfg: Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("hf_f32_tied").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_uses_the_tokenizer_template_or_the_plain_default() {
    // Default: "role: content" lines, then "assistant:".
    let srv = Srv::start(config()).await;
    let messages = json!([{"role": "system", "content": "the"}, {"role": "user", "content": "the cat sat"}]);
    let chat = srv
        .ok("/v1/chat/completions", json!({"messages": messages, "max_tokens": 6, "temperature": 0}))
        .await;
    let plain = srv
        .ok(
            "/v1/completions",
            json!({"prompt": "system: the\nuser: the cat sat\nassistant:", "max_tokens": 6, "temperature": 0}),
        )
        .await;
    assert_eq!(chat["usage"], plain["usage"]);
    assert_eq!(chat["choices"][0]["message"]["content"], plain["choices"][0]["text"]);
    srv.shutdown().await;

    // The model's own template, with bos/eos tokens, python string methods and raise_exception.
    let template = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}\
                    {{ raise_exception('no tools here') }}{% endif %}{{ m['content'].strip() }} \
                    {% endfor %}{% if add_generation_prompt %}the{% endif %}";
    let dir = with_tokenizer_config(json!({
        "bos_token": "<|endoftext|>",
        "eos_token": {"content": "<|endoftext|>", "special": true},
        "chat_template": template,
    }));
    let srv = Srv::spawn(config(), loader(dir.path().to_path_buf())).await;
    srv.wait_ready().await;
    let body = json!({"messages": [{"role": "user", "content": "  the cat sat on "}], "max_tokens": 8,
                      "temperature": 0, "ignore_eos": true});
    let chat = srv.ok("/v1/chat/completions", body).await;
    // "<|endoftext|>the cat sat on the"
    let ids_prompt = json!([0, 2, 18, 38, 33, 2]);
    let plain = srv
        .ok(
            "/v1/completions",
            json!({"prompt": ids_prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(chat["usage"], plain["usage"]);
    assert_eq!(chat["choices"][0]["message"]["content"], plain["choices"][0]["text"]);
    let (status, err) =
        srv.post("/v1/chat/completions", json!({"messages": [{"role": "tool", "content": "x"}]})).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["message"], "no tools here");
    assert_eq!(err["error"]["param"], "messages");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_openais_error_naming_the_field() {
    let srv = Srv::start(ServerConfig { max_prompt_tokens: 64, ..config() }).await;
    let c = "/v1/completions";
    let chat = "/v1/chat/completions";
    let with = |extra: Value| {
        let mut b = json!({"prompt": [1, 2, 3]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string()
    };
    let many_stops: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let cases: Vec<(&str, String, Option<&str>, &str)> = vec![
        (c, "{\"prompt\": [1,".into(), None, "not valid JSON"),
        (c, "[1, 2]".into(), None, "JSON object"),
        (c, "{}".into(), Some("prompt"), "required"),
        (c, json!({"prompt": {"a": 1}}).to_string(), Some("prompt"), "must be a string"),
        (c, json!({"prompt": []}).to_string(), Some("prompt"), "empty"),
        (c, json!({"prompt": [1, "a"]}).to_string(), Some("prompt"), "must be a string"),
        (c, json!({"prompt": [1, 50]}).to_string(), Some("prompt"), "out of range"),
        (c, json!({"prompt": [[1], [-1]]}).to_string(), Some("prompt"), "out of range"),
        (c, json!({"prompt": [[1], []]}).to_string(), Some("prompt"), "empty"),
        (c, json!({"prompt": vec![3; 65]}).to_string(), Some("prompt"), "limit of 64"),
        (c, with(json!({"max_tokens": "ten"})), Some("max_tokens"), "an integer"),
        (c, with(json!({"max_tokens": -1})), Some("max_tokens"), "0..="),
        (c, with(json!({"max_tokens": 1_000_000_000})), Some("max_tokens"), "0..="),
        (c, with(json!({"temperature": -0.5})), Some("temperature"), "[0, 2]"),
        (c, with(json!({"temperature": "hot"})), Some("temperature"), "a number"),
        (c, with(json!({"top_p": 0})), Some("top_p"), "(0, 1]"),
        (c, with(json!({"top_p": 1.5})), Some("top_p"), "(0, 1]"),
        (c, with(json!({"top_k": -5})), Some("top_k"), "-1.."),
        (c, with(json!({"min_p": 2})), Some("min_p"), "[0, 1]"),
        (c, with(json!({"n": 0})), Some("n"), "1..=8"),
        (c, with(json!({"n": 9})), Some("n"), "state slots"),
        (c, with(json!({"logprobs": 21})), Some("logprobs"), "0..=20"),
        (c, with(json!({"logprobs": "x"})), Some("logprobs"), "an integer"),
        (c, with(json!({"echo": "yes"})), Some("echo"), "a boolean"),
        (c, with(json!({"stop": 5})), Some("stop"), "a string or an array"),
        (c, with(json!({"stop": ["a", 1]})), Some("stop"), "stop[1]"),
        (c, with(json!({"stop": many_stops})), Some("stop"), "more than 16"),
        (c, with(json!({"seed": "x"})), Some("seed"), "an integer"),
        (c, with(json!({"presence_penalty": 3})), Some("presence_penalty"), "[-2, 2]"),
        (c, with(json!({"frequency_penalty": -2.5})), Some("frequency_penalty"), "[-2, 2]"),
        (c, with(json!({"stream": "yes"})), Some("stream"), "a boolean"),
        (c, with(json!({"stream_options": 1})), Some("stream_options"), "an object"),
        (c, with(json!({"model": "gpt-4"})), Some("model"), "does not exist"),
        (c, with(json!({"model": 4})), Some("model"), "a string"),
        (c, with(json!({"suffix": "x"})), Some("suffix"), "not supported"),
        (c, with(json!({"logit_bias": {"1": 5}})), Some("logit_bias"), "not supported"),
        (c, with(json!({"best_of": 3})), Some("best_of"), "best_of"),
        (c, with(json!({"stop_token_ids": [99]})), Some("stop_token_ids"), "not a token id"),
        (chat, "{}".into(), Some("messages"), "required"),
        (chat, json!({"messages": "hi"}).to_string(), Some("messages"), "an array"),
        (chat, json!({"messages": []}).to_string(), Some("messages"), "at least one"),
        (
            chat,
            json!({"messages": [{"role": "robot", "content": "x"}]}).to_string(),
            Some("messages[0].role"),
            "robot",
        ),
        (chat, json!({"messages": [{"content": "x"}]}).to_string(), Some("messages[0].role"), "a string"),
        (
            chat,
            json!({"messages": [{"role": "user", "content": 5}]}).to_string(),
            Some("messages[0].content"),
            "a number",
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(),
            Some("messages[0].content"),
            "only text",
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).to_string(),
            Some("top_logprobs"),
            "logprobs",
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})
                .to_string(),
            Some("tools"),
            "not supported",
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": "the ".repeat(70)}]}).to_string(),
            Some("messages"),
            "limit of 64",
        ),
    ];
    for (path, body, param, words) in &cases {
        let (status, v) = srv.post_raw(path, body.clone(), None).await;
        assert_eq!(status, 400, "{body} -> {v}");
        let e = &v["error"];
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert_eq!(e["param"].as_str(), *param, "{body} -> {v}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(words), "{body}: message {msg:?} lacks {words:?}");
        if let Some(p) = param.filter(|p| !p.contains('[')) {
            assert!(msg.contains(p), "{body}: the message {msg:?} names {p}");
        }
    }
    // Oversized bodies are refused before parsing. The server answers once the
    // limit is passed and closes without reading the rest, so a client still
    // writing the body may see a reset instead of the answer: try again then.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
    let mut answer = None;
    for _ in 0..8 {
        let sent = reqwest::Client::new().post(format!("{}{c}", srv.base)).body(big.clone()).send().await;
        if let Ok(r) = sent {
            answer = Some(r);
            break;
        }
    }
    let r = answer.expect("an answer to the oversized body in 8 tries");
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("larger than the limit"));
    let (status, _) = srv.get("/v1/nothing").await;
    assert_eq!(status, 404);
    // Nothing was disturbed: a good request still works and nothing runs.
    srv.ok(c, json!({"prompt": [1, 2, 3], "max_tokens": 3})).await;
    let m = srv.metrics().await;
    assert_eq!(
        metric_in(&m, "mamba_http_requests_total{endpoint=\"/v1/completions\",status=\"400\"}") as usize,
        cases.iter().filter(|c| c.0 == "/v1/completions").count()
    );
    assert_eq!(metric_in(&m, "mamba_slots_in_use"), 0.0);
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_required_when_set() {
    let srv = Srv::start(ServerConfig { api_key: Some("sk-test".into()), ..config() }).await;
    let body = json!({"prompt": [1, 2], "max_tokens": 2}).to_string();
    for key in [None, Some("sk-wrong"), Some("sk-test2"), Some("")] {
        let (status, v) = srv.post_raw("/v1/completions", body.clone(), key).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let (status, _) = srv.post_raw("/v1/completions", body, Some("sk-test")).await;
    assert_eq!(status, 200);
    assert_eq!(srv.get("/v1/models").await.0, 401);
    assert_eq!(srv.get("/health").await.0, 200, "health needs no key");
    assert_eq!(srv.get("/metrics").await.0, 200, "metrics need no key");
    srv.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_slot_at_once() {
    let srv = Srv::start(ServerConfig { max_tokens_limit: 1 << 30, ..config() }).await;
    let endless = |stream: bool| json!({"prompt": [3], "max_tokens": 1_000_000_000, "temperature": 0, "ignore_eos": true, "stream": stream, "n": 2});
    let url = format!("{}/v1/completions", srv.base);
    // A stream read a little, then dropped.
    let mut r = srv.http.post(&url).json(&endless(true)).send().await.unwrap();
    assert!(r.chunk().await.unwrap().is_some());
    srv.await_metric("mamba_slots_in_use", 2.0).await;
    drop(r);
    srv.await_metric("mamba_slots_in_use", 0.0).await;
    srv.await_metric("mamba_requests_running", 0.0).await;
    assert_eq!(srv.metric("mamba_sequences_finished_total{reason=\"cancelled\"}").await, 2.0);
    // A plain request whose client gives up.
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    assert!(impatient.post(&url).json(&endless(false)).send().await.is_err());
    srv.await_metric("mamba_slots_in_use", 0.0).await;
    srv.await_metric("mamba_sequences_finished_total{reason=\"cancelled\"}", 4.0).await;
    assert_eq!(srv.metric("mamba_slots_free").await, 8.0);
    srv.shutdown().await;
}

/// `mamba-rs serve ARGS --port 0` as a process: the child, its address, its stderr lines.
fn serve_process(args: &[&str]) -> (std::process::Child, String, std::sync::mpsc::Receiver<String>) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mamba-rs"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("the server prints its address");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    (child, addr, rx)
}

async fn await_health(http: &reqwest::Client, base: &str, within: Duration) {
    let t0 = Instant::now();
    while http.get(format!("{base}/health")).send().await.map_or(true, |r| r.status() != 200) {
        assert!(t0.elapsed() < within, "the server never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < within, "the server did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &std::process::Child) {
    let kill = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
}

#[test]
fn sigterm_ends_running_requests_and_exits_zero() {
    let model = fixture("hf_f32_tied");
    let (mut child, addr, rx) = serve_process(&[
        "--model",
        model.to_str().unwrap(),
        "--threads",
        "1",
        "--shutdown-grace",
        "0.5",
        "--max-tokens-limit",
        "2000000000",
        "--served-model-name",
        NAME,
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (base, http) = (format!("http://{addr}"), reqwest::Client::new());
        await_health(&http, &base, Duration::from_secs(20)).await;
        let body = json!({"model": NAME, "prompt": [3], "max_tokens": 2_000_000_000u64, "temperature": 0,
                          "ignore_eos": true, "stream": true});
        let mut r = http.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
        let mut text = String::from_utf8(r.chunk().await.unwrap().unwrap().to_vec()).unwrap();
        sigterm(&child);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // New work is refused while the running stream goes on, then is cancelled.
        let late = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let refused = late.post(format!("{base}/v1/completions")).json(&json!({"prompt": [1]})).send().await;
        assert!(refused.map_or(true, |r| r.status() == 503), "a request after SIGTERM is refused");
        while let Some(c) = r.chunk().await.unwrap() {
            text += std::str::from_utf8(&c).unwrap();
        }
        assert!(text.trim_end().ends_with("data: [DONE]"), "the stream ends properly");
        assert!(text.contains("\"finish_reason\":\"cancelled\""), "cut at the end of the grace period");
    });
    let status = wait_exit(&mut child, Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_cache_gives_identical_results_and_counts_skipped_tokens() {
    let cached = Srv::start(ServerConfig { prefix_cache_bytes: 64 << 20, ..config() }).await;
    let cold = Srv::start(config()).await;
    let t = truth("hf_f32_tied");
    let p = ids(&t["prompts"][3]["ids"]);
    assert_eq!(p.len(), 40);
    let req = |prompt: &[u32]| json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 5});
    let hits = "mamba_prefix_cache_hits_total";
    let misses = "mamba_prefix_cache_misses_total";
    let saved = "mamba_prefix_cache_tokens_saved_total";
    let want = cold.ok("/v1/completions", req(&p)).await["choices"].clone();
    let first = cached.ok("/v1/completions", req(&p)).await["choices"].clone();
    assert_eq!((cached.metric(hits).await, cached.metric(misses).await), (0.0, 1.0));
    assert_eq!(first, want, "a cold run with state capture equals one without");
    let again = cached.ok("/v1/completions", req(&p)).await["choices"].clone();
    assert_eq!((cached.metric(hits).await, cached.metric(saved).await), (1.0, 39.0));
    assert_eq!(again, want, "the whole prompt cached: only its last token runs, same log-probs");
    // A longer prompt resumes from the longest cached prefix.
    let mut longer = p.clone();
    longer.extend([5, 6, 7, 8]);
    let got = cached.ok("/v1/completions", req(&longer)).await["choices"].clone();
    assert_eq!(got, cold.ok("/v1/completions", req(&longer)).await["choices"]);
    assert_eq!((cached.metric(hits).await, cached.metric(saved).await), (2.0, 78.0));
    // Seeded sampling with n > 1 forks from the resumed state the same way.
    let sampled =
        json!({"prompt": longer, "max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 3, "logprobs": 2});
    let got = cached.ok("/v1/completions", sampled.clone()).await["choices"].clone();
    assert_eq!(got, cold.ok("/v1/completions", sampled).await["choices"]);
    assert_eq!((cached.metric(hits).await, cached.metric(saved).await), (3.0, 121.0));
    // Echo needs every prompt position: no lookup.
    let echo = json!({"prompt": p, "max_tokens": 2, "logprobs": 1, "echo": true, "temperature": 0});
    let got = cached.ok("/v1/completions", echo.clone()).await["choices"].clone();
    assert_eq!(got, cold.ok("/v1/completions", echo).await["choices"]);
    assert_eq!((cached.metric(hits).await, cached.metric(misses).await), (3.0, 1.0));
    // Chat: the next turn of a conversation resumes after the previous prompt.
    let turn1 = json!([{"role": "system", "content": "the"}, {"role": "user", "content": "the cat sat"}]);
    let chat = |m: &Value| json!({"messages": m, "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let r1 = cached.ok("/v1/chat/completions", chat(&turn1)).await;
    let before = cached.metric(saved).await;
    let mut turn2 = turn1.as_array().unwrap().clone();
    turn2.push(json!({"role": "assistant", "content": r1["choices"][0]["message"]["content"]}));
    turn2.push(json!({"role": "user", "content": "on the mat"}));
    let turn2 = Value::Array(turn2);
    let r2 = cached.ok("/v1/chat/completions", chat(&turn2)).await;
    assert_eq!(r2["choices"], cold.ok("/v1/chat/completions", chat(&turn2)).await["choices"]);
    let skipped = cached.metric(saved).await - before;
    let turn1_tokens = r1["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(skipped >= turn1_tokens - 1.0, "turn 2 skipped {skipped} tokens of turn 1's {turn1_tokens}");
    assert!(cached.metric("mamba_prefix_cache_entries").await >= 3.0);
    assert_eq!(cold.metric(hits).await + cold.metric(misses).await, 0.0, "no cache, no lookups");
    cached.shutdown().await;
    cold.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_256_requests_from_64_clients_lose_nothing_and_equal_solo_runs() {
    let dir = fixture("hf_f32_tied");
    let srv = Srv::start(ServerConfig { max_batch: 16, prefill_chunk: 64, ..config() }).await;
    let model = LoadedModel::load_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap().unwrap();
    let mut rng = Rng::new(7);
    struct Case {
        prompt: Vec<u32>,
        max_tokens: usize,
        stream: bool,
        want: Vec<u32>,
        text: String,
        finish: &'static str,
    }
    let mut session = Session::new(&model, &Sequential, 1).unwrap();
    let cases: Vec<Case> = (0..256)
        .map(|i| {
            let len = if i % 5 == 0 {
                100 + (rng.next_u64() % 150) as usize
            } else {
                1 + (rng.next_u64() % 40) as usize
            };
            let prompt: Vec<u32> = (0..len).map(|_| 1 + (rng.next_u64() % 49) as u32).collect();
            let max_tokens = 1 + (rng.next_u64() % 24) as usize;
            // Alone, greedy, stopping at EOS (0) as the server does.
            let params =
                GenerateParams { max_tokens, sampling: SamplingParams::default(), stop_ids: vec![0] };
            let out = generate(&mut session, 0, &prompt, &params, |_| Ok(())).unwrap();
            let mut dec = StreamDecoder::new(&tok, &prompt);
            let text: String = out.generated.iter().filter_map(|&t| dec.push(t).unwrap()).collect();
            let finish = if out.generated.last() == Some(&0) { "stop" } else { "length" };
            Case { prompt, max_tokens, stream: i % 4 == 1, want: out.generated, text, finish }
        })
        .collect();
    let cases = std::sync::Arc::new(cases);
    let t0 = Instant::now();
    let mut clients = vec![];
    for c in 0..64 {
        let (http, base, cases) = (srv.http.clone(), srv.base.clone(), cases.clone());
        clients.push(tokio::spawn(async move {
            let url = format!("{base}/v1/completions");
            // Some clients also send a bad request: it is refused and disturbs no one.
            if c % 8 == 0 {
                let r =
                    http.post(&url).json(&json!({"prompt": [1], "temperature": -1})).send().await.unwrap();
                assert_eq!(r.status(), 400);
            }
            let mut done = 0;
            for (i, case) in cases.iter().enumerate().filter(|(i, _)| i % 64 == c) {
                let body = json!({"model": NAME, "prompt": case.prompt, "max_tokens": case.max_tokens,
                                  "temperature": 0, "stream": case.stream});
                let r = http.post(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 200, "request {i}");
                let text = r.text().await.unwrap();
                if case.stream {
                    let events: Vec<String> =
                        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect();
                    let chunks = chunks(&events);
                    let got: String =
                        chunks.iter().map(|e| e["choices"][0]["text"].as_str().unwrap()).collect();
                    assert_eq!(got, case.text, "request {i} (streamed)");
                    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], case.finish);
                } else {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(ids(&v["choices"][0]["token_ids"]), case.want, "request {i}");
                    assert_eq!(v["choices"][0]["text"], case.text.as_str());
                    assert_eq!(v["choices"][0]["finish_reason"], case.finish);
                }
                done += 1;
            }
            done
        }));
    }
    let mut answered = 0;
    for c in clients {
        answered += c.await.unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(answered, 256);
    let generated: usize = cases.iter().map(|c| c.want.len()).sum();
    let m = srv.metrics().await;
    assert_eq!(
        metric_in(&m, "mamba_http_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"),
        256.0
    );
    assert_eq!(metric_in(&m, "mamba_http_requests_total{endpoint=\"/v1/completions\",status=\"400\"}"), 8.0);
    assert_eq!(metric_in(&m, "mamba_generation_tokens_total") as usize, generated);
    assert_eq!(metric_in(&m, "mamba_time_to_first_token_seconds_count"), 256.0);
    for g in ["mamba_slots_in_use", "mamba_requests_running", "mamba_requests_waiting"] {
        assert_eq!(metric_in(&m, g), 0.0, "{g}");
    }
    println!(
        "256 requests from 64 clients in {secs:.2}s: {generated} tokens, {:.0} tokens/s",
        generated as f64 / secs
    );
    srv.shutdown().await;
}

/// The official `openai` Python client, when it is installed (`pip install openai`);
/// `MAMBA_TEST_PYTHON` names the interpreter (default `python3`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works() {
    let python = std::env::var("MAMBA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_openai = std::process::Command::new(&python)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_openai {
        println!("skipped: `{python} -c \"import openai\"` fails (pip install openai to run this test)");
        return;
    }
    let srv = Srv::start(ServerConfig { api_key: Some("sk-local".into()), ..config() }).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/openai_client_check.py");
    let base = format!("{}/v1", srv.base);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg(script)
            .args(["--base-url", &base, "--model", NAME, "--api-key", "sk-local"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("all passed"), "{text}");
    srv.shutdown().await;
}

/// Generated tokens per second and time to first token (p50, p99, measured by
/// the clients) against the number of concurrent clients, on a synthetic
/// model (`MAMBA_BENCH_SHAPE`, default `130m`: random bf16 weights of that
/// shape). Each request: a 16..64-token prompt, `MAMBA_BENCH_TOKENS` (16)
/// generated, streamed. Run it optimised:
/// `cargo test --release -p mamba-runtime --test server -- --ignored --nocapture bench`
#[test]
#[ignore = "a benchmark: run with --release -- --ignored --nocapture bench"]
fn bench_throughput_and_ttft_by_concurrency() {
    let shape = std::env::var("MAMBA_BENCH_SHAPE").unwrap_or_else(|_| "130m".into());
    let gen: usize = std::env::var("MAMBA_BENCH_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let (mut child, addr, _rx) = serve_process(&["--shape", &shape, "--max-batch", "64"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let (base, http) = (format!("http://{addr}"), reqwest::Client::new());
        await_health(&http, &base, Duration::from_secs(300)).await;
        let url = format!("{base}/v1/completions");
        // One request to warm up.
        let warm = json!({"prompt": [1, 2, 3, 4], "max_tokens": 2, "temperature": 0});
        assert_eq!(http.post(&url).json(&warm).send().await.unwrap().status(), 200);
        println!("synthetic {shape}, {gen} tokens per request, prompts of 16..64 tokens, streamed");
        println!("clients  requests  gen_tokens  wall_s  gen_tok/s  ttft_min_s  ttft_p50_s  ttft_p99_s");
        let mut rng = Rng::new(11);
        for (clients, per_client) in [(1usize, 4usize), (8, 2), (64, 1)] {
            let t0 = Instant::now();
            let mut tasks = vec![];
            for _ in 0..clients {
                let prompts: Vec<Vec<u32>> = (0..per_client)
                    .map(|_| (0..16 + rng.next_u64() % 49).map(|_| (rng.next_u64() % 50000) as u32).collect())
                    .collect();
                let (http, url) = (http.clone(), url.clone());
                tasks.push(tokio::spawn(async move {
                    let mut out = vec![];
                    for p in prompts {
                        let body = json!({"prompt": p, "max_tokens": gen, "temperature": 0, "ignore_eos": true,
                                          "stream": true, "stream_options": {"include_usage": true}});
                        let sent = Instant::now();
                        let mut r = http.post(&url).json(&body).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                        let mut text = String::new();
                        let mut ttft = None;
                        while let Some(c) = r.chunk().await.unwrap() {
                            ttft.get_or_insert_with(|| sent.elapsed().as_secs_f64());
                            text += std::str::from_utf8(&c).unwrap();
                        }
                        let events: Vec<String> =
                            text.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect();
                        let usage = chunks(&events).pop().unwrap()["usage"].clone();
                        out.push((ttft.unwrap(), usage["completion_tokens"].as_u64().unwrap()));
                    }
                    out
                }));
            }
            let mut ttfts = vec![];
            let mut tokens = 0;
            for t in tasks {
                for (ttft, n) in t.await.unwrap() {
                    ttfts.push(ttft);
                    tokens += n;
                }
            }
            let wall = t0.elapsed().as_secs_f64();
            ttfts.sort_by(f64::total_cmp);
            let pct = |q: f64| ttfts[((q * ttfts.len() as f64).ceil() as usize).clamp(1, ttfts.len()) - 1];
            println!(
                "{clients:>7}  {:>8}  {tokens:>10}  {wall:>6.1}  {:>9.1}  {:>10.3}  {:>10.3}  {:>10.3}",
                ttfts.len(),
                tokens as f64 / wall,
                ttfts[0],
                pct(0.5),
                pct(0.99)
            );
        }
    });
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
}
