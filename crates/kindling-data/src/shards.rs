//! Corpora larger than memory: [`prepare`] tokenises the sources once into token shards on disk
//! (nanoGPT's `.bin` files, plus per-token flags, a document index and a manifest), and
//! [`ShardBlocks`] serves fixed-length blocks from the shards by index (positional reads), so the
//! loader's seeded block permutation, on-the-fly masking and `(epoch, position)` resume work as
//! they do in memory, with memory flat in the corpus size.
//!
//! A prepared folder:
//!
//! ```text
//! manifest.json        what was prepared from what: sources (path, bytes, SHA-256), the
//!                      tokenizer's SHA-256, the settings, and per split its shards and counts
//! train-00000.ids      token ids, little-endian u16 (vocabulary <= 65536) or u32
//! train-00000.flags    one byte per token: SPECIAL | WORD_START (as `packing`)
//! train.idx            little-endian u64: the stream offset where each document starts
//! train.counts         little-endian u64 per vocabulary id: its non-special occurrences
//! eval-00000.ids ...   the same for the held-out split
//! ```
//!
//! A split is one token stream: its documents joined with `[SEP]`, cut into shards of at most
//! `shard_tokens` tokens (a document may straddle two). Documents are paragraphs of text files
//! (blank-line separated) and rows of JSONL / parquet files (a named field). Each document goes
//! to the eval split when a hash of its text falls below `eval_fraction`, so the split is the
//! same whatever the order or sharding of the sources, and a document never leaks across.
//! Rerunning with the same sources, tokenizer and settings reuses the folder; anything changed
//! is detected (SHA-256) and the folder is rebuilt, in a temporary folder renamed into place.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::error::{DataError, Result};
use crate::packing::{Blocks, SPECIAL, WORD_START};
use crate::tokenizer::SpecialTokens;
use kindling_core::rng::{hash_str, mix64};

/// Bumped when the folder layout changes: an older folder is rebuilt.
const FORMAT_VERSION: u32 = 2;

/// What to prepare and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareConfig {
    /// The prepared folder.
    pub dir: PathBuf,
    /// The field of JSONL rows / column of parquet files that holds the text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Tokens per shard file.
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: u64,
    /// Text tokenised per parallel batch: bounds the memory of preparing.
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
}

fn default_text_field() -> String {
    "text".into()
}
fn default_shard_tokens() -> u64 {
    1 << 26
}
fn default_batch_bytes() -> usize {
    4 << 20
}

/// One source file as it was when prepared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// One split of a prepared folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SplitInfo {
    pub documents: u64,
    pub tokens: u64,
    /// Shard file stems (`train-00000`) and their token counts, in stream order.
    pub shards: Vec<(String, u64)>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub sources: Vec<SourceFile>,
    pub tokenizer_sha256: String,
    pub vocab_size: usize,
    /// Whether ids are stored as u32 (else u16).
    pub wide_ids: bool,
    pub text_field: String,
    pub eval_fraction: f64,
    pub shard_tokens: u64,
    pub train: SplitInfo,
    pub eval: SplitInfo,
    /// Bytes of the source files as stored (compressed or not).
    pub source_bytes: u64,
    /// Bytes of text tokenised (decompressed, documents only).
    pub text_bytes: u64,
}

impl Manifest {
    /// Whether this folder was prepared from exactly `sources` with `tokenizer_sha256` and `cfg`.
    fn matches(
        &self,
        sources: &[SourceFile],
        tokenizer_sha256: &str,
        cfg: &PrepareConfig,
        eval_fraction: f64,
    ) -> bool {
        self.format_version == FORMAT_VERSION
            && self.sources == sources
            && self.tokenizer_sha256 == tokenizer_sha256
            && self.text_field == cfg.text_field
            && self.eval_fraction == eval_fraction
            && self.shard_tokens == cfg.shard_tokens
    }
}

