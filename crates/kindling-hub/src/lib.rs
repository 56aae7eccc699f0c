//! The Hugging Face Hub for Kindling.
//!
//! * [`push()`]: uploads an export folder on the Hub's Git LFS path, as `huggingface_hub` does with
//!   Xet disabled: create the repo, validate the card, preupload (which files are LFS, which are
//!   unchanged), LFS batch, basic or multipart transfers, verify, then one NDJSON commit. Every
//!   request is retried with backoff on 5xx, 429 and dropped connections, and a rerun sends only
//!   what the Hub lacks.
//! * [`pull()`]: downloads a repo into the standard hf-hub cache (`models--ns--name/blobs`,
//!   `snapshots`, `refs`), checking every name, hash and size the server sends before anything
//!   touches the disk ([`untrusted`]) and writing only inside the repo's cache folder
//!   ([`cache`]); resolves `hf://ns/name` to a snapshot folder, from the cache alone when
//!   offline.
//! * [`server`]: a loopback server that speaks the same protocol, for tests.
//!
//! Token and endpoint come from where the official client reads them ([`auth`]); the token is
//! only ever written into an `Authorization` header to the endpoint's own origin, and text from
//! a server is redacted before it is shown ([`http`]).

pub mod auth;
pub mod cache;
pub mod files;
pub mod http;
pub mod pull;
pub mod push;
pub mod server;
pub mod untrusted;

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
    /// A value a server sent that Kindling will not use: a file name that leaves the snapshot
    /// folder, an ETag or commit id that is not a hash, a size that disagrees with the listing.
    #[error("the server sent an invalid {field}: {value:?} (expected {expected}); nothing was written for it")]
    Untrusted {
        field: String,
        value: String,
        expected: String,
    },
    /// A path in the cache that Kindling will not write through (a symbolic link to a folder,
    /// a folder where a file goes).
    #[error("{}: {msg}", path.display())]
    Cache { path: PathBuf, msg: String },
    #[error("{name}={value:?}: expected {expected}")]
    Env {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
}

impl HubError {
    /// The same error with `token` (and anything shaped like a token) redacted from every text
    /// that may have come from a server, and control characters removed: the last step before
    /// an error leaves this crate.
    pub fn redacted(self, token: Option<&Token>) -> HubError {
        let r = |s: String| auth::redact(&s, token);
        match self {
            HubError::Status { what, status, msg } => HubError::Status {
                what: r(what),
                status,
                msg: r(msg),
            },
            HubError::Transport {
                what,
                msg,
                attempts,
            } => HubError::Transport {
                what: r(what),
                msg: r(msg),
                attempts,
            },
            HubError::Protocol { what, msg } => HubError::Protocol {
                what: r(what),
                msg: r(msg),
            },
            HubError::Download(msg) => HubError::Download(r(msg)),
            HubError::Untrusted {
                field,
                value,
                expected,
            } => HubError::Untrusted {
                field: r(field),
                value: r(value),
                expected: r(expected),
            },
            HubError::Cache { path, msg } => HubError::Cache { path, msg: r(msg) },
            other => other,
        }
    }
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
