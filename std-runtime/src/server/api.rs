//! `POST /v1/completions` and `POST /v1/chat/completions`: parse and check the
//! request, submit its prompts, answer with one JSON body or a stream of
//! server-sent events in OpenAI's shapes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::chat::Message;
use super::error::ApiError;
use super::job::{Job, Lp, Prompt, Update};
use super::params::{self, as_integer, type_name, Common, Fields};
use super::{ModelInfo, Shared};
use crate::engine::{RequestParams, MAX_TOP_LOGPROBS};
use crate::generate::FinishReason;

/// Most prompts in one completions request.
const MAX_PROMPTS: usize = 1024;

fn body_bytes(app: &Shared, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than the limit of {} bytes", app.cfg.body_limit)
        } else {
            r.body_text()
        };
        ApiError::status(status, msg)
    })
}

/// Run blocking work (tokenizing, rendering) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(format!("a worker failed: {e}")))?
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What every response and chunk of one request carries.
#[derive(Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    object: &'static str,
    include_usage: bool,
}

impl Meta {
    fn new(app: &Shared, prefix: &str, object: &'static str, include_usage: bool) -> Self {
        Meta {
            id: format!("{prefix}-{}", app.next_id()),
            created: unix_now(),
            model: app.cfg.model_names.first().cloned().unwrap_or_default(),
            object,
            include_usage,
        }
    }

