//! `kindling pull` and `hf://` model paths: a repo into the standard hf-hub cache
//! (`models--ns--name/blobs/<hash>`, `snapshots/<commit>/<file>` links, `refs/<revision>`), the
//! layout Python's huggingface_hub, candle and the hf-hub crate read.
//!
//! ```text
//! GET  /api/models/{id}/revision/{rev}?blobs=true    the commit and the listing (names, sizes)
//!        every name, the commit id and the sizes checked (untrusted.rs); no name listed twice,
//!        no file that is also another file's folder
//! HEAD /{id}/resolve/{commit}/{file}, per file      ETag (the content hash), size, X-Repo-Commit,
//!        checked against the listing; redirects followed only to the endpoint's own origin (a
//!        redirect to a CDN answers with X-Linked-Etag and X-Linked-Size, as on the Hub)
//! GET  the same, per blob the cache lacks           into a temporary file in blobs/, at most the
//!        declared size, resumed with Range after a dropped connection, its hash checked against
//!        the ETag, then renamed to blobs/<hash>
//! then snapshots/<commit>/<file> -> ../../blobs/<hash> for every file, and refs/<revision>
//! ```
//!
//! Why our own download path and not the hf-hub crate's: hf-hub 0.4 joins the ETag, the commit
//! id and the listed file names to cache paths as the server sends them, and its client sends
//! the token on along a redirect; neither can be checked from outside it without asking the
//! server twice (and a lying server can answer the second time differently). Nothing is
//! written until every name and hash has been checked; the snapshot links and the ref come
//! after every blob is in place, so a failed pull never leaves a snapshot that lacks files.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use sha1::Digest as _;

use crate::cache::{self, RepoFolder};
use crate::http::{encode_segment, Http, Redirects};
use crate::{auth, check_repo_id, untrusted, HubError, Token};

/// huggingface_hub's default for `HF_HUB_DOWNLOAD_TIMEOUT`: seconds without a byte.
const DEFAULT_TIMEOUT_S: f64 = 10.0;

/// Where and how to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub endpoint: String,
    pub token: Option<Token>,
    pub cache_dir: PathBuf,
    pub revision: String,
    pub progress: bool,
    /// A server that accepts no connection or sends no byte for this long fails the request
    /// (which is then retried, resuming a download where it stopped).
    pub timeout: Duration,
    /// Retries of a failed request or a download cut short.
    pub retries: u32,
}

impl PullOptions {
    /// Endpoint, token and cache from the environment (as the official client reads them);
    /// the timeout from `HF_HUB_DOWNLOAD_TIMEOUT` (seconds, default 10).
    pub fn from_env(revision: &str) -> Result<Self, HubError> {
        let timeout = match std::env::var("HF_HUB_DOWNLOAD_TIMEOUT") {
            Ok(v) if !v.trim().is_empty() => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e6)
                .ok_or(HubError::Env {
                    name: "HF_HUB_DOWNLOAD_TIMEOUT",
                    value: v.clone(),
                    expected: "a positive number of seconds",
                })?,
            _ => DEFAULT_TIMEOUT_S,
        };
        Ok(PullOptions {
            endpoint: auth::endpoint(),
            token: auth::token()?,
            cache_dir: auth::cache_dir(),
            revision: revision.to_string(),
            progress: true,
            timeout: Duration::from_secs_f64(timeout),
            retries: 3,
        })
    }
}

/// The snapshot folder of `id` at `opts.revision` in the cache, if the cache has one with its
/// config.json. No network. A ref that does not hold a commit id is ignored.
pub fn cached_snapshot(id: &str, opts: &PullOptions) -> Option<PathBuf> {
    check_repo_id(id).ok()?;
    let rev = untrusted::revision("revision", &opts.revision).ok()?;
    let folder = opts.cache_dir.join(cache::folder_name(id));
    let commit = if untrusted::commit_id("", rev).is_ok() {
        rev.to_string()
    } else {
        let text = std::fs::read_to_string(folder.join("refs").join(rev)).ok()?;
        untrusted::commit_id("", text.trim()).ok()?.to_string()
    };
    let snapshot = folder.join("snapshots").join(&commit);
    // hf-hub resolves the ref the same way; asking it keeps us on its notion of the layout.
    Cache::new(opts.cache_dir.clone())
        .repo(Repo::with_revision(
            id.to_string(),
            RepoType::Model,
            rev.to_string(),
        ))
        .get("config.json")
        .filter(|p| p.starts_with(&snapshot))
        .or_else(|| {
            snapshot
                .join("config.json")
                .exists()
                .then(|| snapshot.clone())
        })
        .map(|_| snapshot)
}

