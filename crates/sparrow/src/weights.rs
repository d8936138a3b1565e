//! safetensors files: atomic writes and validating reads. A truncated, corrupt or
//! mis-typed file yields an error naming the file and what is wrong, never a panic.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// Write `tensors` (name, tensor) with string `metadata` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut contiguous = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        contiguous.push((name.clone(), t.contiguous()?));
    }
    let bytes = safetensors::serialize(
        contiguous.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )
    .map_err(|e| Error::checkpoint(path, format!("serialize: {e}")))?;
    crate::fsio::write_atomic(path, &bytes)
}

/// Read every tensor of a safetensors file plus its metadata.
pub fn load(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse(&bytes, path, device)
}

/// Parse safetensors bytes; `path` only names the source in errors.
pub fn parse(
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bad = |m: String| Error::checkpoint(path, m);
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
        bad(format!(
            "not a valid safetensors file ({} bytes): {e}",
            bytes.len()
        ))
    })?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        bad(format!(
            "not a valid safetensors file ({} bytes): {e}",
            bytes.len()
        ))
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::U32 => DType::U32,
            Dtype::I64 => DType::I64,
            Dtype::U8 => DType::U8,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has unsupported dtype {other:?}"
                )))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, &shape, device)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        out.insert(name, t);
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}
