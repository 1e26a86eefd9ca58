//! The serving engine: per-request state slots, continuous batching of
//! prefill chunks with decode steps, sampling, log-probabilities and stops.
//!
//! Every [`Engine::step`] is one forward pass over a ragged batch: each
//! running sequence contributes its one pending token (a decode step is a
//! ragged sequence of length 1 continuing its slot), and waiting prompts
//! contribute prefill pieces up to `prefill_chunk` tokens in all, so a long
//! prompt never stalls the running streams. A request is admitted when it
//! can claim a state slot for each of its `n` samples; the samples share
//! one prefill and are forked (slot copied) when the prompt is done.
//!
//! Prompt states can be saved and resumed ([`Engine::add_with`]): a request
//! may start from a saved state that covers the first tokens of its prompt
//! ([`PrefixState`]) and prefill only the rest, and may ask for the state
//! after given prompt lengths ([`AddOptions::capture`], collected with
//! [`Engine::take_captured`]). Prefill pieces are cut at those lengths; a
//! piece continuing a saved state computes exactly what one long piece does.

pub mod logprobs;
pub mod slots;
pub mod stop;

use std::collections::VecDeque;
use std::sync::Arc;

use mamba_core::Parallel;

use crate::device::{AnySession, Device};
use crate::error::{Error, Result};
use crate::generate::FinishReason;
use crate::model::LoadedModel;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
pub use logprobs::{token_logprob, TokenLogprob, MAX_TOP_LOGPROBS};
pub use slots::{CacheFull, SeqKey, SlotTable};
pub use stop::StopText;

/// Engine limits.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// State slots (sequences that can run at once).
    pub slots: usize,
    /// Prompt tokens prefilled per step, all requests together.
    pub prefill_chunk: usize,
    /// Longest prompt accepted.
    pub max_prompt_tokens: usize,
    /// Where the model runs.
    pub device: Device,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { slots: 16, prefill_chunk: 512, max_prompt_tokens: 1 << 20, device: Device::Cpu }
    }
}

impl EngineConfig {
    /// Slots that fit a state memory budget of `bytes` for `model`.
    pub fn slots_for_budget(model: &LoadedModel, bytes: usize) -> usize {
        bytes / model.cfg.footprint().state_bytes_per_seq().max(1)
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end a sequence (EOS is added by the caller unless ignored).
    pub stop_ids: Vec<u32>,
    /// Strings that end a sequence; the text is cut right before them.
    pub stop: Vec<String>,
    /// Top-n alternatives to report with each generated token (`None`: no log-probs).
    pub logprobs: Option<usize>,
    /// Report the prompt tokens' log-probs too.
    pub echo: bool,
    /// Samples of this prompt (forked after one prefill).
    pub n: usize,
}

impl Default for RequestParams {
    fn default() -> Self {
        RequestParams {
            max_tokens: 16,
            sampling: SamplingParams::default(),
            stop_ids: vec![],
            stop: vec![],
            logprobs: None,
            echo: false,
            n: 1,
        }
    }
}

/// A saved state to resume a prompt from: the state after its first `tokens` tokens.
#[derive(Clone, Debug)]
pub struct PrefixState {
    pub state: Arc<[f32]>,
    pub tokens: usize,
}

/// Options of [`Engine::add_with`].
#[derive(Clone, Debug, Default)]
pub struct AddOptions {
    /// Resume from this state instead of prefilling its tokens (not with `echo`,
    /// which needs every prompt position's logits). It must cover fewer tokens
    /// than the prompt has: the last prompt token's logits pick the first token.
    pub prefix: Option<PrefixState>,
    /// Prompt lengths after which to save the state (lengths the prefix already
    /// covers, zero and lengths past the prompt are ignored).
    pub capture: Vec<usize>,
}

/// A state saved during a prompt's prefill: after its first `tokens` tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Captured {
    pub request: u64,
    pub tokens: usize,
    pub state: Vec<f32>,
}