/// One file as the listing names it.
struct Listed {
    path: String,
    size: Option<u64>,
    lfs_sha256: Option<String>,
}

/// One file as its metadata describes it: checked, ready to fetch.
struct Remote {
    path: String,
    url: String,
    /// The blob's name: git blob id (40 hex) or SHA-256 (64).
    hash: String,
    size: u64,
}

/// Downloads every file of `id` at `opts.revision` into the cache; returns the snapshot folder.
pub fn pull(id: &str, opts: &PullOptions) -> Result<PathBuf, HubError> {
    pull_checked(id, opts).map_err(|e| e.redacted(opts.token.as_ref()))
}

fn pull_checked(id: &str, opts: &PullOptions) -> Result<PathBuf, HubError> {
    check_repo_id(id)?;
    let revision = untrusted::revision("revision", &opts.revision)?;
    let http = Http::new(
        &opts.endpoint,
        opts.token.clone(),
        opts.retries,
        Duration::from_millis(200),
    )
    .with_timeout(opts.timeout);
    let (commit, listed) = listing(&http, id, revision)?;
    let remote = listed
        .iter()
        .map(|f| metadata(&http, id, &commit, f))
        .collect::<Result<Vec<_>, _>>()?;
    // Every value the server sent is checked: from here on, writes.
    let repo = RepoFolder::open(&opts.cache_dir, id)?;
    for f in &remote {
        download(&http, &repo, f, opts)?;
    }
    for f in &remote {
        repo.link(&commit, &f.path, &f.hash)?;
    }
    if revision != commit {
        repo.write_ref(revision, &commit)?;
    }
    Ok(repo.path().join("snapshots").join(&commit))
}

/// The commit `revision` names and the files it holds (less `.gitattributes`), all checked.
fn listing(http: &Http, id: &str, revision: &str) -> Result<(String, Vec<Listed>), HubError> {
    let what = format!("{id}@{revision}: repo info");
    let url = format!(
        "/api/models/{id}/revision/{}?blobs=true",
        encode_segment(revision)
    );
    let info = http.json(&what, "GET", &url, &[], crate::http::Body::None)?;
    let sha = info["sha"]
        .as_str()
        .ok_or_else(|| http.protocol(&what, "no commit id (`sha`) in the answer"))?;
    let commit = untrusted::commit_id("commit id (`sha`) of the repo info", sha)?.to_string();
    let siblings = info["siblings"]
        .as_array()
        .ok_or_else(|| http.protocol(&what, "no file list (`siblings`) in the answer"))?;
    let field = "file name (`rfilename`) in the repo info";
    let mut files = Vec::new();
    let mut seen = BTreeSet::new();
    for s in siblings {
        let name = s["rfilename"]
            .as_str()
            .ok_or_else(|| http.protocol(&what, &format!("a file without `rfilename`: {s}")))?;
        let path = untrusted::repo_path(field, name)?;
        if !seen.insert(path.to_string()) {
            return Err(HubError::Untrusted {
                field: field.into(),
                value: path.into(),
                expected: "each file listed once".into(),
            });
        }
        if path == ".gitattributes" {
            continue;
        }
        let lfs_sha256 = match s["lfs"]["sha256"].as_str() {
            Some(h) => Some(untrusted::etag(
                &format!("LFS sha256 of {path} in the repo info"),
                h,
            )?),
            None => None,
        };
        files.push(Listed {
            path: path.to_string(),
            size: s["size"].as_u64(),
            lfs_sha256: lfs_sha256.map(String::from),
        });
    }
    // `a` and `a/b` cannot both be files.
    for f in &files {
        for (i, _) in f.path.match_indices('/') {
            if seen.contains(&f.path[..i]) {
                return Err(HubError::Untrusted {
                    field: field.into(),
                    value: f.path[..i].into(),
                    expected: format!(
                        "a name that is not both a file and the folder of {}",
                        f.path
                    ),
                });
            }
        }
    }
    if files.is_empty() {
        return Err(HubError::Download(format!("{id}: the repo has no files")));
    }
    Ok((commit, files))
}

