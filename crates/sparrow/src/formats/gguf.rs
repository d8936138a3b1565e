//! GGUF files (llama.cpp's format, versions 2 and 3): header, typed metadata, tensor
//! infos and the aligned tensor data, read from a memory map without copying it.
//!
//! Every count, length, offset and size in the file is untrusted: each is checked
//! against the bytes that remain before anything is allocated or read, so a hostile
//! file gets a named error (`Error::Gguf`, with the byte offset), never a panic, an
//! out-of-bounds read or a huge allocation. The llama.cpp and Ollama GGUF CVEs were
//! exactly such unchecked counts.
//!
//! Layout (little-endian): magic `GGUF`, version u32, tensor count u64, metadata count
//! u64; metadata as (key string, value type u32, value); tensor infos as (name string,
//! n_dims u32, dims u64 x n_dims (innermost first), ggml type u32, offset u64); padding
//! to `general.alignment` (default 32); tensor data, each tensor at its offset from
//! the data start.

use super::ggml::GgmlType;
use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `GGUF` as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;
/// Longest key or tensor name accepted (the GGUF spec's limit for keys).
pub const MAX_NAME_BYTES: usize = 65_535;
/// Deepest nesting of metadata arrays accepted (arrays of arrays of ...).
pub const MAX_ARRAY_DEPTH: usize = 3;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// The GGUF type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// An integer of any width, if it is one and non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A signed integer of any width.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float (f32 or f64).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }
}

/// Where a tensor's bytes are and how to read them.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions innermost first, as ggml's `ne` (a PyTorch (rows, cols) weight is
    /// stored as [cols, rows]).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the first byte from the start of the data section.
    pub offset: u64,
    /// Bytes the tensor occupies (checked to lie inside the file).
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in PyTorch order (outermost first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// The file's bytes: a read-only memory map (or an owned buffer, for bytes in memory).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A tensor's bytes inside a file's map, kept alive by this handle (weights that
/// stay quantized are used in place, never copied).
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<Bytes>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.owner[self.start..self.start + self.len]
    }
}

