//! safetensors files: atomic writes and validating reads. A truncated, corrupt or
//! mis-typed file yields an error naming the file and what is wrong, never a panic.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Write `tensors` (name, tensor) with string `metadata` to `path` atomically.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let bytes = serialize(tensors, &metadata)
        .map_err(|e| Error::checkpoint(path, format!("serialize: {e}")))?;
    crate::fsio::write_atomic(path, &bytes)
}

/// The safetensors encoding of `tensors`, deterministic byte for byte: tensors sorted by
/// name, header keys sorted (the `safetensors` crate's own writer orders metadata by
/// hash, so the same checkpoint saved twice would differ).
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    // BTreeMaps, not serde_json::Map: its key order is insertion order when a
    // dependency turns on serde_json's `preserve_order` (llguidance does).
    let mut header: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    if !metadata.is_empty() {
        let meta: BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), serde_json::json!(meta));
    }
    let mut data = Vec::new();
    for (name, t) in sorted {
        let start = data.len();
        let dtype = append_le_bytes(&mut data, t)?;
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": t.dims(), "data_offsets": [start, data.len()] }),
        );
    }
    let mut head = serde_json::to_vec(&header)
        .map_err(|e| Error::Invalid(format!("safetensors header: {e}")))?;
    while head.len() % 8 != 0 {
        head.push(b' '); // the format pads the header to 8-byte alignment with spaces
    }
    let mut out = Vec::with_capacity(8 + head.len() + data.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Append a tensor's elements little-endian; returns its safetensors dtype name.
fn append_le_bytes(out: &mut Vec<u8>, t: &Tensor) -> Result<&'static str> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => {
            out.extend(flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()));
            "F32"
        }
        DType::F64 => {
            out.extend(flat.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()));
            "F64"
        }
        DType::F16 => {
            out.extend(
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes()),
            );
            "F16"
        }
        DType::BF16 => {
            out.extend(
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes()),
            );
            "BF16"
        }
        DType::U32 => {
            out.extend(flat.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()));
            "U32"
        }
        DType::I64 => {
            out.extend(flat.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()));
            "I64"
        }
        other => {
            return Err(Error::Invalid(format!(
                "cannot store dtype {other:?} in safetensors"
            )))
        }
    })
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

/// How an inference load holds the weight matrices of the linear layers (`--weights`).
/// Norms, biases and buffers stay f32 in every format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// f32 (what training and conversion need).
    F32,
    /// IEEE half precision, widened to f32 in registers (`kernels::hmatmul`).
    F16,
    /// bfloat16, widened to f32 in registers.
    Bf16,
    /// int8 in blocks of 32 with one f16 scale each (ggml's Q8_0), multiplied with
    /// int8-quantized activations (`kernels::qmatmul`).
    Int8,
    /// As the file stores them: f16 / bf16 safetensors stay f16 / bf16; GGUF `Q4_0`,
    /// `Q4_1` and `Q8_0` stay in their blocks, other GGUF types become f16; f32 stays f32.
    #[default]
    Native,
}