/// Token counts of a finished sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the engine reports, in order, as it runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt's log-probs (with `echo`); the first token has none.
    PromptLogprobs { request: u64, logprobs: Vec<Option<TokenLogprob>> },
    /// A generated token of sample `index`, with the text it completes (may be empty).
    Token { request: u64, index: u32, token: u32, text: String, logprob: Option<TokenLogprob> },
    /// Sample `index` is done; `text` is any held-back text released at the end.
    Finished {
        request: u64,
        index: u32,
        reason: FinishReason,
        text: String,
        usage: Usage,
        error: Option<String>,
    },
}

struct Seq<'m> {
    index: u32,
    slot: usize,
    sampler: Sampler,
    generated: Vec<u32>,
    pending: Option<u32>,
    decoder: Option<StreamDecoder<'m>>,
    stop_text: StopText,
    done: bool,
}

struct Group<'m> {
    id: u64,
    prompt: Vec<u32>,
    params: RequestParams,
    prefilled: usize,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    seqs: Vec<Seq<'m>>,
    cancelled: bool,
    /// Applied when the request is admitted.
    prefix: Option<PrefixState>,
    /// Prompt lengths still to capture, ascending.
    capture: Vec<usize>,
}

/// What one row range of a step's batch is for.
enum Piece {
    Decode {
        group: usize,
        seq: usize,
        row: usize,
    },
    /// Prompt tokens `start..start+len`; with echo, logits rows from `echo_rows`
    /// (one per token); `last_row` once the prompt is complete.
    Prefill {
        group: usize,
        start: usize,
        len: usize,
        echo_rows: Option<usize>,
        last_row: Option<usize>,
    },
}

/// The continuous-batching engine over one model.
pub struct Engine<'m> {
    session: AnySession<'m>,
    table: SlotTable,
    tok: Option<&'m Tokenizer>,
    cfg: EngineConfig,
    waiting: VecDeque<Group<'m>>,
    running: Vec<Group<'m>>,
    next_id: u64,
    vocab: usize,
    captured: Vec<Captured>,
}

impl<'m> Engine<'m> {
    pub fn new(
        model: &'m LoadedModel,
        par: &'m dyn Parallel,
        tok: Option<&'m Tokenizer>,
        cfg: EngineConfig,
    ) -> Result<Self> {
        if cfg.slots == 0 {
            return Err(Error::Input("the engine needs at least one state slot".into()));
        }
        Ok(Engine {
            session: AnySession::new(model, par, cfg.slots, cfg.device)?,
            table: SlotTable::new(cfg.slots),
            tok,
            vocab: model.sample_vocab(),
            cfg,
            waiting: VecDeque::new(),
            running: vec![],
            next_id: 0,
            captured: vec![],
        })
    }

    /// Bytes of state per sequence and slots in use / free.
    pub fn slot_usage(&self) -> (usize, usize) {
        (self.table.in_use(), self.table.free())
    }

    /// Requests waiting for slots and running.
    pub fn queue_lengths(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }

    /// Whether anything is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// The engine's limits.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Values (f32) in one sequence's state: the length of a [`PrefixState`].
    pub fn state_len(&self) -> usize {
        self.session.cfg().state_layout().slot_len()
    }

    /// Queue a request; returns its id. Bad input is an error here, never later.
    pub fn add(&mut self, prompt: Vec<u32>, params: RequestParams) -> Result<u64> {
        self.add_with(prompt, params, AddOptions::default())
    }

