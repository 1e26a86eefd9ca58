//! One HTTP request's work in the engine: its prompts are submitted as engine
//! requests (`n` samples each), their events are gathered into choices, and
//! every prompt is cancelled if the request goes away before it is done.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio::sync::oneshot;

use super::error::ApiError;
use super::worker::{AddCmd, Command};
use super::Shared;
use crate::engine::{Event, RequestParams, TokenLogprob};
use crate::generate::FinishReason;
use crate::tokenizer::Tokenizer;

/// A prompt of a request: its ids and its text (as given, or decoded).
#[derive(Clone, Debug)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub text: String,
    /// Prompt lengths worth caching the state at (besides the whole prompt).
    pub capture: Vec<usize>,
}

/// One token with its log-prob and alternatives, as text.
#[derive(Clone, Debug)]
pub struct Lp {
    pub token: String,
    /// `None` for the first prompt token.
    pub logprob: Option<f32>,
    pub top: Option<Vec<(String, f32)>>,
    /// Characters before this token in the choice's text.
    pub offset: usize,
}

/// A choice (one sample of one prompt) as it grows.
#[derive(Clone, Debug, Default)]
pub struct Choice {
    pub text: String,
    pub ids: Vec<u32>,
    pub finish: Option<FinishReason>,
    pub error: Option<String>,
    /// Echoed prompt tokens (with `echo` and log-probs), then generated ones.
    pub lps: Vec<Lp>,
    offset: usize,
    ctx: Vec<u32>,
}

/// What an engine event changed, for streaming.
#[derive(Clone, Debug)]
pub enum Update {
    /// The prompt's tokens with log-probs (`echo` with log-probs).
    Echo {
        choice: usize,
        lps: Vec<Lp>,
    },
    Token {
        choice: usize,
        text: String,
        lp: Option<Lp>,
    },
    Finish {
        choice: usize,
        text: String,
        reason: FinishReason,
        error: Option<String>,
    },
}

/// Cancels the engine requests it holds when dropped before disarmed.
struct CancelGuard {
    ids: Vec<u64>,
    cmd: Sender<Command>,
    armed: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if self.armed {
            for &id in &self.ids {
                let _ = self.cmd.send(Command::Cancel(id));
            }
        }
    }
}

/// The running work of one HTTP request.
pub struct Job {
    rx: UnboundedReceiver<Event>,
    guard: CancelGuard,
    prompt_of: HashMap<u64, usize>,
    pub prompts: Vec<Prompt>,
    pub n: usize,
    pub choices: Vec<Choice>,
    tok: Option<Arc<Tokenizer>>,
    left: usize,
}

/// Text of each token of `ts` after the tokens `ctx`: what it adds to
/// their decoded text, or a special token's own string (decoding skips it).
fn piece(tok: Option<&Tokenizer>, ctx: &[u32], ts: &[u32]) -> Vec<String> {
    let Some(tok) = tok else { return ts.iter().map(|t| format!("token_id:{t}")).collect() };
    let window = &ctx[ctx.len().saturating_sub(4)..];
    let before = tok.decode(window).unwrap_or_default();
    let mut ids = window.to_vec();
    ts.iter()
        .map(|&t| {
            if let Some(s) = tok.special(t) {
                return s.to_string();
            }
            ids.truncate(window.len());
            ids.push(t);
            let after = tok.decode(&ids).unwrap_or_default();
            match after.strip_prefix(before.as_str()) {
                Some(p) => p.to_string(),
                None => tok.decode(&[t]).unwrap_or_default(),
            }
        })
        .collect()
}

impl Job {
    /// Submit every prompt; an engine refusal cancels those already queued.
    pub async fn submit(
        shared: &Arc<Shared>,
        prompts: Vec<Prompt>,
        params: RequestParams,
        use_cache: bool,
        tok: Option<Arc<Tokenizer>>,
    ) -> Result<Job, ApiError> {
        let arrived = Instant::now();
        let (tx, rx) = unbounded_channel();
        let mut guard = CancelGuard { ids: vec![], cmd: shared.cmd.clone(), armed: true };
        let mut prompt_of = HashMap::new();
        // Queue every prompt before waiting for any answer: the engine answers
        // between steps, and all of them then join the same step.
        let mut answers = Vec::with_capacity(prompts.len());
        for p in &prompts {
            let (reply, answer) = oneshot::channel();
            let add = AddCmd {
                prompt: p.ids.clone(),
                params: params.clone(),
                capture: p.capture.clone(),
                use_cache,
                arrived,
                events: tx.clone(),
                reply,
            };
            shared
                .cmd
                .send(Command::Add(Box::new(add)))
                .map_err(|_| ApiError::unavailable("the engine has stopped"))?;
            answers.push(answer);
        }
        let mut refused = None;
        for (i, answer) in answers.into_iter().enumerate() {
            match answer.await {
                Ok(Ok(id)) => {
                    guard.ids.push(id);
                    prompt_of.insert(id, i);
                }
                Ok(Err(mut e)) => {
                    if prompts.len() > 1 {
                        e.message = format!("prompt {i}: {}", e.message);
                    }
                    refused.get_or_insert(e);
                }
                Err(_) => {
                    refused.get_or_insert(ApiError::unavailable("the engine has stopped"));
                }
            }
        }
        if let Some(e) = refused {
            return Err(e); // the guard cancels those queued
        }
        let n = params.n;
        let choices: Vec<Choice> = prompts
            .iter()
            .flat_map(|p| {
                let offset = if params.echo { 0 } else { p.text.chars().count() };
                (0..n).map(move |_| Choice { offset, ctx: p.ids.clone(), ..Default::default() })
            })
            .collect();
        let left = choices.len();
        Ok(Job { rx, guard, prompt_of, prompts, n, choices, tok, left })
    }