/// A parsed GGUF file: metadata and tensor infos, with the data left in the map.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata by key (sorted).
    pub metadata: BTreeMap<String, Value>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Start of the data section in the file.
    pub data_offset: u64,
    bytes: Arc<Bytes>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian reader over the file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::gguf(self.path, self.pos as u64, message)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "{what} needs {n} bytes but the file has {} left",
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed UTF-8 string of at most `max` bytes.
    fn string(&mut self, what: &str, max: usize) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > max as u64 {
            self.pos = at;
            return Err(self.err(format!("{what} is {len} bytes long (limit {max})")));
        }
        let raw = self.take(len as usize, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| {
            let e = Error::gguf(self.path, at as u64, format!("{what} is not valid UTF-8"));
            self.pos = at;
            e
        })
    }

    /// A count of items of at least `min_item_bytes` each, checked against the bytes
    /// left so no allocation or loop can exceed what the file holds.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let fits = n
            .checked_mul(min_item_bytes as u64)
            .is_some_and(|b| b <= self.remaining() as u64);
        if !fits {
            self.pos = at;
            return Err(self.err(format!(
                "{what} is {n}, more than the {} bytes left can hold",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value> {
        Ok(match type_id {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(self.array::<1>(key)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    self.pos -= 1;
                    return Err(self.err(format!("`{key}`: bool byte is {b}, not 0 or 1")));
                }
            },
            8 => Value::String(self.string(&format!("`{key}` string"), usize::MAX)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "`{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem = self.u32(key)?;
                let min = min_value_bytes(elem).ok_or_else(|| {
                    self.err(format!("`{key}`: unknown array element type {elem}"))
                })?;
                let n = self.count(&format!("`{key}` array length"), min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                self.pos -= 4;
                return Err(self.err(format!("`{key}`: unknown value type {other}")));
            }
        })
    }
}

/// Fewest bytes a value of GGUF type `t` occupies (a string: its u64 length; an array:
/// its element type and count), or None for an unknown type.
fn min_value_bytes(t: u32) -> Option<usize> {
    Some(match t {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}

impl GgufFile {
    /// Memory-map and parse `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process. As with every
        // memory-mapped loader (safetensors, llama.cpp), a file truncated or rewritten
        // by another process while mapped is undefined behaviour; model files are not
        // written while being served.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(Bytes::Mapped(map), path)
    }

    /// Parse a GGUF file held in memory; `path` only names it in errors.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes), path)
    }

    fn parse(bytes: Bytes, path: &Path) -> Result<Self> {
        let (version, metadata, tensors, alignment, data_offset) = {
            let mut r = Reader {
                bytes: &bytes,
                pos: 0,
                path,
            };
            let magic = r.u32("magic")?;
            if magic != MAGIC {
                return Err(Error::gguf(
                    path,
                    0,
                    format!(
                        "not a GGUF file (magic {:?}, want \"GGUF\")",
                        String::from_utf8_lossy(&magic.to_le_bytes())
                    ),
                ));
            }
            let version = r.u32("version")?;
            if !(2..=3).contains(&version) {
                return Err(Error::gguf(
                    path,
                    4,
                    format!("GGUF version {version} is not supported (2 and 3 are; a big-endian file reads as a huge version)"),
                ));
            }
            // A tensor info is at least 8 + 4 + 8 + 4 + 8 bytes; a metadata entry 8 + 4 + 1.
            let n_tensors = r.count("tensor count", 32)?;
            let n_kv = r.count("metadata count", 13)?;
            let mut metadata = BTreeMap::new();
            for _ in 0..n_kv {
                let at = r.pos as u64;
                let key = r.string("metadata key", MAX_NAME_BYTES)?;
                let t = r.u32(&key)?;
                let v = r.value(t, &key, 0)?;
                if metadata.insert(key.clone(), v).is_some() {
                    return Err(Error::gguf(
                        path,
                        at,
                        format!("metadata key `{key}` appears twice"),
                    ));
                }
            }
            let alignment = match metadata.get("general.alignment") {
                None => DEFAULT_ALIGNMENT,
                Some(Value::U32(a)) if *a > 0 && a.is_power_of_two() => *a as u64,
                Some(v) => {
                    return Err(Error::gguf(
                        path,
                        r.pos as u64,
                        format!("general.alignment must be a power-of-two u32, got {v:?}"),
                    ))
                }
            };
            let mut infos = Vec::with_capacity(n_tensors);
            let mut names = HashSet::with_capacity(n_tensors);
            for _ in 0..n_tensors {
                let at = r.pos as u64;
                let name = r.string("tensor name", MAX_NAME_BYTES)?;
                let n_dims = r.u32(&name)? as usize;
                if n_dims == 0 || n_dims > MAX_DIMS {
                    return Err(Error::gguf(
                        path,
                        at,
                        format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})"),
                    ));
                }
                let mut dims = Vec::with_capacity(n_dims);
                for _ in 0..n_dims {
                    dims.push(r.u64(&name)?);
                }
                let type_id = r.u32(&name)?;
                let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| {
                    Error::gguf(
                        path,
                        at,
                        format!(
                            "tensor `{name}` has ggml type {type_id}, which Sparrow does not read"
                        ),
                    )
                })?;
                let offset = r.u64(&name)?;
                let n_bytes = tensor_bytes(&dims, ggml_type)
                    .map_err(|m| Error::gguf(path, at, format!("tensor `{name}`: {m}")))?;
                if offset % alignment != 0 {
                    return Err(Error::gguf(
                        path,
                        at,
                        format!("tensor `{name}` offset {offset} is not a multiple of the alignment {alignment}"),
                    ));
                }
                if !names.insert(name.clone()) {
                    return Err(Error::gguf(
                        path,
                        at,
                        format!("tensor `{name}` appears twice"),
                    ));
                }
                infos.push(TensorInfo {
                    name,
                    dims,
                    ggml_type,
                    offset,
                    n_bytes,
                });
            }
            let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
            let file_len = bytes.len() as u64;
            for t in &infos {
                let end = data_offset
                    .checked_add(t.offset)
                    .and_then(|s| s.checked_add(t.n_bytes));
                if end.is_none_or(|e| e > file_len) {
                    return Err(Error::gguf(
                        path,
                        data_offset,
                        format!(
                            "tensor `{}` ({} bytes at data offset {}) runs past the end of the {file_len}-byte file",
                            t.name, t.n_bytes, t.offset
                        ),
                    ));
                }
            }
            (version, metadata, infos, alignment, data_offset)
        };
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            bytes: Arc::new(bytes),
        })
    }

    /// The tensor info named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's raw bytes (bounds checked at parse time).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.bytes[start..start + t.n_bytes as usize]
    }

    /// A tensor's bytes as a handle that keeps the file mapped (no copy).
    pub fn tensor_data_shared(&self, t: &TensorInfo) -> SharedBytes {
        SharedBytes {
            owner: self.bytes.clone(),
            start: (self.data_offset + t.offset) as usize,
            len: t.n_bytes as usize,
        }
    }

    /// A tensor dequantized to f32, in its stored (row-major, outermost first) order.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        super::ggml::dequantize(t.ggml_type, self.tensor_data(t), t.n_elements() as usize)
            .map_err(|m| self.error(format!("tensor `{}`: {m}", t.name)))
    }

    /// An error about this file's contents (no byte offset).
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::gguf(&self.path, self.data_offset, message)
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| Error::config(key, format!("missing from {}", self.path.display())))
    }

    /// A required non-negative integer.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| Error::config(key, format!("{v:?} is not a non-negative integer")))
    }

    /// An optional non-negative integer.
    pub fn get_usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.get_usize(key).map(Some),
        }
    }

    /// An optional float (f32 or f64).
    pub fn get_f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::config(key, format!("{v:?} is not a float"))),
        }
    }

    /// An optional string.
    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::config(
                key,
                format!("is a {}, not a string", v.type_name()),
            )),
        }
    }

    /// An optional bool.
    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::config(
                key,
                format!("is a {}, not a bool", v.type_name()),
            )),
        }
    }

    /// An optional array.
    pub fn get_array_opt(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(Error::config(
                key,
                format!("is a {}, not an array", v.type_name()),
            )),
        }
    }
}

/// Bytes of a tensor of `dims` (innermost first) in `t`, or why it is invalid: a zero
/// or overflowing size, or rows that are not whole blocks.
pub fn tensor_bytes(dims: &[u64], t: GgmlType) -> std::result::Result<u64, String> {
    let mut n: u64 = 1;
    for &d in dims {
        if d == 0 {
            return Err(format!("dimensions {dims:?} include a zero"));
        }
        n = n
            .checked_mul(d)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    }
    let block = t.block_size() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(format!(
            "rows of {} values are not whole {}-value blocks of {}",
            dims[0],
            block,
            t.name()
        ));
    }
    (n / block)
        .checked_mul(t.block_bytes() as u64)
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))
}
