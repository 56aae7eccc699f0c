//! Writing into one repo's folder of the hf-hub cache, and nowhere else.
//!
//! ```text
//! $HF_HUB_CACHE/models--ns--name/
//!     blobs/<hash>                          the file's bytes, named by its git blob id or SHA-256
//!     snapshots/<commit>/<path>             a relative symlink to ../../blobs/<hash>
//!     refs/<revision>                       the commit id
//! ```
//!
//! The names that go into these paths were checked by [`crate::untrusted`]; this module makes
//! sure of the rest. Below the repo folder no folder may be a symbolic link (a planted
//! `snapshots -> /home/user` would otherwise take every write with it), a folder never stands
//! where a file goes, and every file is written under a temporary name in its own folder and
//! renamed, so an existing symlink at the final name is replaced, never written through. Before
//! each write the folder it lands in is canonicalised and checked to be inside the repo folder.
//! The cache folder itself may be a symlink (users move caches to other disks that way).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::HubError;

/// One repo's folder in the cache, opened for writing.
pub struct RepoFolder {
    /// Canonical: symlinks above it resolved once, at open.
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn refuse(path: &Path, msg: &str) -> HubError {
    HubError::Cache {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// `models--ns--name`, the folder name huggingface_hub gives a model repo.
pub fn folder_name(id: &str) -> String {
    format!("models--{}", id.replace('/', "--"))
}

impl RepoFolder {
    /// Creates (if needed) and opens `cache_dir/models--ns--name`. `id` is a checked repo id.
    pub fn open(cache_dir: &Path, id: &str) -> Result<Self, HubError> {
        std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
        let cache = cache_dir.canonicalize().map_err(io(cache_dir))?;
        let root = cache.join(folder_name(id));
        real_dir(&root)?;
        Ok(RepoFolder { root })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The folder `self/names[0]/names[1]/...`, created where missing; each must be a real
    /// folder, not a symlink and not a file.
    fn dir(&self, names: &[&str]) -> Result<PathBuf, HubError> {
        let mut dir = self.root.clone();
        for name in names {
            dir.push(name);
            real_dir(&dir)?;
        }
        self.check_inside(&dir)?;
        Ok(dir)
    }

    /// The last guard before a write: `dir`, with every symlink resolved, is inside the repo
    /// folder.
    fn check_inside(&self, dir: &Path) -> Result<(), HubError> {
        let real = dir.canonicalize().map_err(io(dir))?;
        if real.starts_with(&self.root) {
            Ok(())
        } else {
            Err(refuse(
                dir,
                &format!(
                    "resolves to {}, outside the cache folder {}: nothing is written there",
                    real.display(),
                    self.root.display()
                ),
            ))
        }
    }

    /// `blobs/<hash>` if it is there as a regular file of `size` bytes (a symlink there does
    /// not count: it is replaced).
    pub fn existing_blob(&self, hash: &str, size: u64) -> Option<PathBuf> {
        let path = self.root.join("blobs").join(hash);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        (meta.file_type().is_file() && meta.len() == size).then_some(path)
    }

    /// A new, empty temporary file in `blobs/` for a download (created exclusively, so it
    /// cannot be a link someone planted).
    pub fn blob_temp(&self) -> Result<tempfile::NamedTempFile, HubError> {
        let dir = self.dir(&["blobs"])?;
        tempfile::Builder::new()
            .prefix(".download-")
            .suffix(".incomplete")
            .tempfile_in(&dir)
            .map_err(|e| HubError::Io {
                path: dir,
                source: e,
            })
    }

    /// Renames a finished download to `blobs/<hash>`.
    pub fn persist_blob(
        &self,
        temp: tempfile::NamedTempFile,
        hash: &str,
    ) -> Result<PathBuf, HubError> {
        let dir = self.dir(&["blobs"])?;
        let path = dir.join(hash);
        not_a_dir(&path)?;
        temp.persist(&path).map_err(|e| HubError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(path)
    }

    /// `snapshots/<commit>/<repo_path>` as a relative link to `blobs/<hash>`, replacing what
    /// was there (a link or a file, never a folder). `commit` and `repo_path` are checked.
    pub fn link(&self, commit: &str, repo_path: &str, hash: &str) -> Result<PathBuf, HubError> {
        let mut names: Vec<&str> = vec!["snapshots", commit];
        names.extend(repo_path.split('/'));
        let file = names.pop().expect("a repo path has a name");
        let dir = self.dir(&names)?;
        let path = dir.join(file);
        not_a_dir(&path)?;
        // From snapshots/<commit>/a/b/file: one `..` per folder below the repo folder.
        let target: PathBuf = std::iter::repeat_n("..", names.len())
            .chain(["blobs", hash])
            .collect();
        let temp = temp_name(&dir, file);
        symlink(&target, &temp).map_err(io(&temp))?;
        std::fs::rename(&temp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            HubError::Io {
                path: path.clone(),
                source: e,
            }
        })?;
        Ok(path)
    }

    /// `refs/<revision>` holding `commit`, written under a temporary name and renamed.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), HubError> {
        let mut names: Vec<&str> = vec!["refs"];
        names.extend(revision.split('/'));
        let file = names.pop().expect("a revision has a name");
        let dir = self.dir(&names)?;
        let path = dir.join(file);
        not_a_dir(&path)?;
        let mut temp = tempfile::Builder::new()
            .prefix(".ref-")
            .tempfile_in(&dir)
            .map_err(io(&dir))?;
        temp.write_all(commit.as_bytes()).map_err(io(&path))?;
        temp.persist(&path).map_err(|e| HubError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        Ok(())
    }
}

/// `path` is a real folder (created if missing), not a symlink or a file.
fn real_dir(path: &Path) -> Result<(), HubError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(refuse(
            path,
            "is a symbolic link inside the cache: Kindling writes through no link there \
             (remove it, or point HF_HUB_CACHE at the folder it leads to)",
        )),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(refuse(path, "is a file where the cache needs a folder")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::create_dir(path) {
            Ok(()) => Ok(()),
            // Another process made it meanwhile: check what it made.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => real_dir(path),
            Err(e) => Err(io(path)(e)),
        },
        Err(e) => Err(io(path)(e)),
    }
}

/// A folder at `path` would take the rename; refuse instead.
fn not_a_dir(path: &Path) -> Result<(), HubError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(refuse(
            path,
            "is a folder where the cache needs a file (does the listing name a file and a \
             folder alike?)",
        )),
        _ => Ok(()),
    }
}

fn temp_name(dir: &Path, file: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    // Kept short: `file` may already be 255 bytes long.
    let stem: String = file.chars().take(40).collect();
    dir.join(format!(".{stem}.{}.{n}.tmp", std::process::id()))
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(target, link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_point_into_blobs_and_replace_what_was_there() {
        let cache = tempfile::tempdir().unwrap();
        let repo = RepoFolder::open(cache.path(), "ns/name").unwrap();
        let commit = "c".repeat(40);
        let link = repo.link(&commit, "onnx/model.onnx", "abc").unwrap();
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../../../blobs/abc")
        );
        // A second pull of another version replaces the link itself.
        repo.link(&commit, "onnx/model.onnx", "def").unwrap();
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            Path::new("../../../blobs/def")
        );
        repo.write_ref("refs/pr/1", &commit).unwrap();
        assert_eq!(
            std::fs::read_to_string(repo.path().join("refs/refs/pr/1")).unwrap(),
            commit
        );
    }

    #[test]
    fn a_symlinked_folder_inside_the_repo_folder_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let elsewhere = top.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let cache = top.path().join("hub");
        let repo = RepoFolder::open(&cache, "ns/name").unwrap();
        std::os::unix::fs::symlink(&elsewhere, repo.path().join("snapshots")).unwrap();
        let err = repo
            .link(&"c".repeat(40), "config.json", "abc")
            .unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        std::os::unix::fs::symlink(&elsewhere, repo.path().join("blobs")).unwrap();
        assert!(repo.blob_temp().is_err());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
        // The cache folder itself may be a link.
        let linked = top.path().join("linked-hub");
        std::os::unix::fs::symlink(&elsewhere, &linked).unwrap();
        let repo = RepoFolder::open(&linked, "ns/other").unwrap();
        repo.write_ref("main", &"c".repeat(40)).unwrap();
        assert!(elsewhere.join("models--ns--other/refs/main").is_file());
    }
}
