//! Text in and out through the `tokenizers` crate, with a streaming decoder
//! that never splits a multi-byte character across printed pieces.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A `tokenizer.json` tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// The special tokens' strings by id (`<|endoftext|>`, ...).
    specials: HashMap<u32, String>,
}

impl Tokenizer {
    /// Load `dir/tokenizer.json` if the directory has one.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Ok(None);
        }
        Self::from_file(&path).map(Some)
    }

    /// Load a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer { path: path.to_path_buf(), msg: e.to_string() })?;
        let specials = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        Ok(Tokenizer { inner, path: path.to_path_buf(), specials })
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer { path: self.path.clone(), msg: e.to_string() })
    }

    /// The string of `id` when it is a special token, which [`Self::decode`]
    /// skips (log-probabilities name it, as OpenAI's API does).
    pub fn special(&self, id: u32) -> Option<&str> {
        self.specials.get(&id).map(String::as_str)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns a growing list of ids into text pieces as they become complete.
///
/// Decodes a short window ending at the newest token and emits only what
/// the window adds, holding back while it ends in an incomplete character
/// (U+FFFD), so byte-level tokens of one character print together.
pub struct StreamDecoder<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl<'t> StreamDecoder<'t> {
    /// Start after `context` (the prompt), so the first piece joins it naturally.
    pub fn new(tok: &'t Tokenizer, context: &[u32]) -> Self {
        let keep = context.len().saturating_sub(6);
        let ids = context[keep..].to_vec();
        let n = ids.len();
        StreamDecoder { tok, ids, prefix: 0, read: n }
    }

    /// Add one id; returns the newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tok.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.is_char_boundary(before.len())
        {
            let piece = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_level() -> Tokenizer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/byte_level_tokenizer.json");
        Tokenizer::from_file(&p).unwrap()
    }

    #[test]
    fn streaming_never_splits_a_multi_byte_character() {
        let tok = byte_level();
        let text = "héllo ☃ 日本語 and 🦀 crabs";
        let ids = tok.encode(text).unwrap();
        assert!(ids.len() > text.chars().count() / 2, "byte-level pieces: {ids:?}");
        let mut stream = StreamDecoder::new(&tok, &[]);
        let mut pieces = vec![];
        for &id in &ids {
            if let Some(p) = stream.push(id).unwrap() {
                assert!(!p.contains('\u{FFFD}'), "piece {p:?} holds a broken character");
                pieces.push(p);
            }
        }
        assert!(pieces.len() > 3);
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn streaming_after_a_prompt_adds_exactly_the_continuation() {
        let tok = byte_level();
        let (prompt, rest) = ("the quick ☃ brown", " fox 日本 jumps");
        let p_ids = tok.encode(prompt).unwrap();
        let g_ids = tok.encode(rest).unwrap();
        let mut stream = StreamDecoder::new(&tok, &p_ids);
        let out: String = g_ids.iter().filter_map(|&id| stream.push(id).unwrap()).collect();
        assert_eq!(out, rest);
    }

    #[test]
    fn special_tokens_are_named_and_others_are_not() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mamba-demo");
        let tok = Tokenizer::from_dir(&demo).unwrap().unwrap();
        assert_eq!(tok.special(0), Some("<|endoftext|>"));
        assert_eq!(tok.decode(&[0]).unwrap(), "");
        let a = tok.encode("a").unwrap()[0];
        assert_eq!(tok.special(a), None);
    }

    #[test]
    fn a_bad_tokenizer_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let e = Tokenizer::from_dir(dir.path()).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
