//! What `--model` names, and loading it for inference: a model directory (Sparrow's
//! own or a Hugging Face one, `crate::model_dir`), a GGUF file (`crate::formats`), or the name
//! of a known model (`crate::registry`), fetched into the cache on first use.

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
pub use crate::weights::WeightFormat;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// A resolved `--model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A model directory (`config.json`, weights, `tokenizer.json`).
    Dir(PathBuf),
    /// A GGUF file (weights, config and tokenizer in one).
    Gguf(PathBuf),
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
        return Ok(ModelSource::Dir(spec.to_path_buf()));
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
                .collect();
            Err(Error::Invalid(format!(
                "{} does not exist: pass a model directory, a .gguf file or a known model's name ({}; see `sparrow model list`)",
                spec.display(),
                known.join(", ")
            )))
        }
    }
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
        gguf => Ok((
            load_model_for_inference(gguf, WeightFormat::F32, dtype, device, |_| {})?,
            None,
        )),
    }
}

/// The tokenizer alone: `tokenizer.json` of a directory, or the GGUF file's own.
pub fn load_tokenizer(source: &ModelSource) -> Result<Tokenizer> {
    match source {
        ModelSource::Dir(dir) => Tokenizer::from_file(&dir.join("tokenizer.json")),
        ModelSource::Gguf(path) => Tokenizer::from_gguf(&GgufFile::open(path)?),
    }
}
