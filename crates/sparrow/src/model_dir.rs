//! A model directory (DESIGN.md §5), the one place that reads and writes one:
//! `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json` when reading), `generation_config.json`, and the
//! tokenizer (`tokenizer.json`, plus `tokenizer_config.json` for tokenizers that are
//! not Sparrow's own). Read in Sparrow's layout or a Hugging Face family's
//! (`formats::hf`: llama, mixtral, deepseek_v3, deepseek_v32); written in either.
//! Training checkpoints, `convert` and exports all write through [`save`]; every file
//! is written atomically (temp file, fsync, rename).

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::formats::hf::{self, Family};
use crate::model::params::VarStore;
use crate::model::{Model, STEP_KEY};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightFormat;
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::Path;

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
    load_with(dir, dtype, device, |_| {}, false)
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

/// Load `dir` (Sparrow's layout or an HF family's) with the config adjusted by `edit`
/// before the layers are built (validated again); `frozen` hands out detached
/// parameters. Returns the model and the step its weights record, if any.
pub fn load_with(
    dir: &Path,
    dtype: DType,
    device: &Device,
    edit: impl FnOnce(&mut ModelConfig),
    frozen: bool,
) -> Result<(Model, Option<u64>)> {
    load_store(dir, dtype, device, edit, |s| {
        if frozen {
            s.frozen()
        } else {
            s
        }
    })
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
    let (mut cfg, family) = hf::read_config(&dir.join("config.json"))?;
    edit(&mut cfg);
    cfg.validate()?;
    let hf::Weights {
        tensors,
        metadata: meta,
        source: path,
    } = hf::read_weights(dir, family, device)?;
    let step = match meta.get(STEP_KEY) {
        Some(s) => Some(s.parse::<u64>().map_err(|_| {
            Error::checkpoint(
                &path,
                format!("metadata {STEP_KEY} = {s:?} is not an integer"),
            )
        })?),
        None => None,
    };
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
    let generation = serde_json::json!({
        "bos_token_id": model.cfg.bos_token_id,
        "eos_token_id": model.cfg.eos_token_id,
        "do_sample": true,
        "temperature": 0.8,
        "top_p": 0.95,
    });
    crate::fsio::write_json_atomic(&dir.join("generation_config.json"), &generation)?;
    let mut meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    if let Some(s) = opts.step {
        meta.insert(STEP_KEY.to_string(), s.to_string());
    }
    let tensors: Vec<_> = model
        .storage_tensors(opts.dtype)?
        .into_iter()
        .map(|(n, t)| match family {
            Some(f) => (hf::hf_name(f, &n), t),
            None => (n, t),
        })
        .collect();
    crate::weights::save(&dir.join("model.safetensors"), &tensors, meta)?;
    if let Some(tok) = opts.tokenizer {
        tok.save_dir(dir)?;
    }
    Ok(family)
}
