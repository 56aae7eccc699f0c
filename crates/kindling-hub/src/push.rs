//! `kindling push`: an export folder to a Hub model repo, on the Git LFS path.
//!
//! ```text
//! check the export -> hash every file (sha256, git sha1)
//!   -> POST /api/repos/create (409 = exists: fine)        -> POST /api/validate-yaml (README.md)
//!   -> POST /api/models/{repo}/preupload/{rev}            which files are LFS; unchanged oids skip
//!   -> POST /{repo}.git/info/lfs/objects/batch            objects the Hub lacks get upload actions
//!   -> PUT (basic) or PUT parts + POST completion (multipart), then POST verify
//!   -> POST /api/models/{repo}/commit/{rev}               NDJSON: header, file (base64), lfsFile
//! ```
//!
//! A failed push can simply be rerun: objects already stored get no upload action, and files
//! whose oid the Hub already has at that revision are not committed again.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::files::{self, LocalFile};
use crate::http::{encode_segment, Body, Http};
use crate::{check_repo_id, HubError, Token};

/// Options of `kindling push`.
#[derive(Debug, Clone)]
pub struct PushOptions {
    pub repo: String,
    pub private: bool,
    pub revision: String,
    pub message: String,
    pub endpoint: String,
    pub token: Token,
    pub retries: u32,
    pub backoff: Duration,
}

/// What a push did.
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    /// The new commit, or None when the Hub already had every file.
    pub commit: Option<String>,
    pub commit_url: Option<String>,
    /// Files in the commit.
    pub committed: Vec<String>,
    /// Files the Hub already had (same oid at that revision).
    pub unchanged: Vec<String>,
    /// LFS objects sent, and their bytes.
    pub uploaded: Vec<String>,
    pub bytes_sent: u64,
}

