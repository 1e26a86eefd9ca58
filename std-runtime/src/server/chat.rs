//! Chat prompts: the model's own chat template (`chat_template.jinja`, or
//! `chat_template` in `tokenizer_config.json`) rendered with `minijinja` the
//! way `transformers` renders it (trim_blocks, lstrip_blocks, loop controls,
//! `raise_exception`, Python string methods), or, for base models without
//! one, a plain default:
//!
//! ```text
//! system: You are terse.
//! user: Hello
//! assistant:
//! ```
//!
//! one `role: content` line per message, then `assistant:` to prompt the
//! reply. With the default template generation also stops at `"\nuser:"`
//! and `"\nsystem:"`, where a base model would start writing the next turn.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value;

/// The template used when the model has none.
pub const DEFAULT_TEMPLATE: &str = "{% for message in messages %}{{ message.role }}: {{ message.content }}\
{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// Stop strings added with the default template.
pub const DEFAULT_STOPS: &[&str] = &["\nuser:", "\nsystem:"];

/// One chat message with text content.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A compiled chat template with the special tokens it may use.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Whether this is [`DEFAULT_TEMPLATE`].
    pub builtin: bool,
    bos: String,
    eos: String,
    unk: String,
    pad: String,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn special(cfg: &Value, key: &str) -> String {
    match cfg.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// A template from its source.
    pub fn new(source: String, bos: String, eos: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        let builtin = source == DEFAULT_TEMPLATE;
        env.add_template_owned("chat", source)
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        Ok(ChatTemplate { env, builtin, bos, eos, unk: String::new(), pad: String::new() })
    }

    /// The default template.
    pub fn builtin() -> Self {
        match Self::new(DEFAULT_TEMPLATE.to_string(), String::new(), String::new()) {
            Ok(t) => t,
            Err(e) => unreachable!("the default chat template compiles: {e}"),
        }
    }

    /// The template of the model in `dir`, else the default; a warning says
    /// why a template that is there could not be used.
    pub fn load(dir: &Path) -> (Self, Option<String>) {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        let jinja = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        let from_cfg = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(n)).or(list.first())
                };
                named("default").and_then(|t| t.get("template")).and_then(Value::as_str).map(String::from)
            }
            _ => None,
        };
        let Some(source) = jinja.or(from_cfg) else { return (Self::builtin(), None) };
        match Self::new(source, special(&cfg, "bos_token"), special(&cfg, "eos_token")) {
            Ok(mut t) => {
                t.unk = special(&cfg, "unk_token");
                t.pad = special(&cfg, "pad_token");
                (t, None)
            }
            Err(e) => (Self::builtin(), Some(format!("{}: {e}; using the default template", dir.display()))),
        }
    }

    /// The prompt text of `messages`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let t = self.env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
            unk_token => self.unk,
            pad_token => self.pad,
        })
        .map_err(|e| {
            // The template's own message (raise_exception) without minijinja's decoration.
            match e.detail() {
                Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
                _ => e.to_string(),
            }
        })
    }

    /// Stop strings this template adds to every chat request.
    pub fn stops(&self) -> Vec<String> {
        if self.builtin {
            DEFAULT_STOPS.iter().map(|s| s.to_string()).collect()
        } else {
            vec![]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: &[(&str, &str)]) -> Vec<Message> {
        v.iter().map(|(r, c)| Message { role: r.to_string(), content: c.to_string() }).collect()
    }

    #[test]
    fn the_default_template_is_plain_lines() {
        let t = ChatTemplate::builtin();
        let m = msgs(&[("system", "Be brief."), ("user", "Hi")]);
        assert_eq!(t.render(&m, true).unwrap(), "system: Be brief.\nuser: Hi\nassistant:");
        assert_eq!(t.render(&m, false).unwrap(), "system: Be brief.\nuser: Hi\n");
        assert!(t.builtin);
    }

    #[test]
    fn a_chatml_template_renders_as_transformers_does() {
        let src = "{% for message in messages %}\n{% if message['role'] == 'system' and not loop.first %}\
{{ raise_exception('system first') }}\n{% endif %}\n{{ bos_token + '<|im_start|>' + message['role'] + '\\n' \
+ message['content'].strip() + '<|im_end|>' + '\\n' }}\n{% endfor %}\n{% if add_generation_prompt %}\
{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).unwrap();
        let out = t.render(&msgs(&[("user", "  Hi  ")]), true).unwrap();
        // What jinja2 3.1 renders with trim_blocks and lstrip_blocks (the newline
        // after an expression tag stays).
        assert_eq!(out, "<s><|im_start|>user\nHi<|im_end|>\n\n<|im_start|>assistant\n");
        let err = t.render(&msgs(&[("user", "a"), ("system", "b")]), true).unwrap_err();
        assert_eq!(err, "system first");
        assert!(ChatTemplate::new("{% for %}".into(), String::new(), String::new()).is_err());
    }
}
