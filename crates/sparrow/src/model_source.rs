//! What `--model` names, and loading it for inference or training: a model directory
//! (Sparrow's own or a Hugging Face one, `crate::model_dir`), a GGUF file
//! (`crate::formats`), an adapter directory over a base model (`model_dir::AdapterSpec`:
//! the base's tensors, quantized or not, plus the adapter's), or the name of a known
//! model (`crate::registry`), fetched into the cache on first use.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::kernels::qmatmul::QMatrix;
use crate::model::params::{ParamSet, VarStore};
use crate::model::Model;
use crate::model_dir::{AdapterSpec, ADAPTER_WEIGHTS};
use crate::tokenizer::Tokenizer;
pub use crate::weights::WeightFormat;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A resolved `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A model directory (`config.json`, weights, `tokenizer.json`).
    Dir(PathBuf),
    /// A GGUF file (weights, config and tokenizer in one).
    Gguf(PathBuf),
    /// An adapter directory (`adapter.json`) and its resolved base (a directory or a
    /// GGUF file).
    Adapter {
        dir: PathBuf,
        spec: AdapterSpec,
        base: Box<ModelSource>,
    },
}

/// Whether `path` starts with GGUF's magic bytes.
fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Resolve `spec`: an existing directory or GGUF file, else a known model's name
/// (fetched into the cache if absent; `progress` shows the download).
pub fn resolve(spec: &Path, progress: bool) -> Result<ModelSource> {
    if spec.is_dir() {
        return match AdapterSpec::read(spec)? {
            Some(a) => resolve_adapter(spec, a, progress),
            None => Ok(ModelSource::Dir(spec.to_path_buf())),
        };
    }
    if spec.is_file() {
        return if is_gguf(spec) {
            Ok(ModelSource::Gguf(spec.to_path_buf()))
        } else {
            Err(Error::Invalid(format!(
                "{} is a file but not a GGUF model (pass a model directory, a .gguf file or a known model name)",
                spec.display()
            )))
        };
    }
    let name = spec.to_string_lossy();
    if let Some((_, dir)) = crate::registry::find_adapter(&name) {
        return resolve(&dir, progress);
    }
    match crate::registry::find(&name) {
        Some(m) => {
            let home = crate::registry::home()?;
            Ok(ModelSource::Gguf(crate::registry::fetch(
                &home, m, progress,
            )?))
        }
        None => {
            let known: Vec<&str> = crate::registry::KNOWN_MODELS
                .iter()
                .map(|m| m.name)
                .chain(crate::registry::KNOWN_ADAPTERS.iter().map(|a| a.name))
                .collect();
            Err(Error::Invalid(format!(
                "{} does not exist: pass a model directory, a .gguf file or a known model's name ({}; see `sparrow model list`)",
                spec.display(),
                known.join(", ")
            )))
        }
    }
}

/// The base of adapter `dir`: resolved (fetched when it is a known model's name), not
/// itself an adapter, and the file its `base_sha256` names.
fn resolve_adapter(dir: &Path, spec: AdapterSpec, progress: bool) -> Result<ModelSource> {
    let json = dir.join(crate::model_dir::ADAPTER_JSON);
    let base_spec = match spec.base_path(dir) {
        Some(p) if !p.exists() => {
            return Err(Error::checkpoint(
                &json,
                format!("its base {} does not exist", p.display()),
            ))
        }
        Some(p) => p,
        None => PathBuf::from(&spec.base),
    };
    let base = match resolve(&base_spec, progress) {
        Ok(ModelSource::Adapter { .. }) => {
            return Err(Error::checkpoint(
                &json,
                format!(
                    "its base {} is itself an adapter (one level only)",
                    spec.base
                ),
            ))
        }
        Ok(b) => b,
        Err(e) => {
            return Err(Error::checkpoint(
                &json,
                format!("its base `{}`: {e}", spec.base),
            ))
        }
    };
    if let (ModelSource::Gguf(path), Some(want)) = (&base, &spec.base_sha256) {
        let known = crate::registry::find(&spec.base).map(|m| m.file_sha256);
        // A known model's file was checked against this same hash when fetched.
        let got = match known {
            Some(k) if k == want => k.to_string(),
            _ => crate::registry::sha256_file(path)?,
        };
        if &got != want {
            return Err(Error::checkpoint(
                &json,
                format!(
                    "its base {} has SHA-256 {got}, the adapter was made for {want}",
                    path.display()
                ),
            ));
        }
    }
    Ok(ModelSource::Adapter {
        dir: dir.to_path_buf(),
        spec,
        base: Box::new(base),
    })
}

/// The config of a resolved model (an adapter's own: the whole model's).
pub fn read_config(source: &ModelSource) -> Result<ModelConfig> {
    match source {
        ModelSource::Dir(dir) | ModelSource::Adapter { dir, .. } => {
            Ok(crate::formats::hf::read_config(&dir.join("config.json"))?.0)
        }
        ModelSource::Gguf(path) => crate::formats::gguf_model::read_config(&GgufFile::open(path)?),
    }
}

/// Tensors of a model under Sparrow's names, plus the matrices kept quantized, and the
/// file errors name.
type SourceTensors = (
    HashMap<String, Tensor>,
    HashMap<String, Arc<QMatrix>>,
    PathBuf,
);

/// Every tensor of a directory or GGUF `source`, whose config must shape its tensors
/// as `cfg` does (`check_same_base`, errors naming `named`): GGUF matrices held as
/// `weights` says; directories' tensors as stored (the store converts them). The
/// base's config is read once, from the file the tensors come from.
fn base_tensors(
    source: &ModelSource,
    cfg: &ModelConfig,
    weights: WeightFormat,
    device: &Device,
    named: &Path,
) -> Result<SourceTensors> {
    match source {
        ModelSource::Dir(dir) => {
            let (base, family) = crate::formats::hf::read_config(&dir.join("config.json"))?;
            check_same_base(cfg, &base, named)?;
            let w = crate::formats::hf::read_weights(dir, family, device)?;
            Ok((w.tensors, HashMap::new(), w.source))
        }
        ModelSource::Gguf(path) => {
            let file = GgufFile::open(path)?;
            check_same_base(cfg, &crate::formats::gguf_model::read_config(&file)?, named)?;
            let (t, q) = crate::formats::gguf_model::read_tensors(&file, cfg, weights, device)?;
            Ok((t, q, path.clone()))
        }
        ModelSource::Adapter { dir, .. } => Err(Error::checkpoint(
            dir,
            "an adapter's base cannot be an adapter",
        )),
    }
}

/// The architecture an adapter's config must share with its base's: every field that
/// shapes a base tensor.
fn check_same_base(adapter: &ModelConfig, base: &ModelConfig, json: &Path) -> Result<()> {
    let fields: [(&str, usize, usize); 7] = [
        ("vocab_size", adapter.vocab_size, base.vocab_size),
        ("hidden_size", adapter.hidden_size, base.hidden_size),
        (
            "intermediate_size",
            adapter.intermediate_size,
            base.intermediate_size,
        ),
        (
            "num_hidden_layers",
            adapter.num_hidden_layers,
            base.num_hidden_layers,
        ),
        (
            "num_attention_heads",
            adapter.num_attention_heads,
            base.num_attention_heads,
        ),
        (
            "num_key_value_heads",
            adapter.num_kv_heads(),
            base.num_kv_heads(),
        ),
        ("head_dim", adapter.head_dim(), base.head_dim()),
    ];
    for (name, a, b) in fields {
        if a != b {
            return Err(Error::checkpoint(
                json,
                format!(
                    "the adapter's config has {name} {a}, its base {b}: not this base's adapter"
                ),
            ));
        }
    }
    Ok(())
}

/// Build the model of adapter `dir` over `base`: its config (`edit`ed), the base's
/// tensors with the adapter's added (or replacing the base's of the same name), the
/// store set up by `store`. Returns the model and the step its weights record.
#[allow(clippy::too_many_arguments)]
fn load_adapter(
    dir: &Path,
    base: &ModelSource,
    weights: WeightFormat,
    dtype: DType,
    device: &Device,
    edit: impl FnOnce(&mut ModelConfig),
    store: impl FnOnce(VarStore) -> VarStore,
) -> Result<(Model, Option<u64>)> {
    let json = dir.join(crate::model_dir::ADAPTER_JSON);
    let (mut cfg, _) = crate::formats::hf::read_config(&dir.join("config.json"))?;
    edit(&mut cfg);
    cfg.validate()?;
    let (mut tensors, mut quantized, _) = base_tensors(base, &cfg, weights, device, &json)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let (own, meta) = crate::weights::load(&path, device)?;
    let step = crate::model_dir::step_of(&meta, &path)?;
    for (name, t) in own {
        quantized.remove(&name);
        tensors.insert(name, t);
    }
    let store = store(
        VarStore::loaded_with_quantized(tensors, quantized, path, dtype, device)
            .with_weight_format(weights),
    );
    Ok((Model::from_store(&cfg, store)?, step))
}

/// Load a resolved model for training: f32 weights, only the parameters in
/// `trainable` receiving gradients; `cfg` (when given) replaces the model's config
/// (it must describe the same tensors). Returns the model and the step its weights
/// record (directories and adapters).
pub fn load_for_training(
    source: &ModelSource,
    cfg: Option<ModelConfig>,
    trainable: ParamSet,
    device: &Device,
) -> Result<(Model, Option<u64>)> {
    let edit = |c: &mut ModelConfig| {
        if let Some(cfg) = cfg {
            *c = cfg;
        }
    };
    match source {
        ModelSource::Dir(dir) => {
            crate::model_dir::load_for_training(dir, DType::F32, device, edit, trainable)
        }
        ModelSource::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let mut c = crate::formats::gguf_model::read_config(&file)?;
            edit(&mut c);
            c.validate()?;
            let (t, _) =
                crate::formats::gguf_model::read_tensors(&file, &c, WeightFormat::F32, device)?;
            let store =
                VarStore::loaded(t, path.clone(), DType::F32, device).with_trainable(trainable);
            Ok((Model::from_store(&c, store)?, None))
        }
        ModelSource::Adapter { dir, base, .. } => load_adapter(
            dir,
            base,
            WeightFormat::F32,
            DType::F32,
            device,
            edit,
            |s| s.with_trainable(trainable),
        ),
    }
}

/// `cfg`, a model with more parameters than `base` (e.g. DSA indexers on a dense
/// model), built from the base's tensors (f32) with the parameters in `new` that the
/// base lacks initialised from `seed`: the start of an adapter (`sparrow dsa attach`).
pub fn attach(
    base: &ModelSource,
    cfg: &ModelConfig,
    new: ParamSet,
    seed: u64,
    device: &Device,
) -> Result<Model> {
    if let ModelSource::Adapter { dir, .. } = base {
        return Err(Error::checkpoint(
            dir,
            "is an adapter: attach to a base model (a directory, a GGUF file or a known model)",
        ));
    }
    cfg.validate()?;
    let named = Path::new("the new config");
    let (t, q, path) = base_tensors(base, cfg, WeightFormat::F32, device, named)?;
    debug_assert!(q.is_empty());
    let store = VarStore::loaded(t, path, DType::F32, device)
        .with_missing_initialised(seed, new)
        .with_trainable(new);
    Model::from_store(cfg, store)
}

/// Load a resolved model and its tokenizer for inference (frozen parameters, f32
/// activations; the linear layers' weights held as `weights` says); `edit` adjusts the
/// config before the layers are built.
pub fn load_for_inference(
    source: &ModelSource,
    weights: WeightFormat,
    dtype: DType,
    device: &Device,
    edit: impl FnOnce(&mut crate::config::ModelConfig),
) -> Result<(Model, Tokenizer)> {
    match source {
        ModelSource::Dir(_) => {
            let tok = load_tokenizer(source)?;
            Ok((
                load_model_for_inference(source, weights, dtype, device, edit)?,
                tok,
            ))
        }
        // One map and one metadata parse serve both.
        ModelSource::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let tok = Tokenizer::from_gguf(&file)?;
            let model = Model::load_gguf_for_inference(&file, weights, dtype, device, edit)?;
            Ok((model, tok))
        }
        ModelSource::Adapter { .. } => Ok((
            load_model_for_inference(source, weights, dtype, device, edit)?,
            load_tokenizer(source)?,
        )),
    }
}

/// The model alone (see [`load_for_inference`]).
pub fn load_model_for_inference(
    source: &ModelSource,
    weights: WeightFormat,
    dtype: DType,
    device: &Device,
    edit: impl FnOnce(&mut crate::config::ModelConfig),
) -> Result<Model> {
    match source {
        ModelSource::Dir(dir) => {
            Ok(crate::model_dir::load_for_inference(dir, weights, dtype, device, edit)?.0)
        }
        ModelSource::Gguf(path) => {
            Model::load_gguf_for_inference(&GgufFile::open(path)?, weights, dtype, device, edit)
        }
        ModelSource::Adapter { dir, base, .. } => {
            Ok(load_adapter(dir, base, weights, dtype, device, edit, VarStore::frozen)?.0)
        }
    }
}

/// The model with the training step its weights record (directories; GGUF files have
/// none), every weight dequantized to f32: for conversion.
pub fn load_model_with_step(
    source: &ModelSource,
    dtype: DType,
    device: &Device,
) -> Result<(Model, Option<u64>)> {
    match source {
        ModelSource::Dir(dir) => {
            crate::model_dir::load_for_inference(dir, WeightFormat::F32, dtype, device, |_| {})
        }
        ModelSource::Adapter { dir, base, .. } => load_adapter(
            dir,
            base,
            WeightFormat::F32,
            dtype,
            device,
            |_| {},
            VarStore::frozen,
        ),
        gguf => Ok((
            load_model_for_inference(gguf, WeightFormat::F32, dtype, device, |_| {})?,
            None,
        )),
    }
}

/// The tokenizer alone: `tokenizer.json` of a directory, or the GGUF file's own; an
/// adapter's own `tokenizer.json` when it has one, else its base's.
pub fn load_tokenizer(source: &ModelSource) -> Result<Tokenizer> {
    match source {
        ModelSource::Dir(dir) => Tokenizer::from_file(&dir.join("tokenizer.json")),
        ModelSource::Gguf(path) => Tokenizer::from_gguf(&GgufFile::open(path)?),
        ModelSource::Adapter { dir, base, .. } => {
            let own = dir.join("tokenizer.json");
            if own.is_file() {
                Tokenizer::from_file(&own)
            } else {
                load_tokenizer(base)
            }
        }
    }
}
