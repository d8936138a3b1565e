//! What several commands share: argument types, model loading, the corpus check,
//! Ctrl-C handling, the thread count.

use anyhow::{bail, Context, Result};
use sparrow::model::Model;
use sparrow::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How the linear layers' weights are held in memory (`--weights`).
#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum WeightsArg {
    /// f32.
    F32,
    /// IEEE half precision (widened to f32 in registers).
    F16,
    /// bfloat16 (widened to f32 in registers).
    Bf16,
    /// int8 in blocks of 32 with an f16 scale each (ggml's Q8_0), with int8 activations.
    Int8,
    /// As the file stores them: f16 / bf16 safetensors stay so; GGUF Q4_0 / Q4_1 / Q8_0
    /// stay in their blocks, other GGUF types become f16; f32 stays f32.
    #[default]
    Native,
}

impl From<WeightsArg> for sparrow::weights::WeightFormat {
    fn from(w: WeightsArg) -> Self {
        match w {
            WeightsArg::F32 => Self::F32,
            WeightsArg::F16 => Self::F16,
            WeightsArg::Bf16 => Self::Bf16,
            WeightsArg::Int8 => Self::Int8,
            WeightsArg::Native => Self::Native,
        }
    }
}

/// Key / value cache precision on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KvDtype {
    F32,
    /// IEEE half: half the cache memory and half the bytes each decode step reads
    F16,
}

impl From<KvDtype> for sparrow::config::KvCacheDtype {
    fn from(d: KvDtype) -> Self {
        match d {
            KvDtype::F32 => Self::Float32,
            KvDtype::F16 => Self::Float16,
        }
    }
}

/// How an inference command holds a model in memory: its weights and its key / value
/// cache.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct HoldArgs {
    /// How the linear layers' weights are held: f32, f16, bf16, int8 (Q8_0 blocks) or
    /// native (as the file stores them).
    #[arg(long, value_enum, default_value = "native")]
    pub weights: WeightsArg,
    /// Precision of the key / value cache (default: the model's `kv_cache_dtype`).
    #[arg(long, value_enum)]
    pub kv_dtype: Option<KvDtype>,
}

impl Default for HoldArgs {
    fn default() -> Self {
        Self {
            weights: WeightsArg::Native,
            kv_dtype: None,
        }
    }
}

impl HoldArgs {
    /// Apply the overrides to a model's config as it loads.
    pub fn edit(&self, c: &mut sparrow::config::ModelConfig) {
        if let Some(d) = self.kv_dtype {
            c.kv_cache_dtype = d.into();
        }
    }
}

/// Index key precision on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum IndexDtype {
    F32,
    Bf16,
    /// int8 with one absmax scale per token, queries rounded to int8 per head
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
pub const DEFAULT_MODEL: &str = "models/sparrow-small";

/// A flag the first Ctrl-C sets (printing `what`: the training loop checkpoints and
/// stops after its step); a second Ctrl-C exits at once.
pub fn stop_on_ctrl_c(what: &'static str) -> Result<Arc<AtomicBool>> {
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
pub fn require_corpus(corpus: &std::path::Path) -> Result<()> {
    if !corpus.is_dir() {
        bail!(
            "corpus {} does not exist: run `sparrow corpus fetch --out {}` or pass --corpus DIR",
            corpus.display(),
            corpus.display()
        );
    }
    Ok(())
}

/// The model `--model` names (a directory, a GGUF file or a known model's name,
/// fetched on first use) and its tokenizer, for inference.
pub fn load_model_and_tokenizer(spec: &Path) -> Result<(Model, Tokenizer)> {
    load_model_as(spec, HoldArgs::default())
}

/// [`load_model_and_tokenizer`] with the weights and the cache held as `hold` says.
pub fn load_model_as(spec: &Path, hold: HoldArgs) -> Result<(Model, Tokenizer)> {
    load_model_edited(spec, hold, |_| {})
}

/// [`load_model_as`] with the config adjusted by `edit` (after `hold`'s overrides)
/// before the layers are built.
pub fn load_model_edited(
    spec: &Path,
    hold: HoldArgs,
    edit: impl FnOnce(&mut sparrow::config::ModelConfig),
) -> Result<(Model, Tokenizer)> {
    if spec == Path::new(DEFAULT_MODEL) && !spec.is_dir() {
        bail!(
            "the default model {} is not here (run from the repository root, or pass --model DIR | FILE.gguf | NAME)",
            spec.display()
        );
    }
    let source = sparrow::model_source::resolve(spec, true)?;
    let loaded = sparrow::model_source::load_for_inference(
        &source,
        hold.weights.into(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        |c| {
            hold.edit(c);
            edit(c);
        },
    )?;
    crate::return_freed_memory();
    Ok(loaded)
}

/// The held-out tail (`val_fraction` of each document, in (0, 1]) of a corpus, tokenized.
pub fn held_out(
    corpus: &Path,
    tok: &Tokenizer,
    val_fraction: f64,
    progress: bool,
) -> Result<Vec<u32>> {
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

pub fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}
