//! Chat prompts: OpenAI-style messages rendered with the model's own Jinja chat template
//! (`tokenizer.chat_template` in a GGUF file), as transformers' `apply_chat_template`
//! renders it: `trim_blocks` and `lstrip_blocks` on, `raise_exception`, Python string
//! methods (`minijinja-contrib`'s pycompat), the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! Templates come from files other people make, so rendering is bounded: a fuel limit
//! stops runaway loops and the output is capped in size; a template error is a
//! `Error::Template` naming the cause, never a hang.
//!
//! A model without a template gets [`PLAIN_TEMPLATE`]: each message as `role: content`
//! on its own line, then `assistant:` for the reply.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The template of models that have none: one `role: content` line per message, then
/// `assistant:` when a reply is wanted.
pub const PLAIN_TEMPLATE: &str = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}";

/// Instructions a template may execute (minijinja fuel) before rendering is stopped.
pub const MAX_TEMPLATE_FUEL: u64 = 2_000_000;
/// Longest rendered prompt accepted, in bytes.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others, e.g. `tool`).
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn template_error(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::Template(msg)
}

impl ChatTemplate {
    /// Compile `source`; `bos_token` and `eos_token` are the texts the template sees.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(MAX_TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("the template raised: {msg}"),
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(template_error)?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(template_error)?;
        let out = tmpl
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(template_error)?;
        if out.len() > MAX_RENDERED_BYTES {
            return Err(Error::Template(format!(
                "the rendered prompt is {} bytes (limit {MAX_RENDERED_BYTES})",
                out.len()
            )));
        }
        Ok(out)
    }

    /// The template of a tokenizer (its own, or [`PLAIN_TEMPLATE`]).
    pub fn for_tokenizer(tok: &crate::tokenizer::Tokenizer) -> Result<Self> {
        let bos = tok.id_to_token(tok.bos_id).unwrap_or_default();
        let eos = tok.id_to_token(tok.eos_id).unwrap_or_default();
        Self::new(
            tok.chat_template.as_deref().unwrap_or(PLAIN_TEMPLATE),
            &bos,
            &eos,
        )
    }
}
