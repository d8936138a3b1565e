//! A corpus is any folder of `.txt` files (searched recursively, read in sorted path
//! order so every run sees the same documents in the same order).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// All `.txt` files under `dir`, sorted. Errors if there are none.
pub fn list_text_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::Corpus(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))?;
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&d, e))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.starts_with('.') {
                continue; // hidden files and our own caches
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "txt") {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::Corpus(format!("no .txt files in {}", dir.display())));
    }
    Ok(files)
}

/// Read one corpus document; invalid UTF-8 is an error naming the file and byte offset.
pub fn read_document(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        Error::Corpus(format!(
            "{} is not valid UTF-8 (first bad byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Split text into pieces of roughly `target` bytes at line ends, for parallel encoding.
pub fn split_at_lines(text: &str, target: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + target).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        if end < text.len() {
            end = match text[end..].find('\n') {
                Some(i) => end + i + 1,
                None => text.len(),
            };
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    pieces
}
