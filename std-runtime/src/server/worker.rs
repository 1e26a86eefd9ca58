//! The engine thread: it loads the model, owns it and the [`Engine`] that
//! borrows it, takes commands from the handlers over a channel, steps while
//! there is work and blocks on the channel when idle. Events go back to each
//! request's own channel; a request whose receiver is gone is cancelled.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use super::cache::PrefixCache;
use super::chat::ChatTemplate;
use super::error::{ApiError, ServerError};
use super::{ModelInfo, Shared};
use crate::engine::{AddOptions, Engine, EngineConfig, Event, RequestParams};
use crate::model::LoadedModel;
use crate::parallel::CpuPool;
use crate::tokenizer::Tokenizer;

/// Loads the model on the engine thread.
pub type Loader = Box<dyn FnOnce() -> Result<LoadedModel, String> + Send>;

/// Queue a prompt.
pub struct AddCmd {
    pub prompt: Vec<u32>,
    pub params: RequestParams,
    /// Prompt lengths worth caching (message boundaries); the whole prompt is added.
    pub capture: Vec<usize>,
    /// Look the prompt up in the prefix cache.
    pub use_cache: bool,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
    pub reply: oneshot::Sender<Result<u64, ApiError>>,
}

pub enum Command {
    Add(Box<AddCmd>),
    Cancel(u64),
    /// Cancel everything running or waiting (the shutdown grace is over).
    CancelAll,
    /// Cancel everything, refuse new work, and end the thread once idle.
    Shutdown,
}

struct Route {
    tx: UnboundedSender<Event>,
    prompt: Vec<u32>,
    arrived: Instant,
    first_token: bool,
    last_token: Vec<Option<Instant>>,
    left: usize,
    dead: bool,
}

/// EOS ids from the configuration, else the tokenizer's end-of-text token.
pub fn eos_ids(model: &LoadedModel, tok: Option<&Tokenizer>) -> Vec<u32> {
    let from_config = &model.file_config.eos_token_ids;
    if !from_config.is_empty() {
        return from_config.clone();
    }
    let names = ["<|endoftext|>", "</s>", "<eos>"];
    tok.and_then(|t| names.iter().find_map(|n| t.token_id(n))).into_iter().collect()
}

/// The thread's body: load, then serve commands until shut down. A failure
/// (the model does not load, or the engine panics) stops the server with it.
pub fn run(shared: Arc<Shared>, loader: Loader, rx: Receiver<Command>) {
    let loaded = AtomicBool::new(false);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| load_and_serve(&shared, loader, &rx, &loaded)))
        .unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("the engine thread panicked: {why}"))
        });
    shared.metrics.loaded.store(false, Relaxed);
    // The error is what `Server::run` returns.
    let Err(e) = result else { return };
    let failure = if loaded.load(Relaxed) { ServerError::Engine(e) } else { ServerError::Load(e) };
    if let Ok(mut slot) = shared.failure.lock() {
        *slot = Some(failure);
    }
    shared.draining.store(true, Relaxed);
    shared.shutdown.send_replace(true);
    // Answer whoever is still sending until the server stops the thread.
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Add(add) => {
                let _ = add.reply.send(Err(ApiError::unavailable("the engine has stopped")));
            }
            Command::Shutdown => return,
            Command::Cancel(_) | Command::CancelAll => {}
        }
    }
}

fn load_and_serve(
    shared: &Arc<Shared>,
    loader: Loader,
    rx: &Receiver<Command>,
    loaded: &AtomicBool,
) -> Result<(), String> {
    let t0 = Instant::now();
    let model = loader()?;
    let par = CpuPool::new(shared.cfg.threads).map_err(|e| format!("starting the thread pool: {e}"))?;
    let tok = Tokenizer::from_dir(&model.dir).map_err(|e| e.to_string())?.map(Arc::new);
    let per = model.cfg.footprint().state_bytes_per_seq();
    let slots = shared.cfg.slots_for(per)?;
    let cfg = EngineConfig {
        slots,
        prefill_chunk: shared.cfg.prefill_chunk.max(1),
        max_prompt_tokens: shared.cfg.max_prompt_tokens,
        device: shared.cfg.device,
    };
    let engine = Engine::new(&model, &par, tok.as_deref(), cfg).map_err(|e| e.to_string())?;
    let (chat, warning) = ChatTemplate::load(&model.dir);
    if let (Some(w), true) = (&warning, shared.cfg.log) {
        eprintln!("mamba-rs serve: {w}");
    }
    let info = ModelInfo {
        eos: eos_ids(&model, tok.as_deref()),
        tokenizer: tok.clone(),
        vocab: model.cfg.vocab_size,
        slots,
        state_bytes: per,
        chat: Arc::new(chat),
    };
    if shared.cfg.log {
        eprintln!(
            "mamba-rs serve: model `{}` ready in {:.1}s: {} state slots of {:.2} MB, prefix cache {} bytes{}",
            shared.cfg.model_names.first().map_or("", String::as_str),
            t0.elapsed().as_secs_f64(),
            slots,
            per as f64 / 1e6,
            shared.cfg.prefix_cache_bytes,
            if info.tokenizer.is_none() { ", no tokenizer (token-id prompts only)" } else { "" },
        );
    }
    let _ = shared.info.set(info);
    loaded.store(true, Relaxed);
    let m = &shared.metrics;
    m.slots_free.store(slots as u64, Relaxed);
    m.loaded.store(true, Relaxed);
    let mut w = Worker {
        engine,
        routes: HashMap::new(),
        cache: PrefixCache::new(shared.cfg.prefix_cache_bytes),
        shared: shared.clone(),
        stopping: false,
    };
    w.serve(rx);
    m.loaded.store(false, Relaxed);
    Ok(())
}