    /// [`add`](Self::add), resuming from a saved prefix state and/or saving states.
    pub fn add_with(&mut self, prompt: Vec<u32>, params: RequestParams, opts: AddOptions) -> Result<u64> {
        if prompt.is_empty() {
            return Err(Error::Input("the prompt is empty: give at least one token".into()));
        }
        if prompt.len() > self.cfg.max_prompt_tokens {
            return Err(Error::Input(format!(
                "the prompt has {} tokens, more than the limit of {}",
                prompt.len(),
                self.cfg.max_prompt_tokens
            )));
        }
        let vocab = self.session.cfg().vocab_size;
        if let Some((i, t)) = prompt.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "prompt token {i}: id {t} is out of range: the vocabulary has {vocab} entries"
            )));
        }
        params.sampling.validate().map_err(Error::Input)?;
        if params.n == 0 || params.n > self.cfg.slots {
            return Err(Error::Input(format!(
                "n must be in 1..={} (the state slots), got {}",
                self.cfg.slots, params.n
            )));
        }
        if params.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(Error::Input(format!("logprobs must be at most {MAX_TOP_LOGPROBS}")));
        }
        let covered = match &opts.prefix {
            None => 0,
            Some(p) => {
                if params.echo {
                    return Err(Error::Input(
                        "a saved prefix state cannot be used with echo: echo needs every prompt \
                         position's logits"
                            .into(),
                    ));
                }
                if p.tokens == 0 || p.tokens >= prompt.len() {
                    return Err(Error::Input(format!(
                        "a saved prefix state must cover 1..{} tokens of a {}-token prompt, not {}",
                        prompt.len(),
                        prompt.len(),
                        p.tokens
                    )));
                }
                if p.state.len() != self.state_len() {
                    return Err(Error::Input(format!(
                        "a saved prefix state has {} values, a state of this model has {}",
                        p.state.len(),
                        self.state_len()
                    )));
                }
                p.tokens
            }
        };
        let mut capture: Vec<usize> =
            opts.capture.into_iter().filter(|&c| c > covered && c <= prompt.len()).collect();
        capture.sort_unstable();
        capture.dedup();
        let id = self.next_id;
        self.next_id += 1;
        let plen = prompt.len();
        self.waiting.push_back(Group {
            id,
            prompt,
            params,
            prefilled: 0,
            prompt_logprobs: Vec::with_capacity(plen),
            seqs: vec![],
            cancelled: false,
            prefix: opts.prefix,
            capture,
        });
        Ok(id)
    }

    /// States saved since the last call (see [`AddOptions::capture`]).
    pub fn take_captured(&mut self) -> Vec<Captured> {
        std::mem::take(&mut self.captured)
    }

    /// Cancel every request (waiting or running); they finish at the next step.
    pub fn cancel_all(&mut self) {
        for g in self.waiting.iter_mut().chain(self.running.iter_mut()) {
            g.cancelled = true;
        }
    }

    /// Fork sample `index` of running request `id` into a new request that
    /// continues from the same point: the state slot is copied, nothing is
    /// recomputed. The child's prompt is the parent's context so far (prompt
    /// and generated tokens); `params` (with `n` = 1) gives its sampling and
    /// limits, counted from the fork. Needs a free slot now: when none is,
    /// the error says so and nothing changes.
    pub fn fork(&mut self, id: u64, index: u32, params: RequestParams) -> Result<u64> {
        params.sampling.validate().map_err(Error::Input)?;
        if params.n != 1 {
            return Err(Error::Input("a fork is one sequence: n must be 1".into()));
        }
        let g = self
            .running
            .iter()
            .find(|g| g.id == id && !g.cancelled)
            .ok_or_else(|| Error::Input(format!("request {id} is not running")))?;
        let s = g
            .seqs
            .get(index as usize)
            .filter(|s| !s.done)
            .ok_or_else(|| Error::Input(format!("request {id} has no running sample {index}")))?;
        let Some(pending) = s.pending else {
            return Err(Error::Input(format!(
                "request {id} has produced no token yet: fork after its first"
            )));
        };
        let mut context = g.prompt.clone();
        context.extend_from_slice(&s.generated);
        let parent_slot = s.slot;
        let child = self.next_id;
        let slot = self.table.claim((child, 0)).map_err(|e| Error::Input(e.to_string()))?;
        self.next_id += 1;
        self.session.copy_slot(parent_slot, slot)?;
        let seq = Seq {
            index: 0,
            slot,
            sampler: Sampler::new(params.sampling.clone()),
            generated: vec![],
            // The parent's last token is not in the state yet: both feed it next.
            pending: Some(pending),
            decoder: self.tok.map(|t| StreamDecoder::new(t, &context)),
            stop_text: StopText::new(params.stop.clone()),
            done: false,
        };
        self.running.push(Group {
            id: child,
            prefilled: context.len(),
            prompt: context,
            params,
            prompt_logprobs: vec![],
            seqs: vec![seq],
            cancelled: false,
            prefix: None,
            capture: vec![],
        });
        Ok(child)
    }

    /// Cancel a request; its slots are freed at the next step. False if unknown or done.
    pub fn cancel(&mut self, id: u64) -> bool {
        let g = self.waiting.iter_mut().chain(self.running.iter_mut()).find(|g| g.id == id);
        g.map(|g| g.cancelled = true).is_some()
    }

    /// One iteration: cancellations, admissions, one forward pass, sampling.
    pub fn step(&mut self, mut emit: impl FnMut(Event)) -> Result<()> {
        self.reap_cancelled(&mut emit);
        self.admit()?;
        let (tokens, offsets, slots, rows, pieces) = self.plan();
        if tokens.is_empty() {
            return Ok(());
        }
        let v = self.session.cfg().vocab_size;
        // The logits stay in the session's scratch (no copy): the loop below
        // only reads them, and the state work it implies (captures, forks)
        // is done after it.
        let Engine { session, table, running, captured, vocab, .. } = self;
        let vocab = *vocab;
        let (mut captures, mut forks) = (vec![], vec![]);
        let logits = match session.forward(&tokens, &offsets, &slots, &rows) {
            Ok(l) => l,
            Err(e) => {
                // Fail the requests of this batch, keep the engine going.
                let msg = e.to_string();
                for g in running.iter_mut() {
                    for s in g.seqs.iter_mut().filter(|s| !s.done) {
                        s.done = true;
                        table.release((g.id, s.index));
                        emit(Event::Finished {
                            request: g.id,
                            index: s.index,
                            reason: FinishReason::Error,
                            text: String::new(),
                            usage: Usage {
                                prompt_tokens: g.prompt.len(),
                                completion_tokens: s.generated.len(),
                            },
                            error: Some(msg.clone()),
                        });
                    }
                }
                running.clear();
                return Ok(());
            }
        };
        let row = |r: usize| &logits[r * v..(r + 1) * v];
        for p in pieces {
            match p {
                Piece::Decode { group, seq, row: r } => {
                    let g = &mut running[group];
                    let s = &mut g.seqs[seq];
                    accept(table, g.id, &g.prompt, &g.params, s, row(r), vocab, &mut emit);
                }
                Piece::Prefill { group, start, len, echo_rows, last_row } => {
                    let g = &mut running[group];
                    g.prefilled += len;
                    while let Some(&c) = g.capture.first() {
                        if c > g.prefilled {
                            break;
                        }
                        g.capture.remove(0);
                        if c == g.prefilled {
                            captures.push((g.id, c, g.seqs[0].slot));
                        }
                    }
                    if let Some(first) = echo_rows {
                        if start == 0 {
                            g.prompt_logprobs.push(None);
                        }
                        let top = g.params.logprobs.unwrap_or(0);
                        for k in 0..len {
                            let next = start + k + 1;
                            if next < g.prompt.len() {
                                let lp = token_logprob(row(first + k), vocab, g.prompt[next], top);
                                g.prompt_logprobs.push(Some(lp));
                            }
                        }
                    }
                    let Some(last_row) = last_row else { continue };
                    if g.params.echo {
                        emit(Event::PromptLogprobs {
                            request: g.id,
                            logprobs: std::mem::take(&mut g.prompt_logprobs),
                        });
                    }
                    // Fork: every other sample starts from the prompt's state.
                    let parent = g.seqs[0].slot;
                    forks.extend(g.seqs[1..].iter().map(|s| (parent, s.slot)));
                    let last = row(last_row);
                    for s in &mut g.seqs {
                        if g.params.max_tokens == 0 {
                            finish(table, g.id, g.prompt.len(), s, FinishReason::Length, &mut emit);
                            continue;
                        }
                        accept(table, g.id, &g.prompt, &g.params, s, last, vocab, &mut emit);
                    }
                }
            }
        }
        // Nothing above changed a state: these see the states this forward left.
        for (request, tokens, slot) in captures {
            let state = session.slot_state(slot)?;
            captured.push(Captured { request, tokens, state });
        }
        for (parent, child) in forks {
            session.copy_slot(parent, child)?;
        }
        self.running.retain(|g| g.seqs.iter().any(|s| !s.done));
        Ok(())
    }

    /// Run until every queued request is done.
    pub fn run_to_completion(&mut self, mut emit: impl FnMut(Event)) -> Result<()> {
        while self.has_work() {
            self.step(&mut emit)?;
        }
        Ok(())
    }

    fn reap_cancelled(&mut self, emit: &mut impl FnMut(Event)) {
        let table = &mut self.table;
        let mut reap = |g: &mut Group<'m>| {
            for i in 0..g.params.n as u32 {
                let generated = g.seqs.get(i as usize).map_or(0, |s| s.generated.len());
                if g.seqs.get(i as usize).is_some_and(|s| s.done) {
                    continue;
                }
                table.release((g.id, i));
                emit(Event::Finished {
                    request: g.id,
                    index: i,
                    reason: FinishReason::Cancelled,
                    text: String::new(),
                    usage: Usage { prompt_tokens: g.prompt.len(), completion_tokens: generated },
                    error: None,
                });
            }
        };
        for g in self.waiting.iter_mut().chain(self.running.iter_mut()).filter(|g| g.cancelled) {
            reap(g);
        }
        self.waiting.retain(|g| !g.cancelled);
        self.running.retain(|g| !g.cancelled);
    }

    /// Admit waiting requests, in order, while their samples all get slots.
    fn admit(&mut self) -> Result<()> {
        while let Some(g) = self.waiting.front() {
            if self.table.free() < g.params.n {
                break; // waits: claiming past capacity is not a failure
            }
            let Some(mut g) = self.waiting.pop_front() else { break };
            for i in 0..g.params.n as u32 {
                let slot = self.table.claim((g.id, i)).map_err(|e| Error::Input(e.to_string()))?;
                self.session.reset(slot)?;
                let seed = g.params.sampling.seed.wrapping_add(i as u64);
                g.seqs.push(Seq {
                    index: i,
                    slot,
                    sampler: Sampler::new(SamplingParams { seed, ..g.params.sampling.clone() }),
                    generated: vec![],
                    pending: None,
                    decoder: self.tok.map(|t| StreamDecoder::new(t, &g.prompt)),
                    stop_text: StopText::new(g.params.stop.clone()),
                    done: false,
                });
            }
            if let Some(p) = g.prefix.take() {
                self.session.set_slot_state(g.seqs[0].slot, &p.state)?;
                g.prefilled = p.tokens;
            }
            self.running.push(g);
        }
        Ok(())
    }

    /// The batch of one step: decode tokens first, then prefill pieces within the budget.
    #[allow(clippy::type_complexity)]
    fn plan(&mut self) -> (Vec<u32>, Vec<usize>, Vec<usize>, Vec<usize>, Vec<Piece>) {
        let (mut tokens, mut offsets, mut slots, mut rows, mut pieces) =
            (vec![], vec![0], vec![], vec![], vec![]);
        for (gi, g) in self.running.iter().enumerate() {
            for (si, s) in g.seqs.iter().enumerate() {
                if let (false, Some(t)) = (s.done, s.pending) {
                    pieces.push(Piece::Decode { group: gi, seq: si, row: rows.len() });
                    rows.push(tokens.len());
                    tokens.push(t);
                    offsets.push(tokens.len());
                    slots.push(s.slot);
                }
            }
        }
        let mut budget = self.cfg.prefill_chunk.max(1);
        for (gi, g) in self.running.iter().enumerate() {
            let left = g.prompt.len() - g.prefilled;
            if left == 0 || budget == 0 {
                continue;
            }
            // A piece ends at the next capture point, so its state can be saved.
            let to_capture = g.capture.iter().find(|&&c| c > g.prefilled).map_or(left, |c| c - g.prefilled);
            let len = left.min(budget).min(to_capture);
            budget -= len;
            let row0 = tokens.len();
            tokens.extend_from_slice(&g.prompt[g.prefilled..g.prefilled + len]);
            offsets.push(tokens.len());
            slots.push(g.seqs[0].slot);
            let done = g.prefilled + len == g.prompt.len();
            let echo_rows = g.params.echo.then(|| {
                let first = rows.len();
                rows.extend(row0..row0 + len);
                first
            });
            // Without echo only the prompt's last row is needed, once it is reached.
            let last_row = match (done, echo_rows) {
                (false, _) => None,
                (true, Some(first)) => Some(first + len - 1),
                (true, None) => {
                    rows.push(row0 + len - 1);
                    Some(rows.len() - 1)
                }
            };
            pieces.push(Piece::Prefill { group: gi, start: g.prefilled, len, echo_rows, last_row });
        }
        for s in self.running.iter_mut().flat_map(|g| g.seqs.iter_mut()) {
            s.pending = None;
        }
        (tokens, offsets, slots, rows, pieces)
    }
}

