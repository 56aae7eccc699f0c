//! The files of a folder to upload, with the object ids the Hub compares: the git blob SHA-1
//! (regular files) and the SHA-256 (LFS files).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha1::Digest as _;

use crate::HubError;

/// One file of an upload.
#[derive(Debug, Clone)]
pub struct LocalFile {
    /// Path in the repo, `/`-separated.
    pub path: String,
    pub local: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// `sha1("blob {size}\0" + content)`: git's object id.
    pub git_sha1: String,
    /// The first 512 bytes, which preupload sends so the Hub can tell binary from text.
    pub sample: Vec<u8>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&sha2::Sha256::digest(bytes))
}

/// Git's blob id of bytes, hex.
pub fn git_sha1_hex(bytes: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", bytes.len()).as_bytes());
    h.update(bytes);
    hex(&h.finalize())
}

/// Hashes one file in a single streaming pass.
pub fn describe(local: &Path, path: String) -> Result<LocalFile, HubError> {
    let io = |source| HubError::Io {
        path: local.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(local).map_err(io)?.len();
    let mut f = std::fs::File::open(local).map_err(io)?;
    let mut s256 = sha2::Sha256::new();
    let mut s1 = sha1::Sha1::new();
    s1.update(format!("blob {size}\0").as_bytes());
    let mut sample = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        if sample.len() < 512 {
            let take = (512 - sample.len()).min(n);
            sample.extend_from_slice(&buf[..take]);
        }
        s256.update(&buf[..n]);
        s1.update(&buf[..n]);
    }
    Ok(LocalFile {
        path,
        local: local.to_path_buf(),
        size,
        sha256: hex(&s256.finalize()),
        git_sha1: hex(&s1.finalize()),
        sample,
    })
}

/// Every file under `dir` (sorted), skipping hidden files and folders (temporary files of an
/// interrupted write start with a dot).
pub fn list(dir: &Path) -> Result<Vec<LocalFile>, HubError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), HubError> {
        let io = |source| HubError::Io {
            path: dir.to_path_buf(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let p = entry.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else {
                let rel = p
                    .strip_prefix(root)
                    .expect("under root")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((rel, p));
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(dir, dir, &mut found)?;
    found.sort();
    found
        .into_iter()
        .map(|(rel, p)| describe(&p, rel))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_match_git_and_sha256() {
        // `printf 'hello\n' | git hash-object --stdin` and `sha256sum`.
        assert_eq!(
            git_sha1_hex(b"hello\n"),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            sha256_hex(b"hello\n"),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), b"hello\n").unwrap();
        std::fs::write(dir.path().join(".a.txt.tmp1"), b"partial").unwrap();
        let files = list(dir.path()).unwrap();
        assert_eq!(files.len(), 1, "hidden temporary files are not uploaded");
        assert_eq!(files[0].git_sha1, git_sha1_hex(b"hello\n"));
        assert_eq!(files[0].sample, b"hello\n");
    }
}
