//! The Hugging Face Hub for Kindling.
//!
//! * [`push`]: uploads an export folder on the Hub's Git LFS path, as `huggingface_hub` does with
//!   Xet disabled: create the repo, validate the card, preupload (which files are LFS, which are
//!   unchanged), LFS batch, basic or multipart transfers, verify, then one NDJSON commit. Every
//!   request is retried with backoff on 5xx, 429 and dropped connections, and a rerun sends only
//!   what the Hub lacks.
//! * [`pull`]: downloads a repo into the standard hf-hub cache (`models--ns--name/blobs`,
//!   `snapshots`, `refs`) with the hf-hub crate, and resolves `hf://ns/name` to a snapshot
//!   folder, from the cache alone when offline.
//! * [`server`]: a loopback server that speaks the same protocol, for tests.
//!
//! Token and endpoint come from where the official client reads them ([`auth`]); the token is
//! only ever written into an `Authorization` header.

pub mod auth;
pub mod files;
pub mod http;
pub mod pull;
pub mod push;
pub mod server;

use std::path::PathBuf;

pub use auth::Token;
pub use pull::{pull, resolve_model_path, PullOptions};
pub use push::{check_export, push, PushOptions, PushReport};

/// What talking to the Hub can fail with. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Export { path: PathBuf, msg: String },
    #[error("{what}: the Hub answered {status}: {msg}")]
    Status {
        what: String,
        status: u16,
        msg: String,
    },
    #[error("{what}: {msg} (after {attempts} attempts)")]
    Transport {
        what: String,
        msg: String,
        attempts: u32,
    },
    #[error("{what}: unexpected answer: {msg}")]
    Protocol { what: String, msg: String },
    #[error("no Hub token: set HF_TOKEN, or HF_TOKEN_PATH, or write it to $HF_HOME/token")]
    NoToken,
    #[error("`{0}` is not a repo id: expected NAMESPACE/NAME")]
    RepoId(String),
    #[error("download: {0}")]
    Download(String),
}

/// Checks `ns/name`.
pub fn check_repo_id(id: &str) -> Result<(), HubError> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !s.starts_with('.')
    };
    match id.split_once('/') {
        Some((ns, name)) if ok(ns) && ok(name) => Ok(()),
        _ => Err(HubError::RepoId(id.to_string())),
    }
}
