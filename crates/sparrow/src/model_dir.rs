//! A model directory (DESIGN.md §5), the one place that reads and writes one:
//! `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json` when reading), `generation_config.json`, and the
//! tokenizer (`tokenizer.json`, plus `tokenizer_config.json` for tokenizers that are
//! not Sparrow's own). Read in Sparrow's layout or a Hugging Face family's
//! (`formats::hf`: llama, mixtral, deepseek_v3, deepseek_v32); written in either.
//! Training checkpoints, `convert` and exports all write through [`save`]; every file
//! is written atomically (temp file, fsync, rename).
//!
//! An *adapter* directory holds what a model adds to a base model and nothing of the
//! base: the whole model's `config.json`, `adapter.json` ([`AdapterSpec`]: which base,
//! which parameters), `adapter.safetensors` (those parameters) and the tokenizer files.
//! [`save_adapter`] writes one; `crate::model_source` resolves the base and loads the
//! two together (a DSA indexer attached to a pretrained dense model, `sparrow dsa`).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::formats::hf::{self, Family};
use crate::model::params::{ParamSet, VarStore};
use crate::model::{Model, STEP_KEY};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightFormat;
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The file naming an adapter's base ([`AdapterSpec`]).
pub const ADAPTER_JSON: &str = "adapter.json";
/// An adapter's own tensors.
pub const ADAPTER_WEIGHTS: &str = "adapter.safetensors";

/// `adapter.json`: what an adapter directory adds to which base model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// The base model: a known model's name (`crate::registry`), or the path of a GGUF
    /// file or model directory (relative paths are relative to the adapter directory).
    pub base: String,
    /// SHA-256 of the base's file when it is a GGUF file, checked when the adapter is
    /// loaded (a different file under the same name is an error, not a silently wrong
    /// model).
    #[serde(default)]
    pub base_sha256: Option<String>,
    /// The parameters the adapter holds; every other parameter is the base's.
    pub params: ParamSet,
}

impl AdapterSpec {
    /// The spec of the adapter directory `dir`, if it is one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(ADAPTER_JSON);
        if !path.is_file() {
            return Ok(None);
        }
        let spec: Self = crate::fsio::read_json(&path)?;
        if spec.base.trim().is_empty() {
            return Err(Error::checkpoint(&path, "`base` is empty"));
        }
        Ok(Some(spec))
    }

    /// The base as a path when it names one (relative to `dir`), else None (a known
    /// model's name).
    pub fn base_path(&self, dir: &Path) -> Option<PathBuf> {
        let p = Path::new(&self.base);
        let is_path = p.is_absolute()
            || self.base.contains('/')
            || self.base.contains(std::path::MAIN_SEPARATOR)
            || self.base.ends_with(".gguf");
        is_path.then(|| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        })
    }

    /// This spec for an adapter written into another directory than `from`: a base
    /// path becomes absolute, so it names the same base from anywhere.
    pub fn relocated(&self, from: &Path) -> Self {
        let mut spec = self.clone();
        if let Some(p) = self.base_path(from) {
            let p = std::fs::canonicalize(&p).unwrap_or(p);
            spec.base = p.to_string_lossy().into_owned();
        }
        spec
    }
}

/// Which names and config fields a directory is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Sparrow's own `config.json` (every field; HF tensor names).
    Sparrow,
    /// The Hugging Face layout of the model's family (`formats::hf::export_family`),
    /// as `transformers` loads it.
    Hf,
}

/// How [`save`] writes.
#[derive(Debug, Clone, Copy)]
pub struct SaveOptions<'a> {
    pub layout: Layout,
    /// Storage dtype of the parameters (f32, f16 or bf16; buffers stay f32).
    pub dtype: DType,
    /// The training step, recorded in the weights' metadata (`sparrow_step`).
    pub step: Option<u64>,
    /// Written with the weights when given.
    pub tokenizer: Option<&'a Tokenizer>,
}

impl Default for SaveOptions<'_> {
    fn default() -> Self {
        Self {
            layout: Layout::Sparrow,
            dtype: DType::F32,
            step: None,
            tokenizer: None,
        }
    }
}

/// Load `dir` for training (trainable parameters; every forward records an autograd
/// graph). Returns the model and the step its weights record, if any.
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(Model, Option<u64>)> {
    load_for_training(dir, dtype, device, |_| {}, ParamSet::All)
}

/// Load `dir` for inference (generation, evaluation, export): detached parameters
/// (`VarStore::frozen`), so a forward keeps no autograd graph and a long prompt needs
/// memory for its live activations only; `edit` adjusts the config first. Linear
/// layers' weights are held as `weights` says (f32 to convert or export).
pub fn load_for_inference(
    dir: &Path,
    weights: WeightFormat,
    dtype: DType,
    device: &Device,
    edit: impl FnOnce(&mut ModelConfig),
) -> Result<(Model, Option<u64>)> {
    load_store(dir, dtype, device, edit, |s| {
        s.frozen().with_weight_format(weights)
    })
}

/// Load `dir` (Sparrow's layout or an HF family's) for training with only the
/// parameters in `trainable` receiving gradients (the others detached); `edit` adjusts
/// the config before the layers are built (validated again). Returns the model and
/// the step its weights record, if any.
pub fn load_for_training(
    dir: &Path,
    dtype: DType,
    device: &Device,
    edit: impl FnOnce(&mut ModelConfig),
    trainable: ParamSet,
) -> Result<(Model, Option<u64>)> {
    load_store(dir, dtype, device, edit, |s| s.with_trainable(trainable))
}

