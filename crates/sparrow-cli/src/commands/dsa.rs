//! `sparrow dsa`: DeepSeek sparse attention on a pretrained dense model, the V3.2 way.
//! `attach` adds freshly initialised indexers to any model Sparrow loads and writes
//! them as an adapter (`model_dir::AdapterSpec`): the base stays as it is (a quantized
//! GGUF file stays quantized), the adapter holds the indexers only. `sparrow train
//! --init-from ADAPTER --trainable indexer` then trains them (dense warm-up, then
//! sparse), and every inference command takes the adapter as `--model`.

use crate::common::IndexDtype;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use sparrow::config::{AttentionKind, IndexerKind, IndexerTrainMode, ModelConfig};
use sparrow::model::params::ParamSet;
use sparrow::model_dir::{AdapterSpec, SaveOptions};
use sparrow::model_source::{self, ModelSource};
use std::path::PathBuf;

/// The indexer kinds on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum IndexerArg {
    /// DeepSeek-V3.2's lightning indexer (ReLU-weighted multi-head scores, trained by KL
    /// from the dense attention).
    Lightning,
    /// The two-layer gate MLP (trained through the straight-through gate).
    MlpGate,
}

#[derive(Subcommand)]
pub enum DsaCmd {
    /// Add freshly initialised indexers to a pretrained model's layers and write them as
    /// an adapter directory (the base's weights are not copied).
    Attach(AttachArgs),
}

#[derive(clap::Args)]
pub struct AttachArgs {
    /// The base: a model directory, a GGUF file or a known model's name.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "lightning")]
    pub indexer: IndexerArg,
    /// Index query heads (lightning).
    #[arg(long, default_value_t = 4)]
    pub index_heads: usize,
    /// Dimension of the index queries and keys.
    #[arg(long, default_value_t = 64)]
    pub index_head_dim: usize,
    /// Leading index dimensions that get RoPE (lightning; default half of
    /// --index-head-dim, as DeepSeek-V3.2's 64 of 128).
    #[arg(long)]
    pub index_rope_dim: Option<usize>,
    /// Hidden width of the gate MLP (mlp_gate).
    #[arg(long, default_value_t = 128)]
    pub gate_intermediate: usize,
    /// Cached positions each query attends to.
    #[arg(long)]
    pub topk: usize,
    /// Layers that become sparse, e.g. `2-29` or `0,5,7` (default: all).
    #[arg(long)]
    pub layers: Option<String>,
    /// Precision of the index key cache.
    #[arg(long, value_enum, default_value = "f32")]
    pub index_cache_dtype: IndexDtype,
    /// Seeds the indexers' initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The adapter directory to write (must not exist or be empty).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(cmd: DsaCmd, progress: bool) -> Result<()> {
    match cmd {
        DsaCmd::Attach(a) => attach(a, progress),
    }
}

/// `LIST` of layer numbers below `n`: comma-separated numbers and `a-b` ranges.
pub fn parse_layers(list: &str, n: usize) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse = |s: &str| -> Result<usize> {
            s.parse()
                .with_context(|| format!("--layers: `{part}` is not a layer number or a range a-b"))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        if a > b || b >= n {
            bail!(
                "--layers: `{part}` is not within the model's layers 0-{}",
                n - 1
            );
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    if out.is_empty() {
        bail!("--layers names no layer");
    }
    Ok(out)
}

/// The base's config with `a`'s indexers on the chosen layers.
fn sparse_config(base: &ModelConfig, a: &AttachArgs) -> Result<ModelConfig> {
    let n = base.num_hidden_layers;
    let layers = match &a.layers {
        Some(list) => parse_layers(list, n)?,
        None => (0..n).collect(),
    };
    if base.has_dsa() {
        bail!("the model already has `dsa` layers");
    }
    let mut c = base.clone();
    let mut types = vec![AttentionKind::Dense; n];
    for &l in &layers {
        types[l] = AttentionKind::Dsa;
    }
    c.layer_types = Some(types);
    c.index_topk = a.topk;
    c.index_head_dim = a.index_head_dim;
    c.index_cache_dtype = a.index_cache_dtype.into();
    match a.indexer {
        IndexerArg::Lightning => {
            c.indexer_kind = IndexerKind::Lightning;
            c.index_n_heads = a.index_heads;
            c.index_rope_head_dim = a.index_rope_dim.unwrap_or(a.index_head_dim / 2 / 2 * 2);
            c.indexer_train_mode = IndexerTrainMode::Sparse;
        }
        IndexerArg::MlpGate => {
            c.indexer_kind = IndexerKind::MlpGate;
            c.index_gate_intermediate_size = a.gate_intermediate;
            c.indexer_train_mode = IndexerTrainMode::Ste;
        }
    }
    c.validate()?;
    Ok(c)
}

fn attach(a: AttachArgs, progress: bool) -> Result<()> {
    if a.out.exists()
        && std::fs::read_dir(&a.out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("{} exists and is not empty", a.out.display());
    }
    let source = model_source::resolve(&a.model, progress)?;
    let base_cfg = model_source::read_config(&source)?;
    let cfg = sparse_config(&base_cfg, &a)?;
    let device = candle_core::Device::Cpu;
    let model = model_source::attach(&source, &cfg, ParamSet::Indexer, a.seed, &device)?;
    let tokenizer = model_source::load_tokenizer(&source)?;
    let (base, base_sha256) = match &source {
        ModelSource::Gguf(path) => {
            let known = sparrow::registry::find(&a.model.to_string_lossy());
            match known {
                Some(m) => (m.name.to_string(), Some(m.file_sha256.to_string())),
                None => (absolute(path)?, Some(sparrow::registry::sha256_file(path)?)),
            }
        }
        ModelSource::Dir(dir) => (absolute(dir)?, None),
        ModelSource::Adapter { .. } => bail!("{} is an adapter already", a.model.display()),
    };
    let spec = AdapterSpec {
        base,
        base_sha256,
        params: ParamSet::Indexer,
    };
    let opts = SaveOptions {
        tokenizer: Some(&tokenizer),
        step: Some(0),
        ..Default::default()
    };
    let written = sparrow::model_dir::save_adapter(&model, &a.out, &spec, &opts)?;
    let params: usize = model
        .store
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let sparse = cfg.layer_types.as_ref().map_or(0, |t| {
        t.iter().filter(|&&k| k == AttentionKind::Dsa).count()
    });
    println!(
        "attached {:?} indexers to {sparse} of {} layers of {} (top-{}; {} tensors, {params} parameters) -> {}",
        cfg.indexer_kind,
        cfg.num_hidden_layers,
        spec.base,
        cfg.index_topk,
        written,
        a.out.display()
    );
    Ok(())
}

fn absolute(p: &std::path::Path) -> Result<String> {
    Ok(std::fs::canonicalize(p)
        .with_context(|| format!("resolving {}", p.display()))?
        .to_string_lossy()
        .into_owned())
}
