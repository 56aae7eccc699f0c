//! `kindling pull` and `hf://` model paths: a repo into the standard hf-hub cache
//! (`models--ns--name/blobs/<etag>`, `snapshots/<commit>/<file>` links, `refs/<revision>`), the
//! layout Python's huggingface_hub and candle read, downloaded by the hf-hub crate.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::{auth, check_repo_id, HubError, Token};

/// Where and how to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    pub endpoint: String,
    pub token: Option<Token>,
    pub cache_dir: PathBuf,
    pub revision: String,
    pub progress: bool,
}

impl PullOptions {
    /// Endpoint, token and cache from the environment (as the official client reads them).
    pub fn from_env(revision: &str) -> Result<Self, HubError> {
        Ok(PullOptions {
            endpoint: auth::endpoint(),
            token: auth::token()?,
            cache_dir: auth::cache_dir(),
            revision: revision.to_string(),
            progress: true,
        })
    }
}

fn repo(id: &str, revision: &str) -> Repo {
    Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string())
}

/// The snapshot folder of `id` at `revision` in the cache, if the cache has a complete one
/// (every file the snapshot lists is present). No network.
pub fn cached_snapshot(id: &str, opts: &PullOptions) -> Option<PathBuf> {
    let cache = Cache::new(opts.cache_dir.clone());
    let folder = opts
        .cache_dir
        .join(format!("models--{}", id.replace('/', "--")));
    let commit = std::fs::read_to_string(folder.join("refs").join(&opts.revision)).ok()?;
    let snapshot = folder.join("snapshots").join(commit.trim());
    // hf-hub resolves the ref the same way; asking it keeps us on its notion of the layout.
    cache
        .repo(repo(id, &opts.revision))
        .get("config.json")
        .filter(|p| p.starts_with(&snapshot))
        .map(|_| snapshot)
}

/// Downloads every file of `id` at `opts.revision` into the cache; returns the snapshot folder.
pub fn pull(id: &str, opts: &PullOptions) -> Result<PathBuf, HubError> {
    check_repo_id(id)?;
    let api = ApiBuilder::new()
        .with_endpoint(opts.endpoint.clone())
        .with_cache_dir(opts.cache_dir.clone())
        .with_token(opts.token.as_ref().map(|t| t.secret().to_string()))
        .with_progress(opts.progress)
        .with_retries(3)
        .build()
        .map_err(|e| HubError::Download(e.to_string()))?;
    let r = api.repo(repo(id, &opts.revision));
    let info = r
        .info()
        .map_err(|e| HubError::Download(format!("{id}@{}: {e}", opts.revision)))?;
    let mut snapshot = None;
    for s in &info.siblings {
        if s.rfilename == ".gitattributes" {
            continue;
        }
        let path = r
            .download(&s.rfilename)
            .map_err(|e| HubError::Download(format!("{id}/{}: {e}", s.rfilename)))?;
        if snapshot.is_none() {
            // snapshots/<commit>/<rfilename>: strip the file's own components.
            let depth = Path::new(&s.rfilename).components().count();
            let mut dir = path.clone();
            for _ in 0..depth {
                dir.pop();
            }
            snapshot = Some(dir);
        }
    }
    snapshot.ok_or_else(|| HubError::Download(format!("{id}: the repo has no files")))
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
        Err(e) => match cached_snapshot(id, &opts) {
            Some(dir) => {
                eprintln!("warning: {e}; using the cached snapshot {}", dir.display());
                Ok(dir)
            }
            None => Err(e),
        },
    }
}