    fn chunk(&self, choices: Vec<Value>) -> Value {
        let mut v = json!({
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn usage_chunk(&self, job: &Job) -> Value {
        json!({
            "id": self.id, "object": self.object, "created": self.created, "model": self.model,
            "choices": [], "usage": usage(job),
        })
    }
}

fn usage(job: &Job) -> Value {
    let (p, c) = job.usage();
    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
}

fn reason_str(r: Option<FinishReason>) -> Value {
    r.map_or(Value::Null, |r| Value::String(r.as_str().into()))
}

/// A failed choice makes the whole (non-streaming) request a 500.
/// Run a non-streamed job to its end; an error when any of its choices failed.
async fn run_to_end(job: &mut Job) -> Result<(), ApiError> {
    job.finish().await;
    match job.choices.iter().find(|c| c.finish == Some(FinishReason::Error)) {
        Some(c) => Err(ApiError::internal(c.error.clone().unwrap_or_else(|| "generation failed".into()))),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------- prompts

fn token_ids(v: &[Value], vocab: usize, what: &str) -> Result<Vec<u32>, ApiError> {
    v.iter()
        .enumerate()
        .map(|(i, t)| match as_integer(t) {
            Some(id) if id >= 0 && id < vocab as i128 => Ok(id as u32),
            Some(id) => Err(ApiError::invalid(
                "prompt",
                format!(
                    "{what}[{i}]: token id {id} is out of range: the vocabulary has {vocab} entries (0..{})",
                    vocab - 1
                ),
            )),
            None => Err(ApiError::invalid(
                "prompt",
                format!("{what}[{i}] must be a token id, not {}", type_name(t)),
            )),
        })
        .collect()
}

fn encode(info: &ModelInfo, text: &str) -> Result<Vec<u32>, ApiError> {
    let Some(tok) = &info.tokenizer else {
        return Err(ApiError::invalid(
            "prompt",
            "this model has no tokenizer.json: give the prompt as token ids (an array of integers)",
        ));
    };
    tok.encode(text).map_err(|e| ApiError::invalid("prompt", format!("the prompt cannot be tokenized: {e}")))
}

fn decode(info: &ModelInfo, ids: &[u32]) -> String {
    info.tokenizer.as_ref().and_then(|t| t.decode(ids).ok()).unwrap_or_default()
}

fn check_len(app: &Shared, ids: &[u32], what: &str) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid("prompt", format!("{what} is empty: it must hold at least one token")));
    }
    if ids.len() > app.cfg.max_prompt_tokens {
        return Err(ApiError::invalid(
            "prompt",
            format!("{what} has {} tokens, more than the limit of {}", ids.len(), app.cfg.max_prompt_tokens),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// `prompt`: a string, strings, token ids, or lists of token ids.
fn parse_prompts(app: &Shared, info: &ModelInfo, v: &Value) -> Result<Vec<Prompt>, ApiError> {
    let shape_err = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, an array of strings, an array of token ids, \
             or an array of arrays of token ids",
        )
    };
    let text_prompt = |s: &str| -> Result<Prompt, ApiError> {
        Ok(Prompt { ids: encode(info, s)?, text: s.to_string(), capture: vec![] })
    };
    let id_prompt = |ids: Vec<u32>| Prompt { text: decode(info, &ids), ids, capture: vec![] };
    let prompts = match v {
        Value::String(s) => vec![text_prompt(s)?],
        Value::Array(a) if a.is_empty() => {
            return Err(ApiError::invalid("prompt", "`prompt` is an empty array"))
        }
        Value::Array(a) if a.len() > MAX_PROMPTS && !a[0].is_number() => {
            return Err(ApiError::invalid(
                "prompt",
                format!("more than {MAX_PROMPTS} prompts in one request"),
            ))
        }
        Value::Array(a) if a.iter().all(Value::is_string) => {
            a.iter().map(|s| text_prompt(s.as_str().unwrap_or_default())).collect::<Result<_, _>>()?
        }
        Value::Array(a) if a.iter().all(Value::is_number) => {
            vec![id_prompt(token_ids(a, info.vocab, "prompt")?)]
        }
        Value::Array(a) if a.iter().all(Value::is_array) => a
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let list = p.as_array().map_or(&[][..], Vec::as_slice);
                token_ids(list, info.vocab, &format!("prompt[{i}]")).map(id_prompt)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(shape_err()),
    };
    let many = prompts.len() > 1;
    for (i, p) in prompts.iter().enumerate() {
        let what = if many { format!("prompt {i}") } else { "the prompt".into() };
        check_len(app, &p.ids, &what)?;
    }
    Ok(prompts)
}

// ---------------------------------------------------------------- log-probs

/// The completions API's log-probs of `lps`.
fn legacy_logprobs(lps: &[Lp]) -> Value {
    let top: Vec<Value> = lps
        .iter()
        .map(|l| match &l.top {
            None => Value::Null,
            Some(top) => {
                let mut m = Map::new();
                for (s, lp) in top {
                    m.entry(s.clone()).or_insert(json!(lp));
                }
                Value::Object(m)
            }
        })
        .collect();
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": lps.iter().map(|l| l.offset).collect::<Vec<_>>(),
    })
}

/// The chat API's log-prob entry of one token.
fn chat_logprob(l: &Lp) -> Value {
    let top: Vec<Value> = l
        .top
        .iter()
        .flatten()
        .map(|(s, lp)| json!({"token": s, "logprob": lp, "bytes": s.as_bytes()}))
        .collect();
    json!({"token": l.token, "logprob": l.logprob, "bytes": l.token.as_bytes(), "top_logprobs": top})
}

// ---------------------------------------------------------------- streaming

/// Turns a job's updates into chunks of one API's stream.
trait StreamFormat: Send + 'static {
    fn start(&mut self, job: &Job) -> Vec<Value>;
    fn update(&mut self, job: &Job, u: &Update) -> Vec<Value>;
}

/// A stream being answered: chunks ready to send, and whether `[DONE]` is queued.
struct SseState<F> {
    job: Job,
    fmt: F,
    meta: Meta,
    out: VecDeque<String>,
    ended: bool,
}

/// Server-sent events of `job`, ending with the usage chunk (when asked for)
/// and `data: [DONE]`. Dropping the stream (the client went away) drops the
/// job, which cancels its requests.
fn sse<F: StreamFormat>(job: Job, mut fmt: F, meta: Meta) -> Response {
    let out = fmt.start(&job).iter().map(Value::to_string).collect();
    let state = SseState { job, fmt, meta, out, ended: false };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(d) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(d)), st));
            }
            if st.ended {
                return None;
            }
            match st.job.next().await {
                Some(updates) => {
                    for u in &updates {
                        if let Update::Finish { error: Some(e), .. } = u {
                            st.out.push_back(ApiError::internal(e.clone()).body().to_string());
                        }
                        let chunks = st.fmt.update(&st.job, u);
                        st.out.extend(chunks.iter().map(Value::to_string));
                    }
                }
                None => {
                    if st.meta.include_usage {
                        st.out.push_back(st.meta.usage_chunk(&st.job).to_string());
                    }
                    st.out.push_back("[DONE]".into());
                    st.ended = true;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

// ---------------------------------------------------------------- completions

pub async fn completions(State(app): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    match completions_inner(app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn completions_inner(
    app: Arc<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let info = app.ready()?;
    let f = params::parse_body(&body_bytes(&app, body)?)?;
    let c: Common = params::common(&f, &app.cfg, info, 16, &["max_tokens"])?;
    let logprobs = params::completion_logprobs(&f)?;
    let echo = f.bool("echo")?.unwrap_or(false);
    f.unsupported("suffix", "no text insertion")?;
    let Some(pv) = f.get("prompt") else { return Err(ApiError::invalid("prompt", "`prompt` is required")) };
    // Tokenizing a long prompt is blocking work.
    let (a, pv) = (app.clone(), pv.clone());
    let prompts = blocking(move || parse_prompts(&a, a.ready()?, &pv)).await?;
    let params = RequestParams {
        max_tokens: c.max_tokens,
        sampling: c.sampling,
        stop_ids: c.stop_ids,
        stop: c.stop,
        logprobs,
        echo: echo && logprobs.is_some(),
        n: c.n,
    };
    let mut job = Job::submit(&app, prompts, params, true, info.tokenizer.clone()).await?;
    let meta = Meta::new(&app, "cmpl", "text_completion", c.include_usage);
    if c.stream {
        return Ok(sse(
            job,
            CompletionStream { meta_chunk: meta.clone(), echo, logprobs: logprobs.is_some() },
            meta,
        ));
    }
    run_to_end(&mut job).await?;
    let choices: Vec<Value> = job
        .choices
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let prompt = &job.prompts[i / job.n];
            let text = if echo { format!("{}{}", prompt.text, ch.text) } else { ch.text.clone() };
            json!({
                "index": i,
                "text": text,
                "logprobs": if logprobs.is_some() { legacy_logprobs(&ch.lps) } else { Value::Null },
                "finish_reason": reason_str(ch.finish),
                "token_ids": ch.ids,
            })
        })
        .collect();
    Ok(Json(json!({
        "id": meta.id, "object": meta.object, "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage(&job),
    }))
    .into_response())
}

struct CompletionStream {
    meta_chunk: Meta,
    echo: bool,
    logprobs: bool,
}

impl CompletionStream {
    fn choice(&self, index: usize, text: &str, logprobs: Value, finish: Option<FinishReason>) -> Value {
        self.meta_chunk.chunk(vec![json!({
            "index": index, "text": text, "logprobs": logprobs, "finish_reason": reason_str(finish),
        })])
    }
}

impl StreamFormat for CompletionStream {
    fn start(&mut self, job: &Job) -> Vec<Value> {
        if !self.echo || self.logprobs {
            return vec![];
        }
        (0..job.choices.len())
            .map(|i| self.choice(i, &job.prompts[i / job.n].text, Value::Null, None))
            .collect()
    }

    fn update(&mut self, job: &Job, u: &Update) -> Vec<Value> {
        match u {
            Update::Echo { choice, lps } => {
                let text = &job.prompts[choice / job.n].text;
                vec![self.choice(*choice, text, legacy_logprobs(lps), None)]
            }
            Update::Token { choice, text, lp } => {
                let lps = match lp {
                    Some(lp) if self.logprobs => legacy_logprobs(std::slice::from_ref(lp)),
                    _ => Value::Null,
                };
                vec![self.choice(*choice, text, lps, None)]
            }
            Update::Finish { choice, text, reason, .. } => {
                vec![self.choice(*choice, text, Value::Null, Some(*reason))]
            }
        }
    }
}

// ---------------------------------------------------------------- chat

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

fn parse_messages(f: &Fields) -> Result<Vec<Message>, ApiError> {
    let Some(v) = f.get("messages") else {
        return Err(ApiError::invalid("messages", "`messages` is required"));
    };
    let Value::Array(list) = v else {
        return Err(ApiError::invalid(
            "messages",
            format!("`messages` must be an array, not {}", type_name(v)),
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must hold at least one message"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |field: &str| format!("messages[{i}].{field}");
            let Value::Object(m) = m else {
                return Err(ApiError::invalid(
                    format!("messages[{i}]"),
                    format!("messages[{i}] must be an object"),
                ));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) if ROLES.contains(&r.as_str()) => r.clone(),
                Some(Value::String(r)) => {
                    return Err(ApiError::invalid(
                        at("role"),
                        format!("{}: unknown role `{r}` (one of {})", at("role"), ROLES.join(", ")),
                    ))
                }
                _ => return Err(ApiError::invalid(at("role"), format!("{} must be a string", at("role")))),
            };
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (k, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text += t,
                            _ => {
                                return Err(ApiError::invalid(
                                    at("content"),
                                    format!("{}[{k}]: only text parts are supported", at("content")),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(v) => {
                    return Err(ApiError::invalid(
                        at("content"),
                        format!(
                            "{} must be a string or an array of text parts, not {}",
                            at("content"),
                            type_name(v)
                        ),
                    ))
                }
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// Token lengths after message boundaries worth caching the state at: after
/// the first message (a shared system prompt), before the last one and
/// after all of them, where the rendering is a token prefix of the prompt.
fn boundaries(info: &ModelInfo, messages: &[Message], ids: &[u32]) -> Vec<usize> {
    let Some(tok) = &info.tokenizer else { return vec![] };
    let m = messages.len();
    let mut ks = vec![1, m.saturating_sub(1), m];
    ks.sort_unstable();
    ks.dedup();
    ks.into_iter()
        .filter(|&k| k >= 1)
        .filter_map(|k| {
            let text = info.chat.render(&messages[..k], false).ok()?;
            let pre = tok.encode(&text).ok()?;
            (!pre.is_empty() && pre.len() < ids.len() && ids.starts_with(&pre)).then_some(pre.len())
        })
        .collect()
}

pub async fn chat_completions(
    State(app): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat_inner(app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(app: Arc<Shared>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let info = app.ready()?;
    let f = params::parse_body(&body_bytes(&app, body)?)?;
    let c = params::common(
        &f,
        &app.cfg,
        info,
        app.cfg.chat_max_tokens,
        &["max_completion_tokens", "max_tokens"],
    )?;
    let messages = parse_messages(&f)?;
    let want_logprobs = f.bool("logprobs")?.unwrap_or(false);
    let top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS as i128)?;
    if top.is_some() && !want_logprobs {
        return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `logprobs` set to true"));
    }
    f.unsupported("tools", "no tool calls")?;
    f.unsupported("functions", "no function calls")?;
    if let Some(rf) = f.get("response_format") {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid("response_format", "only `{\"type\": \"text\"}` is supported"));
        }
    }
    if info.tokenizer.is_none() {
        return Err(ApiError::invalid(
            "messages",
            "this model has no tokenizer.json, so it cannot chat: use /v1/completions with token ids",
        ));
    }
    let a = app.clone();
    let (text, ids, capture) = blocking(move || {
        let info = a.ready()?;
        let text = info.chat.render(&messages, true).map_err(|e| ApiError::invalid("messages", e))?;
        let in_messages = |mut e: ApiError| {
            e.param = Some("messages".into());
            e
        };
        let ids = encode(info, &text).map_err(in_messages)?;
        check_len(&a, &ids, "the prompt rendered from `messages`").map_err(in_messages)?;
        let capture = if a.cfg.prefix_cache_bytes > 0 { boundaries(info, &messages, &ids) } else { vec![] };
        Ok((text, ids, capture))
    })
    .await?;
    let mut stop = c.stop;
    stop.extend(info.chat.stops());
    let logprobs = want_logprobs.then(|| top.unwrap_or(0) as usize);
    let params = RequestParams {
        max_tokens: c.max_tokens,
        sampling: c.sampling,
        stop_ids: c.stop_ids,
        stop,
        logprobs,
        echo: false,
        n: c.n,
    };
    let prompt = Prompt { ids, text, capture };
    let mut job = Job::submit(&app, vec![prompt], params, true, info.tokenizer.clone()).await?;
    let meta = Meta::new(&app, "chatcmpl", "chat.completion.chunk", c.include_usage);
    if c.stream {
        return Ok(sse(job, ChatStream { meta_chunk: meta.clone(), logprobs: want_logprobs }, meta));
    }
    run_to_end(&mut job).await?;
    let choices: Vec<Value> = job
        .choices
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let lps = if want_logprobs {
                json!({"content": ch.lps.iter().map(chat_logprob).collect::<Vec<_>>()})
            } else {
                Value::Null
            };
            json!({
                "index": i,
                "message": {"role": "assistant", "content": ch.text},
                "logprobs": lps,
                "finish_reason": reason_str(ch.finish),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage(&job),
    }))
    .into_response())
}

struct ChatStream {
    meta_chunk: Meta,
    logprobs: bool,
}

impl ChatStream {
    fn choice(&self, index: usize, delta: Value, logprobs: Value, finish: Option<FinishReason>) -> Value {
        self.meta_chunk.chunk(vec![json!({
            "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason_str(finish),
        })])
    }
}

impl StreamFormat for ChatStream {
    fn start(&mut self, job: &Job) -> Vec<Value> {
        (0..job.choices.len())
            .map(|i| self.choice(i, json!({"role": "assistant", "content": ""}), Value::Null, None))
            .collect()
    }

    fn update(&mut self, _job: &Job, u: &Update) -> Vec<Value> {
        match u {
            Update::Echo { .. } => vec![],
            Update::Token { choice, text, lp } => {
                let lps = match lp {
                    Some(lp) if self.logprobs => json!({"content": [chat_logprob(lp)]}),
                    _ => Value::Null,
                };
                if text.is_empty() && lps.is_null() {
                    return vec![];
                }
                vec![self.choice(*choice, json!({"content": text}), lps, None)]
            }
            Update::Finish { choice, text, reason, .. } => {
                let mut out = vec![];
                if !text.is_empty() {
                    out.push(self.choice(*choice, json!({"content": text}), Value::Null, None));
                }
                out.push(self.choice(*choice, json!({}), Value::Null, Some(*reason)));
                out
            }
        }
    }
}
