//! `sparrow chat`: a multi-turn conversation in the terminal. Each turn renders the
//! whole conversation with the model's chat template and streams the reply, which
//! stops at the model's end-of-turn token. Line editing and history by `rustyline`
//! (history kept in $SPARROW_HOME/chat_history.txt); `/reset` starts over, `/exit` or
//! Ctrl-D leaves.

use anyhow::Result;
use sparrow::chat::{ChatTemplate, Message};
use sparrow::engine::generate::generate;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Model: a directory, a GGUF file, or a known model's name (fetched on first use).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: PathBuf,
    /// A system message (default: none, so the template's own default applies).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    hold: crate::common::HoldArgs,
}

pub fn run(a: ChatArgs, _progress: bool) -> Result<()> {
    let (model, tokenizer) = crate::common::load_model_as(&a.model, a.hold)?;
    let template = ChatTemplate::for_tokenizer(&tokenizer)?;
    let opts = crate::commands::generate::generate_options(
        a.max_tokens,
        a.temperature,
        a.top_p,
        a.top_k,
        a.seed,
    );
    let start: Vec<Message> = a
        .system
        .iter()
        .map(|s| Message::new("system", s.clone()))
        .collect();
    let mut messages = start.clone();
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = sparrow::registry::home()
        .ok()
        .map(|h| h.join("chat_history.txt"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    eprintln!(
        "chat with {} (/reset starts over, /exit or Ctrl-D leaves)",
        a.model.display()
    );
    loop {
        let line = match editor.readline("> ") {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Eof)
            | Err(rustyline::error::ReadlineError::Interrupted) => break,
            Err(e) => return Err(e.into()),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(text);
        match text {
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = start.clone();
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", text));
        let prompt = template.render(&messages, true)?;
        let mut reply = String::new();
        let mut stdout = std::io::stdout().lock();
        let (_, stats) = generate(&model, &tokenizer, &prompt, &opts, |piece| {
            reply.push_str(piece);
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        })?;
        writeln!(stdout)?;
        eprintln!("({})", crate::commands::generate::stats_line(&stats));
        messages.push(Message::new("assistant", reply));
    }
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = editor.save_history(h);
    }
    Ok(())
}