/// The step a weights file's metadata records (`sparrow_step`), if any.
pub fn step_of(meta: &HashMap<String, String>, path: &Path) -> Result<Option<u64>> {
    match meta.get(STEP_KEY) {
        Some(s) => Ok(Some(s.parse::<u64>().map_err(|_| {
            Error::checkpoint(
                path,
                format!("metadata {STEP_KEY} = {s:?} is not an integer"),
            )
        })?)),
        None => Ok(None),
    }
}

/// Read `dir`, let `store` set up the parameter store, build the model.
fn load_store(
    dir: &Path,
    dtype: DType,
    device: &Device,
    edit: impl FnOnce(&mut ModelConfig),
    store: impl FnOnce(VarStore) -> VarStore,
) -> Result<(Model, Option<u64>)> {
    if !dir.is_dir() {
        return Err(Error::checkpoint(dir, "model directory does not exist"));
    }
    if dir.join(ADAPTER_JSON).exists() {
        return Err(Error::checkpoint(
            dir,
            "is an adapter (adapter.json): load it through `model_source`, which brings its base",
        ));
    }
    let (mut cfg, family) = hf::read_config(&dir.join("config.json"))?;
    edit(&mut cfg);
    cfg.validate()?;
    let hf::Weights {
        tensors,
        metadata: meta,
        source: path,
    } = hf::read_weights(dir, family, device)?;
    let step = step_of(&meta, &path)?;
    let store = store(VarStore::loaded(tensors, path.clone(), dtype, device));
    Ok((Model::from_store(&cfg, store)?, step))
}

/// Write `model`'s config, weights (f32) and generation config into `dir` in Sparrow's
/// layout, recording `step`.
pub fn save_at(model: &Model, dir: &Path, step: Option<u64>) -> Result<()> {
    let opts = SaveOptions {
        step,
        ..Default::default()
    };
    save(model, dir, &opts).map(|_| ())
}

/// Write `model` into `dir` (created if needed) as `opts` says. Returns the HF family
/// written (Hf layout) or None (Sparrow's).
pub fn save(model: &Model, dir: &Path, opts: &SaveOptions) -> Result<Option<Family>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (config, family) = match opts.layout {
        Layout::Sparrow => (model.cfg.to_json(), None),
        Layout::Hf => {
            let family = hf::export_family(&model.cfg)?;
            let json = serde_json::to_string_pretty(&hf::hf_config(&model.cfg, family)?)
                .map_err(|e| Error::Invalid(format!("config.json: {e}")))?;
            (json, Some(family))
        }
    };
    crate::fsio::write_atomic(&dir.join("config.json"), config.as_bytes())?;
    write_generation_config(model, dir)?;
    let meta = weights_metadata(opts.step);
    let tensors: Vec<_> = model
        .storage_tensors(opts.dtype)?
        .into_iter()
        .map(|(n, t)| match family {
            Some(f) => Ok((hf::hf_name(f, &n), hf::export_tensor(f, &n, t)?)),
            None => Ok((n, t)),
        })
        .collect::<Result<_>>()?;
    crate::weights::save(&dir.join("model.safetensors"), &tensors, meta)?;
    if let Some(tok) = opts.tokenizer {
        tok.save_dir(dir)?;
    }
    Ok(family)
}

fn write_generation_config(model: &Model, dir: &Path) -> Result<()> {
    let generation = serde_json::json!({
        "bos_token_id": model.cfg.bos_token_id,
        "eos_token_id": model.cfg.eos_token_id,
        "do_sample": true,
        "temperature": 0.8,
        "top_p": 0.95,
    });
    crate::fsio::write_json_atomic(&dir.join("generation_config.json"), &generation)
}

fn weights_metadata(step: Option<u64>) -> HashMap<String, String> {
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    if let Some(s) = step {
        meta.insert(STEP_KEY.to_string(), s.to_string());
    }
    meta
}

/// Write `model` into `dir` (created if needed) as an adapter of `spec.base`: the
/// whole config (Sparrow's layout), `adapter.json`, and only the parameters in
/// `spec.params` (in `opts.dtype`) in `adapter.safetensors`; `opts.layout` must be
/// Sparrow's. Returns the number of tensors written.
pub fn save_adapter(
    model: &Model,
    dir: &Path,
    spec: &AdapterSpec,
    opts: &SaveOptions,
) -> Result<usize> {
    if opts.layout != Layout::Sparrow {
        return Err(Error::Invalid(
            "an adapter is written in Sparrow's layout (convert the whole model to export it)"
                .into(),
        ));
    }
    if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Invalid(format!(
            "adapter weights are stored as f32, f16 or bf16, not {:?}",
            opts.dtype
        )));
    }
    let tensors = model
        .store
        .all_tensors()
        .into_iter()
        .filter(|(n, _)| spec.params.contains(n))
        .map(|(n, t)| Ok((n, t.to_dtype(opts.dtype)?)))
        .collect::<Result<Vec<_>>>()?;
    if tensors.is_empty() {
        return Err(Error::Invalid(format!(
            "the model has no {:?} parameters to write as an adapter",
            spec.params
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::fsio::write_atomic(&dir.join("config.json"), model.cfg.to_json().as_bytes())?;
    write_generation_config(model, dir)?;
    crate::fsio::write_json_atomic(&dir.join(ADAPTER_JSON), spec)?;
    crate::weights::save(
        &dir.join(ADAPTER_WEIGHTS),
        &tensors,
        weights_metadata(opts.step),
    )?;
    if let Some(tok) = opts.tokenizer {
        tok.save_dir(dir)?;
    }
    Ok(tensors.len())
}