/// The URL of `path` at `commit`, each segment percent-encoded.
fn resolve_url(http: &Http, id: &str, commit: &str, path: &str) -> String {
    let segments: Vec<String> = path.split('/').map(encode_segment).collect();
    http.url(&format!("/{id}/resolve/{commit}/{}", segments.join("/")))
}

/// A file's hash and size from a HEAD request, checked against the listing.
fn metadata(http: &Http, id: &str, commit: &str, f: &Listed) -> Result<Remote, HubError> {
    let url = resolve_url(http, id, commit, &f.path);
    let what = format!("{id}/{}: metadata", f.path);
    let r = http.send_with(
        &what,
        "HEAD",
        &url,
        &[("Accept-Encoding", "identity")],
        crate::http::Body::None,
        true,
        Redirects::SameOrigin,
    )?;
    if let Some(c) = r.header("X-Repo-Commit") {
        let field = format!("X-Repo-Commit of {}", f.path);
        if untrusted::commit_id(&field, c)? != commit {
            return Err(HubError::Untrusted {
                field,
                value: c.into(),
                expected: format!("the listing's commit {commit}"),
            });
        }
    }
    let (etag_field, etag) = match r.header("X-Linked-Etag") {
        Some(v) => ("X-Linked-Etag", v),
        None => ("ETag", r.header("ETag").unwrap_or_default()),
    };
    let hash = untrusted::etag(&format!("{etag_field} of {}", f.path), etag)?.to_string();
    let (size_field, size) = match (r.header("X-Linked-Size"), r.status()) {
        (Some(v), _) => ("X-Linked-Size", v),
        (None, 200..=299) => (
            "Content-Length",
            r.header("Content-Length").unwrap_or_default(),
        ),
        (None, status) => {
            return Err(HubError::Untrusted {
                field: format!("size of {}", f.path),
                value: format!("(none, in a {status} answer)"),
                expected: "X-Linked-Size or Content-Length".into(),
            })
        }
    };
    let size_field = format!("{size_field} of {}", f.path);
    let size = untrusted::size(&size_field, size)?;
    if let Some(listed) = f.size.filter(|&s| s != size) {
        return Err(HubError::Untrusted {
            field: size_field,
            value: size.to_string(),
            expected: format!("the listing's {listed} bytes"),
        });
    }
    if let Some(listed) = f.lfs_sha256.as_deref().filter(|&h| h != hash) {
        return Err(HubError::Untrusted {
            field: format!("{etag_field} of {}", f.path),
            value: hash,
            expected: format!("the listing's LFS sha256 {listed}"),
        });
    }
    Ok(Remote {
        path: f.path.clone(),
        url,
        hash,
        size,
    })
}

/// `blobs/<hash>` for `f`: already there, or downloaded, checked and renamed into place.
fn download(
    http: &Http,
    repo: &RepoFolder,
    f: &Remote,
    opts: &PullOptions,
) -> Result<PathBuf, HubError> {
    if let Some(path) = repo.existing_blob(&f.hash, f.size) {
        return Ok(path);
    }
    let what = format!("{}: download", f.path);
    let mut temp = repo.blob_temp()?;
    let io = |source| HubError::Io {
        path: temp_path(&f.path),
        source,
    };
    let pb = bar(f.size, &f.path, opts.progress);
    let mut have = 0u64;
    let mut attempt = 0;
    while have < f.size || attempt == 0 {
        let range = format!("bytes={have}-");
        let mut headers = vec![("Accept-Encoding", "identity")];
        if have > 0 {
            headers.push(("Range", range.as_str()));
        }
        let r = http
            .send(
                &what,
                "GET",
                &f.url,
                &headers,
                crate::http::Body::None,
                true,
            )
            .map_err(|e| match e {
                HubError::Transport { msg, attempts, .. } => {
                    stopped(f, have, &msg, attempts, opts.timeout)
                }
                other => other,
            })?;
        let resumed = r.status() == 206
            && r.header("Content-Range")
                .is_some_and(|c| c.starts_with(&format!("bytes {have}-")));
        if !resumed && have > 0 {
            // The server ignored the range: start over.
            have = 0;
            temp.as_file_mut().set_len(0).map_err(io)?;
            temp.as_file_mut().seek(SeekFrom::Start(0)).map_err(io)?;
            pb.set_position(0);
        }
        if let Some(len) = r
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            if have + len > f.size {
                return Err(too_long(f));
            }
        }
        // One byte more than is left: enough to tell a body that goes on.
        let mut body = r.into_reader().take(f.size - have + 1);
        let mut buf = vec![0u8; 1 << 16];
        let cut = loop {
            match body.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => {
                    if have + n as u64 > f.size {
                        return Err(too_long(f));
                    }
                    temp.write_all(&buf[..n]).map_err(io)?;
                    have += n as u64;
                    pb.set_position(have);
                }
                Err(e) => break Some(e),
            }
        };
        if have == f.size {
            break;
        }
        attempt += 1;
        if attempt > opts.retries {
            let why = match cut {
                Some(e) => http.redact(&e.to_string()),
                None => "the connection closed".into(),
            };
            return Err(stopped(f, have, &why, opts.retries + 1, opts.timeout));
        }
    }
    pb.finish_and_clear();
    temp.as_file_mut().flush().map_err(io)?;
    let got = content_hash(temp.path(), f.hash.len(), f.size).map_err(io)?;
    if got != f.hash {
        return Err(HubError::Download(format!(
            "{}: the content's hash is {got} but its ETag says {}: the download is corrupt or \
             the server is not telling the truth; nothing was kept",
            f.path, f.hash
        )));
    }
    repo.persist_blob(temp, &f.hash)
}