struct Worker<'m> {
    engine: Engine<'m>,
    routes: HashMap<u64, Route>,
    cache: PrefixCache,
    shared: Arc<Shared>,
    stopping: bool,
}

impl Worker<'_> {
    fn serve(&mut self, rx: &Receiver<Command>) {
        loop {
            if !self.engine.has_work() {
                if self.stopping {
                    return;
                }
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.handle(Command::Shutdown);
                        break;
                    }
                }
            }
            if self.engine.has_work() {
                self.step();
            }
            self.gauges();
        }
    }

    fn gauges(&self) {
        let m = &self.shared.metrics;
        let (used, free) = self.engine.slot_usage();
        let (waiting, running) = self.engine.queue_lengths();
        m.slots_in_use.store(used as u64, Relaxed);
        m.slots_free.store(free as u64, Relaxed);
        m.waiting.store(waiting as u64, Relaxed);
        m.running.store(running as u64, Relaxed);
        let s = self.cache.stats();
        m.cache_entries.store(s.entries as u64, Relaxed);
        m.cache_bytes.store(s.bytes as u64, Relaxed);
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(add) => self.add(*add),
            Command::Cancel(id) => {
                self.engine.cancel(id);
            }
            Command::CancelAll => self.engine.cancel_all(),
            Command::Shutdown => {
                self.stopping = true;
                self.engine.cancel_all();
            }
        }
    }

    fn add(&mut self, add: AddCmd) {
        if self.stopping {
            let _ = add.reply.send(Err(ApiError::unavailable("the server is shutting down")));
            return;
        }
        let m = &self.shared.metrics;
        let caching = self.cache.enabled();
        let prefix = if caching && add.use_cache && !add.params.echo {
            let hit = self.cache.lookup(&add.prompt);
            match &hit {
                Some(p) => {
                    m.cache_hits.fetch_add(1, Relaxed);
                    m.cache_tokens_saved.fetch_add(p.tokens as u64, Relaxed);
                }
                None => {
                    m.cache_misses.fetch_add(1, Relaxed);
                }
            }
            hit
        } else {
            None
        };
        // The state before the last prompt token serves both a repeat of this
        // prompt and any longer prompt that starts with it.
        let mut capture = if caching { add.capture } else { vec![] };
        if caching && add.prompt.len() >= 2 {
            capture.push(add.prompt.len() - 1);
        }
        let n = add.params.n;
        let plen = add.prompt.len();
        match self.engine.add_with(add.prompt.clone(), add.params, AddOptions { prefix, capture }) {
            Ok(id) => {
                m.prompt_tokens.fetch_add(plen as u64, Relaxed);
                self.routes.insert(
                    id,
                    Route {
                        tx: add.events,
                        prompt: if caching { add.prompt } else { vec![] },
                        arrived: add.arrived,
                        first_token: false,
                        last_token: vec![None; n],
                        left: n,
                        dead: false,
                    },
                );
                if add.reply.send(Ok(id)).is_err() {
                    self.engine.cancel(id);
                }
            }
            Err(e) => {
                let _ = add.reply.send(Err(ApiError::invalid("prompt", e.to_string())));
            }
        }
    }

    fn step(&mut self) {
        let mut events = vec![];
        let res = self.engine.step(|ev| events.push(ev));
        let now = Instant::now();
        // Metrics before events: a client that has its answer sees it counted.
        self.gauges();
        let m = &self.shared.metrics;
        m.generated(events.iter().filter(|e| matches!(e, Event::Token { .. })).count() as u64, now);
        let (mut done, mut dead) = (vec![], vec![]);
        let routes = &mut self.routes;
        for ev in events {
            let id = match &ev {
                Event::PromptLogprobs { request, .. }
                | Event::Token { request, .. }
                | Event::Finished { request, .. } => *request,
            };
            let Some(r) = routes.get_mut(&id) else { continue };
            match &ev {
                Event::Token { index, .. } => {
                    if !r.first_token {
                        r.first_token = true;
                        m.time_to_first_token(now.duration_since(r.arrived).as_secs_f64());
                    }
                    if let Some(slot) = r.last_token.get_mut(*index as usize) {
                        if let Some(last) = slot.replace(now) {
                            m.inter_token_latency(now.duration_since(last).as_secs_f64());
                        }
                    }
                }
                Event::Finished { reason, .. } => {
                    m.finished(reason.as_str());
                    r.left = r.left.saturating_sub(1);
                    if r.left == 0 {
                        done.push(id);
                    }
                }
                Event::PromptLogprobs { .. } => {}
            }
            if r.tx.send(ev).is_err() && !r.dead {
                r.dead = true;
                dead.push(id);
            }
        }
        if let Err(e) = res {
            if self.shared.cfg.log {
                eprintln!("mamba-rs serve: engine step failed, cancelling every request: {e}");
            }
            self.engine.cancel_all();
        }
        for c in self.engine.take_captured() {
            if let Some(key) = self.routes.get(&c.request).and_then(|r| r.prompt.get(..c.tokens)) {
                self.cache.insert(key.to_vec(), c.state);
            }
        }
        for id in done {
            self.routes.remove(&id);
        }
        for id in dead {
            self.engine.cancel(id);
        }
    }
}