/// Sample the next token of `s` from its logits `row`, then its log-prob,
/// text, stop checks and events.
#[allow(clippy::too_many_arguments)]
fn accept(
    table: &mut SlotTable,
    id: u64,
    prompt: &[u32],
    params: &RequestParams,
    s: &mut Seq<'_>,
    row: &[f32],
    vocab: usize,
    emit: &mut impl FnMut(Event),
) {
    let tok = s.sampler.sample_with_history(row, vocab, prompt, &s.generated);
    s.generated.push(tok);
    let logprob = params.logprobs.map(|n| token_logprob(row, vocab, tok, n));
    let piece = match s.decoder.as_mut().map(|d| d.push(tok)) {
        Some(Ok(Some(p))) => p,
        _ => String::new(),
    };
    let (text, hit_stop_string) = s.stop_text.push(&piece);
    emit(Event::Token { request: id, index: s.index, token: tok, text, logprob });
    let reason = if hit_stop_string || params.stop_ids.contains(&tok) {
        Some(FinishReason::Stop)
    } else if s.generated.len() >= params.max_tokens {
        Some(FinishReason::Length)
    } else {
        None
    };
    match reason {
        Some(r) => finish(table, id, prompt.len(), s, r, emit),
        None => s.pending = Some(tok),
    }
}