    /// Whether every choice is finished.
    pub fn done(&self) -> bool {
        self.left == 0
    }

    /// Prompt and generated token counts of the whole request.
    pub fn usage(&self) -> (usize, usize) {
        let prompt = self.prompts.iter().map(|p| p.ids.len()).sum();
        let completion = self.choices.iter().map(|c| c.ids.len()).sum();
        (prompt, completion)
    }

    fn lp(&self, ctx: &[u32], lp: &TokenLogprob, offset: usize) -> Lp {
        let tok = self.tok.as_deref();
        let mut ids = vec![lp.token];
        ids.extend(lp.top.iter().map(|t| t.0));
        let mut texts = piece(tok, ctx, &ids).into_iter();
        let token = texts.next().unwrap_or_default();
        let top = lp.top.iter().zip(texts).map(|(&(_, l), s)| (s, l)).collect();
        Lp { token, logprob: Some(lp.logprob), top: Some(top), offset }
    }

    /// The next updates; `None` once every choice is finished.
    pub async fn next(&mut self) -> Option<Vec<Update>> {
        if self.done() {
            return None;
        }
        let Some(ev) = self.rx.recv().await else {
            // The engine dropped the request without finishing it.
            let mut out = vec![];
            for (i, c) in self.choices.iter_mut().enumerate().filter(|(_, c)| c.finish.is_none()) {
                let error = Some("the engine stopped before the request finished".to_string());
                c.finish = Some(FinishReason::Error);
                c.error.clone_from(&error);
                out.push(Update::Finish {
                    choice: i,
                    text: String::new(),
                    reason: FinishReason::Error,
                    error,
                });
            }
            self.left = 0;
            self.guard.armed = false;
            return Some(out);
        };
        let mut out = vec![];
        match ev {
            Event::PromptLogprobs { request, logprobs } => {
                let Some(&p) = self.prompt_of.get(&request) else { return Some(out) };
                let ids = &self.prompts[p].ids;
                let mut lps = Vec::with_capacity(ids.len());
                let mut offset = 0;
                for (i, lp) in logprobs.iter().enumerate() {
                    let e = match lp {
                        Some(lp) => self.lp(&ids[..i], lp, offset),
                        None => {
                            let token =
                                piece(self.tok.as_deref(), &ids[..i], &ids[i..=i]).pop().unwrap_or_default();
                            Lp { token, logprob: None, top: None, offset }
                        }
                    };
                    offset += e.token.chars().count();
                    lps.push(e);
                }
                for s in 0..self.n {
                    let ci = p * self.n + s;
                    let c = &mut self.choices[ci];
                    c.lps.extend(lps.iter().cloned());
                    c.offset = offset;
                    out.push(Update::Echo { choice: ci, lps: lps.clone() });
                }
            }
            Event::Token { request, index, token, text, logprob } => {
                let Some(&p) = self.prompt_of.get(&request) else { return Some(out) };
                let ci = p * self.n + index as usize;
                let lp = logprob.map(|lp| {
                    let c = &self.choices[ci];
                    self.lp(&c.ctx, &lp, c.offset)
                });
                let c = &mut self.choices[ci];
                if let Some(lp) = &lp {
                    c.offset += lp.token.chars().count();
                    c.lps.push(lp.clone());
                }
                c.ctx.push(token);
                let keep = c.ctx.len().saturating_sub(8);
                if keep > 64 {
                    c.ctx.drain(..keep);
                }
                c.ids.push(token);
                c.text += &text;
                out.push(Update::Token { choice: ci, text, lp });
            }
            Event::Finished { request, index, reason, text, error, .. } => {
                let Some(&p) = self.prompt_of.get(&request) else { return Some(out) };
                let ci = p * self.n + index as usize;
                let c = &mut self.choices[ci];
                if c.finish.is_none() {
                    c.finish = Some(reason);
                    c.error.clone_from(&error);
                    c.text += &text;
                    self.left -= 1;
                    out.push(Update::Finish { choice: ci, text, reason, error });
                }
            }
        }
        if self.done() {
            self.guard.armed = false;
        }
        Some(out)
    }

    /// Run to the end (non-streaming).
    pub async fn finish(&mut self) {
        while self.next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_name_special_tokens_and_carry_spaces_from_context() {
        let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mamba-demo");
        let tok = Tokenizer::from_dir(&demo).unwrap().unwrap();
        let ctx = tok.encode("And God said").unwrap();
        let next = tok.encode(" unto").unwrap();
        assert_eq!(next.len(), 1, "{next:?}");
        let got = piece(Some(&tok), &ctx, &[next[0], 0]);
        assert_eq!(got, vec![" unto".to_string(), "<|endoftext|>".to_string()]);
        assert_eq!(piece(None, &ctx, &[7]), vec!["token_id:7".to_string()]);
    }
}