/// What [`prepare`] did.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub manifest: Manifest,
    /// True when the folder was already up to date.
    pub reused: bool,
    pub seconds: f64,
}

impl PrepareReport {
    /// Megabytes of text tokenised per second of preparing (0 when reused).
    pub fn mb_per_s(&self) -> f64 {
        if self.reused || self.seconds <= 0.0 {
            0.0
        } else {
            self.manifest.text_bytes as f64 / 1e6 / self.seconds
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Size and SHA-256 of a file, read in 1 MiB pieces.
fn describe(path: &Path) -> Result<SourceFile> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(SourceFile {
        path: path.to_path_buf(),
        bytes,
        sha256: format!("{:x}", h.finalize()),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum SourceKind {
    Text,
    Jsonl,
    Parquet,
}

fn kind_of(path: &Path) -> SourceKind {
    let name = path.to_string_lossy().to_ascii_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    if name.ends_with(".parquet") {
        SourceKind::Parquet
    } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
        SourceKind::Jsonl
    } else {
        SourceKind::Text
    }
}

fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = File::open(path).map_err(io_err(path))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(f)))
    } else {
        Box::new(BufReader::new(f))
    })
}

/// Calls `f` with every document of `path`, streaming: paragraphs of a text file, the
/// `field` of each JSONL row or parquet row (empty and null values are skipped).
pub fn for_each_document(
    path: &Path,
    field: &str,
    f: &mut dyn FnMut(String) -> Result<()>,
) -> Result<()> {
    match kind_of(path) {
        SourceKind::Text => {
            let mut para = String::new();
            for (i, line) in open_maybe_gz(path)?.lines().enumerate() {
                let line = line.map_err(|e| DataError::Row {
                    path: path.to_path_buf(),
                    line: i as u64 + 1,
                    msg: format!("not UTF-8 text: {e}"),
                })?;
                let line = line.trim();
                if line.is_empty() {
                    if !para.is_empty() {
                        f(std::mem::take(&mut para))?;
                    }
                } else {
                    if !para.is_empty() {
                        para.push(' ');
                    }
                    para.push_str(line);
                }
            }
            if !para.is_empty() {
                f(para)?;
            }
        }
        SourceKind::Jsonl => {
            for (i, line) in open_maybe_gz(path)?.lines().enumerate() {
                let row_err = |msg: String| DataError::Row {
                    path: path.to_path_buf(),
                    line: i as u64 + 1,
                    msg,
                };
                let line = line.map_err(|e| row_err(format!("not UTF-8 text: {e}")))?;
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| row_err(format!("not a JSON object: {e}")))?;
                match v.get(field) {
                    Some(serde_json::Value::String(s)) if !s.trim().is_empty() => f(s.clone())?,
                    Some(serde_json::Value::String(_)) | Some(serde_json::Value::Null) => {}
                    Some(other) => {
                        return Err(row_err(format!(
                            "field `{field}` is {other}, expected a string"
                        )))
                    }
                    None => {
                        return Err(row_err(format!(
                            "no field `{field}` (set data.prepare.text_field)"
                        )))
                    }
                }
            }
        }
        SourceKind::Parquet => crate::parquet_source::for_each_text(path, field, f)?,
    }
    Ok(())
}

/// Appends documents to one split's shards.
struct SplitWriter {
    dir: PathBuf,
    name: &'static str,
    wide: bool,
    shard_tokens: u64,
    info: SplitInfo,
    shard: Option<(BufWriter<File>, BufWriter<File>, u64)>,
    index: BufWriter<File>,
    /// Occurrences of each non-special token id: the unigram baseline without a pass over the
    /// shards at training time.
    counts: Vec<u64>,
}

impl SplitWriter {
    fn new(
        dir: &Path,
        name: &'static str,
        wide: bool,
        shard_tokens: u64,
        vocab_size: usize,
    ) -> Result<Self> {
        let idx = dir.join(format!("{name}.idx"));
        Ok(SplitWriter {
            dir: dir.to_path_buf(),
            name,
            wide,
            shard_tokens,
            info: SplitInfo::default(),
            shard: None,
            index: BufWriter::new(File::create(&idx).map_err(io_err(&idx))?),
            counts: vec![0; vocab_size],
        })
    }