fn finish(
    table: &mut SlotTable,
    id: u64,
    prompt_tokens: usize,
    s: &mut Seq<'_>,
    r: FinishReason,
    emit: &mut impl FnMut(Event),
) {
    s.done = true;
    table.release((id, s.index));
    let text = s.stop_text.flush();
    emit(Event::Finished {
        request: id,
        index: s.index,
        reason: r,
        text,
        usage: Usage { prompt_tokens, completion_tokens: s.generated.len() },
        error: None,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;
    use mamba_core::Sequential;

    fn fixture() -> LoadedModel {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/hf_f32_tied");
        LoadedModel::load(dir).unwrap()
    }

    type Out = (Vec<u32>, Vec<TokenLogprob>);

    fn run(e: &mut Engine<'_>, id: u64) -> Out {
        let mut out: Out = (vec![], vec![]);
        e.run_to_completion(|ev| {
            if let Event::Token { request, token, logprob, .. } = ev {
                assert_eq!(request, id);
                out.0.push(token);
                out.1.extend(logprob);
            }
        })
        .unwrap();
        out
    }

    #[test]
    fn resuming_from_a_captured_prefix_equals_the_cold_run() {
        let m = fixture();
        let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 49 + 1).collect();
        let params = RequestParams { max_tokens: 8, logprobs: Some(5), ..Default::default() };
        let cfg = EngineConfig { slots: 3, prefill_chunk: 16, ..Default::default() };
        let mut e = Engine::new(&m, &Sequential, None, cfg).unwrap();
        // Cold, no capture.
        let id = e.add(prompt.clone(), params.clone()).unwrap();
        let cold = run(&mut e, id);
        assert!(e.take_captured().is_empty());
        // Cold with captures: the same result, and the states at the points asked for.
        let opts = AddOptions { capture: vec![39, 5, 0, 41, 5], ..Default::default() };
        let id = e.add_with(prompt.clone(), params.clone(), opts).unwrap();
        assert_eq!(run(&mut e, id), cold, "cutting the prefill at capture points changes nothing");
        let caps = e.take_captured();
        assert_eq!(caps.iter().map(|c| c.tokens).collect::<Vec<_>>(), vec![5, 39]);
        // Each captured state is the state after a plain prefill of that many tokens.
        let mut s = Session::new(&m, &Sequential, 1).unwrap();
        for c in &caps {
            s.reset(0).unwrap();
            s.prefill(&[&prompt[..c.tokens]], &[0], crate::session::LogitsMode::Last).unwrap();
            assert_eq!(s.slot_state(0).unwrap(), &c.state[..], "state after {} tokens", c.tokens);
            assert_eq!(c.request, id);
        }
        // Resumed: identical tokens and log-probs, with n > 1 forking from the resumed state.
        for c in &caps {
            let prefix = PrefixState { state: c.state.clone().into(), tokens: c.tokens };
            let opts = AddOptions { prefix: Some(prefix), capture: vec![3, 39] };
            let id = e.add_with(prompt.clone(), RequestParams { n: 2, ..params.clone() }, opts).unwrap();
            let mut per: [Out; 2] = Default::default();
            e.run_to_completion(|ev| {
                if let Event::Token { request, index, token, logprob, .. } = ev {
                    assert_eq!(request, id);
                    per[index as usize].0.push(token);
                    per[index as usize].1.extend(logprob);
                }
            })
            .unwrap();
            assert_eq!(per[0], cold, "resumed after {} tokens", c.tokens);
            assert_eq!(per[1], cold, "forked sample resumed after {} tokens", c.tokens);
            let again = e.take_captured();
            let want: Vec<usize> = [39].into_iter().filter(|&k| k > c.tokens).collect();
            assert_eq!(
                again.iter().map(|c| c.tokens).collect::<Vec<_>>(),
                want,
                "points past the prefix only"
            );
        }
        assert_eq!(e.slot_usage(), (0, 3));
    }

    #[test]
    fn bad_prefixes_are_refused_up_front() {
        let m = fixture();
        let mut e = Engine::new(&m, &Sequential, None, EngineConfig::default()).unwrap();
        let good: Arc<[f32]> = vec![0.0; e.state_len()].into();
        let with = |state: Arc<[f32]>, tokens| AddOptions {
            prefix: Some(PrefixState { state, tokens }),
            ..Default::default()
        };
        let p = vec![3u32, 4, 5];
        let cases = [
            (with(good.clone(), 3), RequestParams::default(), "must cover 1..3"),
            (with(good.clone(), 0), RequestParams::default(), "must cover"),
            (with(vec![0.0; 3].into(), 1), RequestParams::default(), "values"),
            (
                with(good.clone(), 1),
                RequestParams { logprobs: Some(1), echo: true, ..Default::default() },
                "echo",
            ),
        ];
        for (opts, params, want) in cases {
            let err = e.add_with(p.clone(), params, opts).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        assert!(!e.has_work());
        e.add_with(p, RequestParams::default(), with(good, 2)).unwrap();
        e.cancel_all();
        e.run_to_completion(|_| {}).unwrap();
        assert_eq!(e.slot_usage().0, 0);
    }
}
