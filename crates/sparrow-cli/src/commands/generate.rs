//! `sparrow generate`: text from a model, streamed to stdout.

use crate::common::{load_model_as, HoldArgs, DEFAULT_MODEL};
use anyhow::{bail, Result};
use sparrow::engine::generate::{generate, GenerateOptions};
use sparrow::engine::sampler::SamplerConfig;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Model: a directory (config.json, model.safetensors, tokenizer.json), a GGUF
    /// file, or a known model's name (`sparrow model list`; fetched on first use).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// The prompt (also accepted positionally).
    #[arg(long)]
    pub prompt: Option<String>,
    #[arg(value_name = "PROMPT")]
    pub prompt_pos: Option<String>,
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Treat the prompt as one user turn of a chat: render it with the model's chat
    /// template and stop at its end-of-turn token.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message (default: none, so the template's own default
    /// applies, if it has one).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[command(flatten)]
    pub hold: HoldArgs,
}

pub fn run(a: GenerateArgs, _progress: bool) -> Result<()> {
    let prompt = match (a.prompt, a.prompt_pos) {
        (Some(_), Some(_)) => {
            bail!("give the prompt either positionally or with --prompt, not both")
        }
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => String::new(),
    };
    let (model, tokenizer) = load_model_as(&a.model, a.hold)?;
    let (prompt, echo) = if a.chat {
        let template = sparrow::chat::ChatTemplate::for_tokenizer(&tokenizer)?;
        let mut messages = Vec::new();
        if let Some(sys) = a.system {
            messages.push(sparrow::chat::Message::new("system", sys));
        }
        messages.push(sparrow::chat::Message::new("user", prompt));
        (template.render(&messages, true)?, false)
    } else {
        (prompt, true)
    };
    let opts = generate_options(a.max_tokens, a.temperature, a.top_p, a.top_k, a.seed);
    let mut stdout = std::io::stdout().lock();
    if echo {
        write!(stdout, "{prompt}")?;
    }
    let (_, stats) = generate(&model, &tokenizer, &prompt, &opts, |piece| {
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    writeln!(stdout)?;
    eprintln!("{}", stats_line(&stats));
    Ok(())
}

/// Generation options from the sampling flags (stopping at the tokenizer's stop ids).
pub(crate) fn generate_options(
    max_tokens: usize,
    temperature: f64,
    top_p: f64,
    top_k: usize,
    seed: u64,
) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig {
            temperature,
            top_p,
            top_k,
        },
        seed,
        stop_at_eos: true,
    }
}

/// One line of prompt and generation speed, for stderr.
pub(crate) fn stats_line(stats: &sparrow::engine::generate::GenerateStats) -> String {
    format!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s",
        stats.prompt_tokens,
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.generation_tokens_per_s()
    )
}