    fn open_shard(&mut self) -> Result<()> {
        let stem = format!("{}-{:05}", self.name, self.info.shards.len());
        let ids = self.dir.join(format!("{stem}.ids"));
        let flags = self.dir.join(format!("{stem}.flags"));
        self.shard = Some((
            BufWriter::new(File::create(&ids).map_err(io_err(&ids))?),
            BufWriter::new(File::create(&flags).map_err(io_err(&flags))?),
            0,
        ));
        self.info.shards.push((stem, 0));
        Ok(())
    }

    fn push_tokens(&mut self, ids: &[u32], flags: &[u8]) -> Result<()> {
        let mut at = 0;
        while at < ids.len() {
            if self.shard.as_ref().is_none_or(|s| s.2 >= self.shard_tokens) {
                self.open_shard()?;
            }
            let (wi, wf, n) = self.shard.as_mut().expect("a shard is open");
            let take = ((self.shard_tokens - *n) as usize).min(ids.len() - at);
            let path = &self.dir;
            for &id in &ids[at..at + take] {
                if self.wide {
                    wi.write_all(&id.to_le_bytes()).map_err(io_err(path))?;
                } else {
                    wi.write_all(&(id as u16).to_le_bytes())
                        .map_err(io_err(path))?;
                }
            }
            wf.write_all(&flags[at..at + take]).map_err(io_err(path))?;
            *n += take as u64;
            self.info.shards.last_mut().expect("a shard").1 = *n;
            at += take;
        }
        self.info.tokens += ids.len() as u64;
        Ok(())
    }