fn stopped(f: &Remote, have: u64, why: &str, attempts: u32, timeout: Duration) -> HubError {
    HubError::Download(format!(
        "{}: the server stopped sending after {have} of {} bytes ({why}; {attempts} attempts; \
         {:.0} s without a byte ends one: HF_HUB_DOWNLOAD_TIMEOUT sets it)",
        f.path,
        f.size,
        timeout.as_secs_f64()
    ))
}

fn too_long(f: &Remote) -> HubError {
    HubError::Download(format!(
        "{}: the server sends more than the {} bytes it declared; nothing was kept",
        f.path, f.size
    ))
}

fn temp_path(file: &str) -> PathBuf {
    PathBuf::from(format!("(download of {file})"))
}

/// What the ETag of a file of `size` bytes names: its git blob id (40 hex digits) or its
/// SHA-256 (64).
fn content_hash(path: &Path, hex_len: usize, size: u64) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sha1 = sha1::Sha1::new();
    let mut sha256 = sha2::Sha256::new();
    sha1.update(format!("blob {size}\0").as_bytes());
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if hex_len == 40 {
            sha1.update(&buf[..n]);
        } else {
            sha256.update(&buf[..n]);
        }
    }
    let digest: Vec<u8> = if hex_len == 40 {
        sha1.finalize().to_vec()
    } else {
        sha256.finalize().to_vec()
    };
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}

fn bar(len: u64, name: &str, shown: bool) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:30} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid template"),
    );
    pb.set_message(name.to_string());
    pb
}

/// A model path as recipes and commands accept it: a folder, or `hf://ns/name[@revision]`,
/// which is pulled into the cache (or, offline or unreachable, taken from the cache).
pub fn resolve_model_path(path: &Path) -> Result<PathBuf, HubError> {
    let text = path.to_string_lossy();
    let Some(rest) = text.strip_prefix("hf://") else {
        return Ok(path.to_path_buf());
    };
    let (id, revision) = rest.split_once('@').unwrap_or((rest, "main"));
    check_repo_id(id)?;
    untrusted::revision("revision", revision)?;
    let opts = PullOptions::from_env(revision)?;
    if auth::offline() {
        return cached_snapshot(id, &opts).ok_or_else(|| {
            HubError::Download(format!(
                "{id}@{revision} is not in the cache {} and HF_HUB_OFFLINE is set",
                opts.cache_dir.display()
            ))
        });
    }
    match pull(id, &opts) {
        Ok(dir) => Ok(dir),
        // A server that lies is not "unreachable": its answer is the error.
        Err(e @ (HubError::Untrusted { .. } | HubError::Cache { .. })) => Err(e),
        Err(e) => match cached_snapshot(id, &opts) {
            Some(dir) => {
                eprintln!("warning: {e}; using the cached snapshot {}", dir.display());
                Ok(dir)
            }
            None => Err(e),
        },
    }
}
