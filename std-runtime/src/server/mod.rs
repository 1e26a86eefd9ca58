//! An OpenAI-compatible HTTP server over the continuous-batching [`Engine`](crate::engine::Engine).
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions` (streaming as
//!   server-sent events ending with `data: [DONE]`), `GET /v1/models`;
//! - `GET /health` (200 once the model is loaded, 503 before and while
//!   shutting down), `GET /metrics` (Prometheus text).
//!
//! The listener is bound first; the model loads on the engine thread
//! ([`worker`]), which owns it and the engine and talks to the handlers over
//! channels. A request whose client goes away (a dropped stream or response)
//! is cancelled and its state slots freed at the next engine step. With a
//! prefix cache ([`cache`]) the state after each prompt (and after chat
//! message boundaries) is kept, and a prompt that starts with a cached
//! prefix resumes from it instead of prefilling it again.
//!
//! Shutdown (see [`ShutdownHandle`], [`shutdown_signal`]): new requests get
//! 503, running ones may finish for `shutdown_grace`, then they are cancelled;
//! [`Server::run`] returns once every connection is closed.

mod api;
pub mod cache;
pub mod chat;
pub mod error;
mod job;
pub mod metrics;
pub mod params;
pub mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::watch;

pub use error::{ApiError, ServerError};
pub use worker::Loader;

use crate::tokenizer::Tokenizer;
use chat::ChatTemplate;
use metrics::Metrics;
use worker::Command;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    /// 0 picks a free port (see [`Server::local_addr`]).
    pub port: u16,
    /// Names the model answers to; the first is listed by `/v1/models`.
    pub model_names: Vec<String>,
    /// Most sequences running at once (state slots).
    pub max_batch: usize,
    /// State memory budget in bytes; the slots are the lesser of this and `max_batch`.
    pub state_memory: Option<usize>,
    /// Prompt tokens prefilled per engine step, all requests together.
    pub prefill_chunk: usize,
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Default `max_tokens` of chat requests.
    pub chat_max_tokens: usize,
    /// Require `Authorization: Bearer <key>` on `/v1/*`.
    pub api_key: Option<String>,
    /// Bytes of prompt states kept for reuse (0: no cache).
    pub prefix_cache_bytes: usize,
    /// Largest request body in bytes (larger: 413).
    pub body_limit: usize,
    /// How long running requests may go on after a shutdown starts.
    pub shutdown_grace: Duration,
    /// Engine worker threads (0: one per physical core).
    pub threads: usize,
    /// Print progress and errors to stderr.
    pub log: bool,
    /// Where the engine runs the model.
    pub device: crate::device::Device,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            model_names: vec!["mamba".into()],
            max_batch: 32,
            state_memory: None,
            prefill_chunk: 512,
            max_prompt_tokens: 32768,
            max_tokens_limit: 32768,
            chat_max_tokens: 512,
            api_key: None,
            prefix_cache_bytes: 0,
            body_limit: 4 << 20,
            shutdown_grace: Duration::from_secs(10),
            threads: 0,
            log: false,
            device: crate::device::Device::Cpu,
        }
    }
}

impl ServerConfig {
    /// State slots for a model whose sequences need `per_seq` bytes each.
    pub fn slots_for(&self, per_seq: usize) -> Result<usize, String> {
        if self.max_batch == 0 {
            return Err("--max-batch must be at least 1".into());
        }
        match self.state_memory {
            None => Ok(self.max_batch),
            Some(bytes) => {
                let n = bytes / per_seq.max(1);
                if n == 0 {
                    return Err(format!(
                        "--state-memory of {bytes} bytes holds no sequence: one needs {per_seq}"
                    ));
                }
                Ok(n.min(self.max_batch))
            }
        }
    }
}

/// What the handlers know of the loaded model.
pub struct ModelInfo {
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Token ids that end a sequence unless `ignore_eos`.
    pub eos: Vec<u32>,
    /// Rows of the embedding: prompt ids must be below.
    pub vocab: usize,
    pub slots: usize,
    pub state_bytes: usize,
    pub chat: Arc<ChatTemplate>,
}

/// State shared by the handlers and the engine thread.
pub struct Shared {
    pub cfg: ServerConfig,
    pub info: OnceLock<ModelInfo>,
    pub metrics: Metrics,
    draining: AtomicBool,
    failure: Mutex<Option<ServerError>>,
    cmd: Sender<Command>,
    shutdown: watch::Sender<bool>,
    ids: AtomicU64,
}

impl Shared {
    /// The model, or 503 while loading or shutting down.
    fn ready(&self) -> Result<&ModelInfo, ApiError> {
        if self.draining.load(Relaxed) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        self.info.get().ok_or_else(|| ApiError::unavailable("the model is still loading"))
    }

    fn next_id(&self) -> String {
        let n = self.ids.fetch_add(1, Relaxed);
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
        format!("{:x}{n:06x}", t as u64)
    }
}

/// Starts a graceful shutdown of a running [`Server`].
#[derive(Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// Resolves on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A bound server whose model is loading or loaded.
pub struct Server {
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    worker: std::thread::JoinHandle<()>,
}

impl Server {
    /// Bind the listener, then start loading the model on the engine thread
    /// (`/health` answers 503 until it is loaded).
    pub async fn bind(cfg: ServerConfig, loader: Loader) -> Result<Server, ServerError> {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|source| ServerError::Bind { addr: addr.clone(), source })?;
        let (cmd, rx) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            cfg,
            info: OnceLock::new(),
            metrics: Metrics::default(),
            draining: AtomicBool::new(false),
            failure: Mutex::new(None),
            cmd,
            shutdown: watch::Sender::new(false),
            ids: AtomicU64::new(0),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("mamba-engine".into())
            .spawn(move || worker::run(s, loader, rx))
            .map_err(ServerError::Io)?;
        Ok(Server { listener, shared, worker })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        Ok(self.listener.local_addr()?)
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.shutdown.clone())
    }

    /// Serve until a shutdown is asked for (or the model fails to load), then
    /// drain: refuse new requests, let running ones finish within the grace
    /// period, cancel the rest, close every connection and stop the engine.
    pub async fn run(self) -> Result<(), ServerError> {
        let Server { listener, shared, worker } = self;
        let app = router(shared.clone());
        let mut on_signal = shared.shutdown.subscribe();
        let s = shared.clone();
        let graceful = async move {
            let _ = on_signal.wait_for(|&v| v).await;
            s.draining.store(true, Relaxed);
        };
        let mut on_signal = shared.shutdown.subscribe();
        let s = shared.clone();
        let watchdog = async move {
            let _ = on_signal.wait_for(|&v| v).await;
            tokio::time::sleep(s.cfg.shutdown_grace).await;
            if s.cfg.log {
                eprintln!("mamba-rs serve: the shutdown grace is over: cancelling running requests");
            }
            let _ = s.cmd.send(Command::CancelAll);
            // Clients that do not read what is left are not waited for long.
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        let serve = axum::serve(listener, app).with_graceful_shutdown(graceful);
        let served = tokio::select! {
            r = std::future::IntoFuture::into_future(serve) => r,
            _ = watchdog => Ok(()),
        };
        let _ = shared.cmd.send(Command::Shutdown);
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        if let Some(e) = shared.failure.lock().ok().and_then(|mut e| e.take()) {
            return Err(e);
        }
        served.map_err(ServerError::Io)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(api::completions))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .merge(v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), count_requests))
        .layer(DefaultBodyLimit::max(shared.cfg.body_limit))
        .with_state(shared)
}

/// Compare without an early exit (no timing hint about the key).
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(app): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_key(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

async fn count_requests(State(app): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map_or("other", |p| p.as_str()).to_string();
    let res = next.run(req).await;
    app.metrics.request(&path, res.status().as_u16());
    res
}

async fn health(State(app): State<Arc<Shared>>) -> Response {
    if app.draining.load(Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "shutting down"}))).into_response();
    }
    match app.info.get() {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<Shared>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], app.metrics.render())
        .into_response()
}

fn model_card(name: &str) -> serde_json::Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "mamba-rs"})
}

async fn models(State(app): State<Arc<Shared>>) -> Response {
    let data: Vec<_> = app.cfg.model_names.first().map(|n| model_card(n)).into_iter().collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn model(
    State(app): State<Arc<Shared>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    if app.cfg.model_names.contains(&name) {
        Json(model_card(&name)).into_response()
    } else {
        ApiError::not_found(format!("the model `{name}` does not exist"))
            .with_code("model_not_found")
            .into_response()
    }
}

async fn not_found(req: Request) -> Response {
    ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path())).into_response()
}
