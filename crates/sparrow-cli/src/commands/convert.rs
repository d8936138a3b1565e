//! `sparrow convert`: a model to the HF layout of its family, Sparrow's own, or GGUF.

use anyhow::{bail, Result};
use sparrow::model_dir::{Layout, SaveOptions};
use std::path::PathBuf;

/// Output layout of `convert`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ConvertTarget {
    Hf,
    Sparrow,
    /// A GGUF file llama.cpp loads (llama-shaped models; --out is the file).
    Gguf,
    /// An adapter's own tensors over the same base (e.g. a training run's adapter
    /// stored in f16 to ship); the base's tokenizer serves it.
    Adapter,
}

/// How `convert` stores parameters.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StorageDtype {
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

#[derive(clap::Args)]
pub struct ConvertArgs {
    #[arg(long, value_enum)]
    pub to: ConvertTarget,
    /// The model: a directory (Sparrow's, or HF llama / mixtral / deepseek), an adapter,
    /// a GGUF file or a known model's name.
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the parameters (buffers stay f32): f32, f16, bf16; for GGUF
    /// f32, f16, q8_0, q4_1.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: StorageDtype,
}

pub fn run(a: ConvertArgs, progress: bool) -> Result<()> {
    let ConvertArgs {
        to,
        model,
        out,
        dtype,
    } = a;
    let source = sparrow::model_source::resolve(&model, progress)?;
    let (m, step) = sparrow::model_source::load_model_with_step(
        &source,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    match to {
        ConvertTarget::Adapter => {
            let sparrow::model_source::ModelSource::Adapter { dir, spec, .. } = &source else {
                bail!(
                    "{} is not an adapter (--to adapter rewrites one; attach indexers with `sparrow dsa attach`)",
                    model.display()
                );
            };
            let opts = SaveOptions {
                dtype: dtype.safetensors()?,
                step,
                ..Default::default()
            };
            let n = sparrow::model_dir::save_adapter(&m, &out, &spec.relocated(dir), &opts)?;
            let bytes = std::fs::metadata(out.join(sparrow::model_dir::ADAPTER_WEIGHTS))?.len();
            println!(
                "{} (adapter of {}: {n} tensors, {:.1} MB) written to {}",
                model.display(),
                spec.base,
                bytes as f64 / 1e6,
                out.display()
            );
        }
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
            if matches!(source, sparrow::model_source::ModelSource::Adapter { .. })
                && matches!(to, ConvertTarget::Sparrow)
            {
                eprintln!("writing the whole model (base and adapter); `--to adapter` writes the adapter alone");
            }
            // The tokenizer goes with the weights (a directory's own, if it has one; a
            // GGUF file's always, with its tokenizer_config.json).
            let tok = match &source {
                sparrow::model_source::ModelSource::Dir(dir)
                    if !dir.join("tokenizer.json").exists() =>
                {
                    None
                }
                s => Some(sparrow::model_source::load_tokenizer(s)?),
            };
            let layout = match to {
                ConvertTarget::Hf => Layout::Hf,
                _ => Layout::Sparrow,
            };
            let opts = SaveOptions {
                layout,
                dtype: dtype.safetensors()?,
                step: step.filter(|_| layout == Layout::Sparrow),
                tokenizer: tok.as_ref(),
            };
            let family = sparrow::model_dir::save(&m, &out, &opts)?;
            println!(
                "{} ({} layout) written to {}",
                model.display(),
                family.map_or("sparrow", |f| f.model_type()),
                out.display()
            );
        }
    }
    Ok(())
}