    /// A document: `[SEP]` before it unless it is the first, then its tokens.
    fn push_document(&mut self, ids: &[u32], flags: &[u8], sep: u32) -> Result<()> {
        if self.info.tokens > 0 {
            self.push_tokens(&[sep], &[SPECIAL])?;
        }
        self.index
            .write_all(&self.info.tokens.to_le_bytes())
            .map_err(io_err(&self.dir))?;
        for (&id, &f) in ids.iter().zip(flags) {
            if f & SPECIAL == 0 {
                self.counts[id as usize] += 1;
            }
        }
        self.push_tokens(ids, flags)?;
        self.info.documents += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<SplitInfo> {
        if let Some((mut wi, mut wf, _)) = self.shard.take() {
            wi.flush().map_err(io_err(&self.dir))?;
            wf.flush().map_err(io_err(&self.dir))?;
        }
        self.index.flush().map_err(io_err(&self.dir))?;
        let path = self.dir.join(format!("{}.counts", self.name));
        let bytes: Vec<u8> = self.counts.iter().flat_map(|c| c.to_le_bytes()).collect();
        std::fs::write(&path, bytes).map_err(io_err(&path))?;
        Ok(self.info)
    }
}

/// Token ids and flags of one document, as `packing` flags them.
fn encode_document(tk: &Tokenizer, sp: &SpecialTokens, text: &str) -> Result<(Vec<u32>, Vec<u8>)> {
    let enc = tk
        .encode(text, false)
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    let mut prev_word = None;
    let flags = enc
        .get_ids()
        .iter()
        .zip(enc.get_word_ids())
        .map(|(&id, &word)| {
            let start = word.is_none() || word != prev_word;
            prev_word = word;
            if sp.all.binary_search(&id).is_ok() {
                SPECIAL
            } else if start {
                WORD_START
            } else {
                0
            }
        })
        .collect();
    Ok((enc.get_ids().to_vec(), flags))
}

/// Whether a document goes to the eval split: a hash of its text, not its position.
pub fn is_eval_document(text: &str, eval_fraction: f64) -> bool {
    let u = (mix64(hash_str(text) ^ 0x6576_616c) >> 11) as f64 / (1u64 << 53) as f64;
    u < eval_fraction
}

/// Prepares (or reuses) `cfg.dir` from the files of `sources` with `tokenizer`, holding out the
/// documents [`is_eval_document`] picks for `eval_fraction`. `progress` is called with the
/// source bytes done (and the total) after each file and each parallel batch.
pub fn prepare(
    sources: &[PathBuf],
    tokenizer: &Tokenizer,
    sp: &SpecialTokens,
    cfg: &PrepareConfig,
    eval_fraction: f64,
    progress: &dyn Fn(u64, u64),
) -> Result<PrepareReport> {
    let t0 = std::time::Instant::now();
    if !(0.0..1.0).contains(&eval_fraction) {
        return Err(DataError::Config {
            key: "data.eval_fraction",
            msg: format!("must be in [0, 1), got {eval_fraction}"),
        });
    }
    if cfg.shard_tokens == 0 {
        return Err(DataError::Config {
            key: "data.prepare.shard_tokens",
            msg: "must be positive".into(),
        });
    }
    let described: Vec<SourceFile> = sources
        .par_iter()
        .map(|p| describe(p))
        .collect::<Result<_>>()?;
    let tokenizer_json = tokenizer
        .to_string(false)
        .map_err(|e| DataError::Tokenizer(e.to_string()))?;
    let tokenizer_sha256 = format!("{:x}", Sha256::digest(tokenizer_json.as_bytes()));
    check_replaceable(&cfg.dir, sources)?;
    if let Ok(old) = read_manifest(&cfg.dir) {
        if old.matches(&described, &tokenizer_sha256, cfg, eval_fraction) {
            return Ok(PrepareReport {
                manifest: old,
                reused: true,
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
    }
    let vocab_size = tokenizer.get_vocab_size(true);
    let wide = vocab_size > 1 << 16;
    let total_bytes: u64 = described.iter().map(|s| s.bytes).sum();
    let tmp = cfg
        .dir
        .with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    let mut train = SplitWriter::new(&tmp, "train", wide, cfg.shard_tokens, vocab_size)?;
    let mut eval = SplitWriter::new(&tmp, "eval", wide, cfg.shard_tokens, vocab_size)?;
    let mut done = 0u64;
    let mut text_bytes = 0u64;
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    // Tokenises a batch of documents in parallel and appends them in order.
    let flush =
        |batch: &mut Vec<String>, train: &mut SplitWriter, eval: &mut SplitWriter| -> Result<()> {
            let encoded: Vec<(Vec<u32>, Vec<u8>)> = batch
                .par_iter()
                .map(|t| encode_document(tokenizer, sp, t))
                .collect::<Result<_>>()?;
            for (text, (ids, flags)) in batch.iter().zip(encoded) {
                if ids.is_empty() {
                    continue;
                }
                let w = if is_eval_document(text, eval_fraction) {
                    &mut *eval
                } else {
                    &mut *train
                };
                w.push_document(&ids, &flags, sp.sep)?;
            }
            batch.clear();
            Ok(())
        };
    for (path, source) in sources.iter().zip(&described) {
        for_each_document(path, &cfg.text_field, &mut |doc| {
            batch_bytes += doc.len();
            text_bytes += doc.len() as u64;
            batch.push(doc);
            if batch_bytes >= cfg.batch_bytes {
                flush(&mut batch, &mut train, &mut eval)?;
                progress(done + batch_bytes as u64, total_bytes);
                batch_bytes = 0;
            }
            Ok(())
        })?;
        flush(&mut batch, &mut train, &mut eval)?;
        batch_bytes = 0;
        done += source.bytes;
        progress(done, total_bytes);
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        sources: described,
        tokenizer_sha256,
        vocab_size,
        wide_ids: wide,
        text_field: cfg.text_field.clone(),
        eval_fraction,
        shard_tokens: cfg.shard_tokens,
        train: train.finish()?,
        eval: eval.finish()?,
        source_bytes: total_bytes,
        text_bytes,
    };
    if manifest.train.tokens == 0 {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(DataError::EmptyCorpus {
            what: "the sources hold no text for the training split".into(),
        });
    }
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    let path = tmp.join("manifest.json");
    std::fs::write(&path, text).map_err(io_err(&path))?;
    // Swap the finished folder in: a crash before this leaves the old folder (or none), never
    // a half-written one.
    if cfg.dir.exists() {
        std::fs::remove_dir_all(&cfg.dir).map_err(io_err(&cfg.dir))?;
    }
    if let Some(parent) = cfg.dir.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    std::fs::rename(&tmp, &cfg.dir).map_err(io_err(&cfg.dir))?;
    Ok(PrepareReport {
        manifest,
        reused: false,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `dir` may be (re)written: it does not exist, is empty, or is a prepared folder (its
/// `manifest.json` parses), and it holds none of the sources. Anything else is a folder of the
/// user's that preparing would delete (replacing a stale prepared folder removes it whole).
fn check_replaceable(dir: &Path, sources: &[PathBuf]) -> Result<()> {
    let refuse = |msg: String| {
        Err(DataError::Config {
            key: "data.prepare.dir",
            msg: format!("{}: {msg}; name a new folder", dir.display()),
        })
    };
    match std::fs::symlink_metadata(dir) {
        Err(_) => return Ok(()),
        Ok(m) if !m.is_dir() => return refuse("exists and is not a folder".into()),
        Ok(_) => {}
    }
    let canonical = dir.canonicalize().map_err(io_err(dir))?;
    if let Some(src) = sources
        .iter()
        .find(|s| s.canonicalize().is_ok_and(|s| s.starts_with(&canonical)))
    {
        return refuse(format!(
            "holds the source {}, which preparing would delete",
            src.display()
        ));
    }
    let empty = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .next()
        .is_none();
    if empty || read_manifest(dir).is_ok() {
        return Ok(());
    }
    refuse("exists and is not a prepared token-shard folder (no manifest.json)".into())
}

/// Reads `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| DataError::Config {
        key: "data.prepare.dir",
        msg: format!("{}: not a prepared folder's manifest: {e}", path.display()),
    })
}

/// One split of a prepared folder: random access to its token stream by positional reads
/// (`pread`). The shard layout is nanoGPT's, so the files can be memory-mapped; reading them
/// instead keeps the resident set flat: with a mapping, every page a read touches (and, with the
/// kernel's fault-around, its neighbours) stays counted in the process's memory, which grew by
/// 300 MB over 200 steps on a 1 GB corpus. Page-cache pages are the kernel's either way.
pub struct ShardStream {
    /// `<dir>/<split>.counts`, written by `prepare`.
    counts_path: PathBuf,
    shards: Vec<(File, File)>,
    /// Stream offset where each shard starts, plus the total at the end.
    starts: Vec<u64>,
    wide: bool,
}

impl ShardStream {
    pub fn open(dir: &Path, split: &str) -> Result<Self> {
        let m = read_manifest(dir)?;
        let info = match split {
            "train" => &m.train,
            _ => &m.eval,
        };
        let width = if m.wide_ids { 4 } else { 2 };
        let mut shards = Vec::with_capacity(info.shards.len());
        let mut starts = vec![0u64];
        for (stem, tokens) in &info.shards {
            let open = |ext: &str, per: u64| -> Result<File> {
                let p = dir.join(format!("{stem}.{ext}"));
                let f = File::open(&p).map_err(io_err(&p))?;
                let len = f.metadata().map_err(io_err(&p))?.len();
                if len != tokens * per {
                    return Err(DataError::Config {
                        key: "data.prepare.dir",
                        msg: format!(
                            "{}: {len} bytes, the manifest says {tokens} tokens of {per} bytes",
                            p.display()
                        ),
                    });
                }
                Ok(f)
            };
            shards.push((open("ids", width)?, open("flags", 1)?));
            starts.push(starts.last().expect("non-empty") + tokens);
        }
        Ok(ShardStream {
            counts_path: dir.join(format!("{split}.counts")),
            shards,
            starts,
            wide: m.wide_ids,
        })
    }

    /// Tokens in the stream.
    pub fn tokens(&self) -> u64 {
        *self.starts.last().expect("non-empty")
    }

    /// Copies tokens `[start, start + ids.len())` of the stream. Panics if the files cannot be
    /// read (they were checked against the manifest when opened).
    pub fn read(&self, start: u64, ids: &mut [u32], flags: &mut [u8]) {
        use std::os::unix::fs::FileExt;
        let width = if self.wide { 4 } else { 2 };
        let mut s = self.starts.partition_point(|&x| x <= start) - 1;
        let (mut at, mut pos) = (0usize, start);
        let mut bytes = vec![0u8; ids.len() * width];
        while at < ids.len() {
            let (fi, ff) = &self.shards[s];
            let local = pos - self.starts[s];
            let n = ((self.starts[s + 1] - pos) as usize).min(ids.len() - at);
            let raw = &mut bytes[..n * width];
            fi.read_exact_at(raw, local * width as u64)
                .expect("reading a token shard");
            ff.read_exact_at(&mut flags[at..at + n], local)
                .expect("reading a flag shard");
            for (out, b) in ids[at..at + n].iter_mut().zip(raw.chunks_exact(width)) {
                *out = if self.wide {
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                } else {
                    u16::from_le_bytes([b[0], b[1]]) as u32
                };
            }
            at += n;
            pos += n as u64;
            s += 1;
        }
    }

    /// Counts of each non-special token id (`vocab_size` of them), as `prepare` counted them.
    /// Read from a small file rather than by a pass over the shards, which would also leave
    /// every page of them resident.
    pub fn token_counts(&self, vocab_size: usize) -> Result<Vec<u64>> {
        let bytes = std::fs::read(&self.counts_path).map_err(io_err(&self.counts_path))?;
        if bytes.len() != 8 * vocab_size {
            return Err(DataError::Config {
                key: "data.prepare.dir",
                msg: format!(
                    "{}: {} counts, the tokenizer has {vocab_size} tokens",
                    self.counts_path.display(),
                    bytes.len() / 8
                ),
            });
        }
        Ok(bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect())
    }
}

/// Fixed-length blocks cut from a shard stream as `PackedBlocks::pack` cuts them in memory:
/// `seq_len - 2` stream tokens framed by `[CLS]` ... `[SEP]`; the remainder is dropped.
pub struct ShardBlocks {
    pub stream: ShardStream,
    seq_len: usize,
    cls: u32,
    sep: u32,
}

impl ShardBlocks {
    pub fn new(stream: ShardStream, seq_len: usize, sp: &SpecialTokens) -> Result<Self> {
        if seq_len < 3 {
            return Err(DataError::Config {
                key: "data.seq_len",
                msg: format!("must be at least 3 ([CLS] x [SEP]), got {seq_len}"),
            });
        }
        Ok(ShardBlocks {
            stream,
            seq_len,
            cls: sp.cls,
            sep: sp.sep,
        })
    }
}

impl Blocks for ShardBlocks {
    fn seq_len(&self) -> usize {
        self.seq_len
    }

    fn len(&self) -> usize {
        (self.stream.tokens() / (self.seq_len as u64 - 2)) as usize
    }

    fn read_block(&self, i: usize, ids: &mut [u32], flags: &mut [u8]) {
        let body = self.seq_len - 2;
        ids[0] = self.cls;
        flags[0] = SPECIAL;
        self.stream
            .read((i * body) as u64, &mut ids[1..=body], &mut flags[1..=body]);
        // A block that starts mid-word starts a new word group for masking purposes.
        if flags[1] & SPECIAL == 0 {
            flags[1] |= WORD_START;
        }
        ids[body + 1] = self.sep;
        flags[body + 1] = SPECIAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer;
    use std::sync::Arc;

    fn tk() -> (Tokenizer, SpecialTokens) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/minilm-tokenizer");
        let t = tokenizer::load(&dir).unwrap();
        let sp = tokenizer::special_tokens(&t).unwrap();
        (t, sp)
    }

    fn docs(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "Document {i} is about item {} in {}, reviewed unfavourably.",
                    i * 7 % 13,
                    ["red", "green", "blue"][i % 3]
                )
            })
            .collect()
    }

    fn cfg(dir: &Path) -> PrepareConfig {
        PrepareConfig {
            dir: dir.to_path_buf(),
            text_field: "body".into(),
            shard_tokens: 50,
            batch_bytes: 300,
        }
    }

    fn read_all(s: &ShardStream) -> (Vec<u32>, Vec<u8>) {
        let n = s.tokens() as usize;
        let (mut ids, mut flags) = (vec![0; n], vec![0; n]);
        s.read(0, &mut ids, &mut flags);
        (ids, flags)
    }

    /// What the streams must hold: each split's documents in source order, joined with `[SEP]`.
    fn expected(texts: &[String], eval: bool, t: &Tokenizer, sp: &SpecialTokens) -> Vec<u32> {
        let mut out = Vec::new();
        for d in texts.iter().filter(|d| is_eval_document(d, 0.25) == eval) {
            if !out.is_empty() {
                out.push(sp.sep);
            }
            out.extend(encode_document(t, sp, d).unwrap().0);
        }
        out
    }

    #[test]
    fn the_streams_are_the_documents_joined_with_sep_and_split_by_hash() {
        let (t, sp) = tk();
        let tmp = tempfile::tempdir().unwrap();
        let texts = docs(40);
        let txt = tmp.path().join("a.txt");
        std::fs::write(&txt, texts[..20].join("\n\n")).unwrap();
        let jsonl = tmp.path().join("b.jsonl");
        let mut rows: Vec<String> = texts[20..]
            .iter()
            .map(|d| serde_json::json!({"body": d, "n": 1}).to_string())
            .collect();
        rows.insert(3, r#"{"body": null}"#.into());
        std::fs::write(&jsonl, rows.join("\n")).unwrap();
        let dir = tmp.path().join("prepared");
        let sources = vec![txt, jsonl.clone()];
        let r = prepare(&sources, &t, &sp, &cfg(&dir), 0.25, &|_, _| {}).unwrap();
        assert!(!r.reused);
        let m = &r.manifest;
        assert_eq!(m.train.documents + m.eval.documents, 40);
        assert!(m.eval.documents > 0 && m.train.shards.len() > 2, "{m:?}");
        assert!(!m.wide_ids);
        for (split, eval) in [("train", false), ("eval", true)] {
            let s = ShardStream::open(&dir, split).unwrap();
            let (ids, flags) = read_all(&s);
            assert_eq!(ids, expected(&texts, eval, &t, &sp), "{split}");
            // [SEP] between documents is special; nothing else in these texts is.
            for (&id, &f) in ids.iter().zip(&flags) {
                assert_eq!(id == sp.sep, f & SPECIAL != 0);
            }
        }
        // The counts file holds the non-special token counts of the stream.
        for split in ["train", "eval"] {
            let s = ShardStream::open(&dir, split).unwrap();
            let (ids, flags) = read_all(&s);
            let mut want = vec![0u64; t.get_vocab_size(true)];
            for (&id, &f) in ids.iter().zip(&flags) {
                if f & SPECIAL == 0 {
                    want[id as usize] += 1;
                }
            }
            assert_eq!(s.token_counts(want.len()).unwrap(), want);
        }
        // The index holds each document's start.
        let idx = std::fs::read(dir.join("train.idx")).unwrap();
        assert_eq!(idx.len() as u64, 8 * m.train.documents);

        // Unchanged: reused. A changed source: rebuilt.
        let again = prepare(&sources, &t, &sp, &cfg(&dir), 0.25, &|_, _| {}).unwrap();
        assert!(again.reused);
        std::fs::write(&jsonl, rows[..5].join("\n")).unwrap();
        let changed = prepare(&sources, &t, &sp, &cfg(&dir), 0.25, &|_, _| {}).unwrap();
        assert!(!changed.reused);
        assert_eq!(
            changed.manifest.train.documents + changed.manifest.eval.documents,
            24
        );
        // So is a change of the held-out fraction.
        let other = prepare(&sources, &t, &sp, &cfg(&dir), 0.5, &|_, _| {}).unwrap();
        assert!(!other.reused);
    }

    /// Blocks cut from shards (across shard files) are the blocks `PackedBlocks::pack` would cut
    /// from the same stream: `[CLS]` + seq_len - 2 stream tokens + `[SEP]`.
    #[test]
    fn blocks_from_shards_frame_consecutive_pieces_of_the_stream() {
        let (t, sp) = tk();
        let tmp = tempfile::tempdir().unwrap();
        let txt = tmp.path().join("a.txt");
        std::fs::write(&txt, docs(30).join("\n\n")).unwrap();
        let dir = tmp.path().join("prepared");
        prepare(&[txt], &t, &sp, &cfg(&dir), 0.0, &|_, _| {}).unwrap();
        let stream = ShardStream::open(&dir, "train").unwrap();
        let (all, all_flags) = read_all(&stream);
        let blocks = ShardBlocks::new(stream, 16, &sp).unwrap();
        assert_eq!(blocks.len(), all.len() / 14);
        let (mut ids, mut flags) = (vec![0; 16], vec![0; 16]);
        for i in 0..blocks.len() {
            blocks.read_block(i, &mut ids, &mut flags);
            assert_eq!(ids[0], sp.cls);
            assert_eq!(ids[15], sp.sep);
            assert_eq!(&ids[1..15], &all[i * 14..(i + 1) * 14], "block {i}");
            assert_eq!(flags[2..15], all_flags[i * 14 + 1..(i + 1) * 14]);
        }
        // Shared through the loader's trait object.
        let _: Arc<dyn Blocks> = Arc::new(blocks);
    }

    #[test]
    fn parquet_sources_give_their_text_column() {
        use parquet::basic::Compression;
        use parquet::data_type::{ByteArray, ByteArrayType, Int32Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;

        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("shard-0000.parquet");
        let schema = Arc::new(
            parse_message_type("message m { REQUIRED INT32 id; OPTIONAL BYTE_ARRAY body (UTF8); }")
                .unwrap(),
        );
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut w =
            SerializedFileWriter::new(File::create(&path).unwrap(), schema, Arc::new(props))
                .unwrap();
        let texts = docs(5);
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int32Type>()
            .write_batch(&[0, 1, 2, 3, 4, 5], None, None)
            .unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        // Row 2 is null.
        let values: Vec<ByteArray> = texts.iter().map(|t| ByteArray::from(t.as_str())).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&[1, 1, 0, 1, 1, 1]), None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
        w.close().unwrap();

        let mut got = Vec::new();
        for_each_document(&path, "body", &mut |d| {
            got.push(d);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, texts);
        let err = for_each_document(&path, "text", &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no column `text`") && err.contains("id, body"),
            "{err}"
        );
    }

    #[test]
    fn a_jsonl_row_without_the_field_is_named_by_its_line() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("rows.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(b"{\"body\": \"one\"}\n{\"text\": \"two\"}\n")
            .unwrap();
        gz.finish().unwrap();
        let err = for_each_document(&path, "body", &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rows.jsonl.gz:2") && err.contains("no field `body`"),
            "{err}"
        );
    }
}
