//! Reading the fields of another engine's `config.json`: typed with the field path in
//! errors, and token ids however HF writes them.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A token id field that HF may write as a number, a list (first one used) or null.
pub fn token_id(v: &Option<Value>, field: &str, default: u32) -> Result<u32> {
    let bad = || Error::config(field, format!("{v:?} is not a token id"));
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => n.as_u64().map(|x| x as u32).ok_or_else(bad),
        Some(Value::Array(a)) => match a.first() {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32).ok_or_else(bad),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// The fields `T` reads from a config's text; a missing or mistyped one is an error
/// naming its JSON path and the file.
pub fn parse_fields<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        Error::config(
            e.path().to_string(),
            format!("{} ({})", e.inner(), path.display()),
        )
    })
}