fn export_err(path: &Path, msg: impl Into<String>) -> HubError {
    HubError::Export {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The header of a safetensors file: tensor name -> shape.
fn safetensors_shapes(path: &Path) -> Result<BTreeMap<String, Vec<u64>>, HubError> {
    let io = |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| export_err(path, "too short to be a safetensors file"))?;
    let n = u64::from_le_bytes(len);
    let file_len = f.metadata().map_err(io)?.len();
    if n > 100 << 20 || n + 8 > file_len {
        return Err(export_err(
            path,
            "not a safetensors file (bad header length)",
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| export_err(path, format!("not a safetensors header: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| export_err(path, "not a safetensors header"))?;
    Ok(obj
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .map(|(k, t)| {
            let shape = t["shape"]
                .as_array()
                .map(|s| s.iter().filter_map(|d| d.as_u64()).collect())
                .unwrap_or_default();
            (k.clone(), shape)
        })
        .collect())
}

/// Checks that `dir` is a complete, consistent export before anything is sent: config.json,
/// model.safetensors whose shapes match the config, a tokenizer (text) or an image processor's
/// config (vision), and a model card whose YAML front matter parses and names a licence.
pub fn check_export(dir: &Path) -> Result<(), HubError> {
    if !dir.is_dir() {
        return Err(export_err(dir, "not a folder"));
    }
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|_| export_err(&config_path, "missing (an export needs config.json)"))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| export_err(&config_path, format!("not JSON: {e}")))?;
    for key in ["model_type", "architectures"] {
        if config.get(key).is_none() {
            return Err(export_err(
                &config_path,
                format!("no `{key}` (transformers needs it to pick the model class)"),
            ));
        }
    }
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(export_err(
            &weights,
            "missing (an export needs model.safetensors)",
        ));
    }
    let shapes = safetensors_shapes(&weights)?;
    let get = |k: &str| config.get(k).and_then(|v| v.as_u64());
    if let (Some(vocab), Some(hidden)) = (get("vocab_size"), get("hidden_size")) {
        let word = shapes
            .iter()
            .find(|(k, _)| k.ends_with("embeddings.word_embeddings.weight"))
            .map(|(_, s)| s.clone());
        match word {
            Some(s) if s == [vocab, hidden] => {}
            Some(s) => {
                return Err(export_err(
                    &weights,
                    format!(
                        "word embeddings have shape {s:?} but config.json says vocab_size \
                         {vocab} x hidden_size {hidden}"
                    ),
                ))
            }
            None => return Err(export_err(&weights, "no word embeddings tensor")),
        }
    }
    if let Some(layers) = get("num_hidden_layers") {
        let found: std::collections::BTreeSet<&str> = shapes
            .keys()
            .filter_map(|k| k.split("encoder.layer.").nth(1)?.split('.').next())
            .collect();
        if found.len() as u64 != layers {
            return Err(export_err(
                &weights,
                format!(
                    "holds {} encoder layers but config.json says num_hidden_layers {layers}",
                    found.len()
                ),
            ));
        }
    }
    let preprocessing = ["tokenizer.json", "vocab.txt", "preprocessor_config.json"];
    if !preprocessing.iter().any(|f| dir.join(f).is_file()) {
        return Err(export_err(
            dir,
            "no tokenizer (tokenizer.json or vocab.txt) or image processor \
             (preprocessor_config.json)",
        ));
    }
    let card_path = dir.join("README.md");
    let card = std::fs::read_to_string(&card_path)
        .map_err(|_| export_err(&card_path, "missing (the model card)"))?;
    check_card(&card).map_err(|m| export_err(&card_path, m))
}

/// The card's front matter: `---` lines around a YAML mapping with a `license`.
pub fn check_card(card: &str) -> Result<(), String> {
    let rest = card
        .strip_prefix("---\n")
        .ok_or("does not start with a `---` front matter line")?;
    let end = rest
        .find("\n---")
        .ok_or("the front matter has no closing `---` line")?;
    let docs = yaml_rust2::YamlLoader::load_from_str(&rest[..end])
        .map_err(|e| format!("front matter is not valid YAML: {e}"))?;
    let doc = docs.first().ok_or("the front matter is empty")?;
    let map = doc.as_hash().ok_or("the front matter is not a mapping")?;
    let license = map
        .get(&yaml_rust2::Yaml::String("license".into()))
        .ok_or("the front matter has no `license`")?;
    if license.as_str().is_none_or(str::is_empty) {
        return Err("`license` must be a non-empty string".into());
    }
    Ok(())
}

fn bar(len: u64, name: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:30} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid template"),
    );
    pb.set_message(name.to_string());
    pb
}

/// Pushes the export `dir` to `opts.repo`. Text the server sends (error messages, the commit
/// URL) comes back with the token redacted.
pub fn push(dir: &Path, opts: &PushOptions) -> Result<PushReport, HubError> {
    let token = Some(&opts.token);
    let mut report = push_checked(dir, opts).map_err(|e| e.redacted(token))?;
    report.commit = report.commit.map(|c| crate::auth::redact(&c, token));
    report.commit_url = report.commit_url.map(|c| crate::auth::redact(&c, token));
    Ok(report)
}

fn push_checked(dir: &Path, opts: &PushOptions) -> Result<PushReport, HubError> {
    check_repo_id(&opts.repo)?;
    check_export(dir)?;
    let local = files::list(dir)?;
    let http = Http::new(
        &opts.endpoint,
        Some(opts.token.clone()),
        opts.retries,
        opts.backoff,
    );
    let (ns, name) = opts.repo.split_once('/').expect("checked");

    // 1. The repo (and the branch), if needed.
    match http.json(
        "create repo",
        "POST",
        "/api/repos/create",
        &[],
        Body::Json(
            &json!({"name": name, "organization": ns, "type": "model", "private": opts.private}),
        ),
    ) {
        Ok(_) | Err(HubError::Status { status: 409, .. }) => {}
        Err(e) => return Err(e),
    }
    if opts.revision != "main" {
        match http.json(
            "create branch",
            "POST",
            &format!(
                "/api/models/{}/branch/{}",
                opts.repo,
                encode_segment(&opts.revision)
            ),
            &[],
            Body::Json(&json!({})),
        ) {
            Ok(_) | Err(HubError::Status { status: 409, .. }) => {}
            Err(e) => return Err(e),
        }
    }
    // 2. The card, as the Hub will validate it on commit.
    if let Some(card) = local.iter().find(|f| f.path == "README.md") {
        let content = std::fs::read_to_string(&card.local).map_err(|source| HubError::Io {
            path: card.local.clone(),
            source,
        })?;
        http.json(
            "validate README.md",
            "POST",
            "/api/validate-yaml",
            &[],
            Body::Json(&json!({"content": content, "repoType": "model"})),
        )?;
    }
    // 3. Preupload: LFS or regular, and what the Hub already has.
    let mut modes: BTreeMap<String, (bool, Option<String>)> = BTreeMap::new();
    let b64 = base64::engine::general_purpose::STANDARD;
    for chunk in local.chunks(256) {
        let files: Vec<serde_json::Value> = chunk
            .iter()
            .map(|f| json!({"path": f.path, "sample": b64.encode(&f.sample), "size": f.size}))
            .collect();
        let ans = http.json(
            "preupload",
            "POST",
            &format!(
                "/api/models/{}/preupload/{}",
                opts.repo,
                encode_segment(&opts.revision)
            ),
            &[],
            Body::Json(&json!({ "files": files })),
        )?;
        for f in ans["files"].as_array().into_iter().flatten() {
            let path = f["path"].as_str().unwrap_or_default().to_string();
            let lfs = match f["uploadMode"].as_str() {
                Some("lfs") => true,
                Some("regular") => false,
                other => {
                    return Err(
                        http.protocol("preupload", &format!("uploadMode {other:?} for {path}"))
                    )
                }
            };
            modes.insert(path, (lfs, f["oid"].as_str().map(String::from)));
        }
    }
    let mut report = PushReport::default();
    let mut changed: Vec<(&LocalFile, bool)> = Vec::new();
    for f in &local {
        // Empty files always go as regular files (the official client does the same).
        let (lfs, remote) = modes.get(&f.path).cloned().unwrap_or((false, None));
        let lfs = lfs && f.size > 0;
        let oid = if lfs { &f.sha256 } else { &f.git_sha1 };
        if remote.as_deref() == Some(oid.as_str()) {
            report.unchanged.push(f.path.clone());
        } else {
            changed.push((f, lfs));
        }
    }
    if changed.is_empty() {
        return Ok(report);
    }
    // 4. LFS objects the Hub lacks.
    let lfs_files: Vec<&LocalFile> = changed
        .iter()
        .filter(|(_, l)| *l)
        .map(|(f, _)| *f)
        .collect();
    for chunk in lfs_files.chunks(256) {
        let objects: Vec<serde_json::Value> = chunk
            .iter()
            .map(|f| json!({"oid": f.sha256, "size": f.size}))
            .collect();
        let body = serde_json::to_vec(&json!({
            "operation": "upload", "transfers": ["basic", "multipart"], "objects": objects,
            "hash_algo": "sha256", "ref": {"name": opts.revision},
        }))
        .expect("JSON serialises");
        let r = http.send(
            "LFS batch",
            "POST",
            &format!("/{}.git/info/lfs/objects/batch", opts.repo),
            &[("Accept", "application/vnd.git-lfs+json")],
            Body::Bytes(&body, "application/vnd.git-lfs+json"),
            true,
        )?;
        let ans = http.read_json("LFS batch", r)?;
        for obj in ans["objects"].as_array().into_iter().flatten() {
            let oid = obj["oid"].as_str().unwrap_or_default();
            let f = chunk.iter().find(|f| f.sha256 == oid).ok_or_else(|| {
                http.protocol(
                    "LFS batch",
                    &format!("answer names an object we did not offer: {oid}"),
                )
            })?;
            if let Some(err) = obj.get("error") {
                return Err(http.protocol(&format!("LFS batch ({})", f.path), &err.to_string()));
            }
            let Some(actions) = obj.get("actions") else {
                continue; // already stored
            };
            upload_object(&http, f, &actions["upload"])?;
            if let Some(verify) = actions.get("verify") {
                let headers: Vec<(String, String)> = verify["header"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                http.send(
                    &format!("LFS verify ({})", f.path),
                    "POST",
                    verify["href"].as_str().unwrap_or_default(),
                    &headers,
                    Body::Json(&json!({"oid": f.sha256, "size": f.size})),
                    true,
                )?;
            }
            report.uploaded.push(f.path.clone());
            report.bytes_sent += f.size;
        }
    }
    // 5. One commit with every changed file.
    let mut ndjson = serde_json::to_string(&json!({"key": "header", "value": {
        "summary": opts.message, "description": ""}}))
    .expect("JSON serialises");
    for (f, lfs) in &changed {
        let line = if *lfs {
            json!({"key": "lfsFile", "value": {"path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.size}})
        } else {
            let bytes = std::fs::read(&f.local).map_err(|source| HubError::Io {
                path: f.local.clone(),
                source,
            })?;
            json!({"key": "file", "value": {"content": b64.encode(&bytes), "path": f.path, "encoding": "base64"}})
        };
        ndjson.push('\n');
        ndjson.push_str(&line.to_string());
        report.committed.push(f.path.clone());
    }
    ndjson.push('\n');
    let r = http.send(
        "commit",
        "POST",
        &format!(
            "/api/models/{}/commit/{}",
            opts.repo,
            encode_segment(&opts.revision)
        ),
        &[],
        Body::Bytes(ndjson.as_bytes(), "application/x-ndjson"),
        true,
    )?;
    let ans = http.read_json("commit", r)?;
    report.commit = ans["commitOid"].as_str().map(String::from);
    report.commit_url = ans["commitUrl"].as_str().map(String::from);
    if report.commit.is_none() {
        return Err(http.protocol("commit", &format!("no commitOid in {ans}")));
    }
    Ok(report)
}

/// Sends one LFS object: a single PUT (basic), or, when the action's header has a `chunk_size`,
/// one PUT per numbered part and a completion POST with the parts' ETags (multipart). Presigned
/// URLs carry their own authorisation: no token goes with them.
fn upload_object(http: &Http, f: &LocalFile, upload: &serde_json::Value) -> Result<(), HubError> {
    let href = upload["href"].as_str().ok_or_else(|| {
        http.protocol(
            &format!("LFS batch ({})", f.path),
            "upload action without href",
        )
    })?;
    let header = upload["header"].as_object().cloned().unwrap_or_default();
    let pb = bar(f.size, &f.path);
    let io = |source| HubError::Io {
        path: f.local.clone(),
        source,
    };
    let chunk_size = header.get("chunk_size").and_then(|v| {
        v.as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .or(v.as_u64())
    });
    let Some(chunk_size) = chunk_size else {
        let bytes = std::fs::read(&f.local).map_err(io)?;
        http.send(
            &format!("LFS upload ({})", f.path),
            "PUT",
            href,
            &[],
            Body::Bytes(&bytes, "application/octet-stream"),
            false,
        )?;
        pb.finish_and_clear();
        return Ok(());
    };
    let mut parts: Vec<(u32, String)> = header
        .iter()
        .filter_map(|(k, v)| Some((k.parse::<u32>().ok()?, v.as_str()?.to_string())))
        .collect();
    parts.sort();
    let expected = f.size.div_ceil(chunk_size.max(1));
    if parts.len() as u64 != expected {
        return Err(http.protocol(
            &format!("LFS multipart ({})", f.path),
            &format!(
                "{} part URLs for {} bytes in parts of {chunk_size}",
                parts.len(),
                f.size
            ),
        ));
    }
    let mut file = std::fs::File::open(&f.local).map_err(io)?;
    let mut etags = Vec::with_capacity(parts.len());
    for (i, (number, url)) in parts.iter().enumerate() {
        let start = i as u64 * chunk_size;
        let len = chunk_size.min(f.size - start);
        let mut buf = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        file.read_exact(&mut buf).map_err(io)?;
        let r = http.send(
            &format!("LFS part {number} ({})", f.path),
            "PUT",
            url,
            &[],
            Body::Bytes(&buf, "application/octet-stream"),
            false,
        )?;
        let etag = r.header("ETag").ok_or_else(|| {
            http.protocol(
                &format!("LFS part {number} ({})", f.path),
                "no ETag in the answer",
            )
        })?;
        etags.push(json!({"partNumber": number, "etag": etag}));
        pb.inc(len);
    }
    let body = serde_json::to_vec(&json!({"oid": f.sha256, "parts": etags})).expect("JSON");
    http.send(
        &format!("LFS multipart completion ({})", f.path),
        "POST",
        href,
        &[("Accept", "application/vnd.git-lfs+json")],
        Body::Bytes(&body, "application/vnd.git-lfs+json"),
        false,
    )?;
    pb.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_front_matter_must_parse_and_name_a_licence() {
        assert!(check_card("---\nlicense: apache-2.0\ntags:\n  - bert\n---\n# x\n").is_ok());
        assert!(check_card("# no front matter").unwrap_err().contains("---"));
        assert!(check_card("---\nlicense: [unclosed\n---\n")
            .unwrap_err()
            .contains("not valid YAML"));
        assert!(check_card("---\ntags: [a]\n---\n")
            .unwrap_err()
            .contains("license"));
    }
}
