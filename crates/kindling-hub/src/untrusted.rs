//! Checks on the names and values a Hub server sends, before any of them is used as a path.
//!
//! `HF_ENDPOINT` is routinely pointed at mirrors and proxies, and whatever answers there decides
//! the file names in a listing, the ETags that name blobs and the commit id that names the
//! snapshot folder. Each is joined to a cache path, so each is checked first: a repo path is
//! relative, stays below the snapshot folder and means the same file on every OS; an ETag is a
//! git blob id or a SHA-256; a commit is a git commit id. A value that fails is an error naming
//! the field and the value ([`HubError::Untrusted`]), and nothing is written for it.

use crate::HubError;

/// The longest repo path accepted, in bytes (Linux's PATH_MAX is 4096; the cache's own prefix
/// needs room).
pub const MAX_PATH_BYTES: usize = 1024;
/// The longest file or folder name accepted, in bytes (NAME_MAX on Linux, macOS and Windows).
pub const MAX_NAME_BYTES: usize = 255;

fn untrusted(field: &str, value: &str, expected: &str) -> HubError {
    HubError::Untrusted {
        field: field.to_string(),
        value: value.chars().take(200).collect(),
        expected: expected.to_string(),
    }
}

/// A file's path in a repo (`config.json`, `onnx/model.onnx`), as a listing names it: `/`
/// separated, relative, no empty, `.` or `..` segment, no backslash, drive prefix, NUL or other
/// control character, each name at most 255 bytes and the whole at most 1024.
pub fn repo_path<'a>(field: &str, path: &'a str) -> Result<&'a str, HubError> {
    let bad = |why: &str| Err(untrusted(field, path, why));
    if path.is_empty() {
        return bad("a non-empty relative path");
    }
    if path.len() > MAX_PATH_BYTES {
        return bad("a path of at most 1024 bytes");
    }
    if path.starts_with('/') {
        return bad("a relative path, not an absolute one");
    }
    if path.chars().any(|c| c.is_control()) {
        return bad("a path without NUL or control characters");
    }
    if path.contains('\\') {
        return bad("a `/`-separated path without backslashes");
    }
    let first = path.split('/').next().unwrap_or_default();
    if first.len() >= 2 && first.as_bytes()[1] == b':' && first.as_bytes()[0].is_ascii_alphabetic()
    {
        return bad("a relative path, not one with a drive prefix");
    }
    for name in path.split('/') {
        match name {
            "" => return bad("a path without empty segments (`//` or a trailing `/`)"),
            "." | ".." => return bad("a path that stays inside the repo (no `.` or `..` segment)"),
            n if n.len() > MAX_NAME_BYTES => return bad("names of at most 255 bytes"),
            _ => {}
        }
    }
    Ok(path)
}

/// A git commit id: 40 lowercase hex digits.
pub fn commit_id<'a>(field: &str, value: &'a str) -> Result<&'a str, HubError> {
    if is_hex(value, 40) {
        Ok(value)
    } else {
        Err(untrusted(
            field,
            value,
            "a commit id of 40 lowercase hex digits",
        ))
    }
}

/// A file's content hash from an `ETag` or `X-Linked-Etag` header, in the Hub's forms: the git
/// blob id (40 hex digits) of a regular file or the SHA-256 (64) of an LFS file, quoted or
/// bare, with or without the weak `W/` prefix. Returns the hex, which names the blob.
pub fn etag<'a>(field: &str, value: &'a str) -> Result<&'a str, HubError> {
    let v = value.strip_prefix("W/").unwrap_or(value);
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v);
    if is_hex(v, 40) || is_hex(v, 64) {
        Ok(v)
    } else {
        Err(untrusted(
            field,
            value,
            "a git blob id (40 hex digits) or a SHA-256 (64), optionally quoted",
        ))
    }
}

/// A revision as it names a file under `refs/` (`main`, `v1.0`, `refs/pr/1`): a repo path of
/// at most 255 bytes.
pub fn revision<'a>(field: &str, value: &'a str) -> Result<&'a str, HubError> {
    if value.len() > MAX_NAME_BYTES {
        return Err(untrusted(field, value, "a revision of at most 255 bytes"));
    }
    repo_path(field, value)
}

/// A byte count from a header or a listing.
pub fn size(field: &str, value: &str) -> Result<u64, HubError> {
    value
        .trim()
        .parse()
        .map_err(|_| untrusted(field, value, "a size in bytes"))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_paths_stay_inside_the_snapshot() {
        for ok in [
            "config.json",
            "onnx/model.onnx",
            ".gitattributes",
            "a b/c..d",
            "ab:c",
        ] {
            assert!(repo_path("file", ok).is_ok(), "{ok}");
        }
        let long_name = "n".repeat(256);
        let long_path = ["d"; 600].join("/");
        for bad in [
            "",
            "../../../../tmp/x.txt",
            "a/../../b",
            "./a",
            "a/.",
            "/etc/passwd",
            "a//b",
            "a/",
            "..\\..\\x",
            "C:/Windows/x",
            "c:x",
            "a\0b",
            "a\nb",
            "a\x1b[2Jb",
            long_name.as_str(),
            long_path.as_str(),
        ] {
            let err = repo_path("file name in the listing", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("file name in the listing"), "{err}");
        }
    }

    #[test]
    fn etags_and_commits_are_hashes() {
        let sha1 = "ce013625030ba8dba906f756967f9e9ca394464a";
        let sha256 = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
        assert_eq!(etag("ETag", &format!("\"{sha1}\"")).unwrap(), sha1);
        assert_eq!(etag("ETag", &format!("W/\"{sha256}\"")).unwrap(), sha256);
        assert_eq!(etag("ETag", sha256).unwrap(), sha256);
        for bad in [
            "\"../../../../victim.txt\"",
            "/tmp/x",
            "\"\"",
            &sha1[..39],
            &sha1.to_uppercase(),
            &format!("\"{sha1}"),
        ] {
            let err = etag("ETag of config.json", bad).unwrap_err().to_string();
            assert!(
                err.contains("ETag of config.json") && err.contains("hex"),
                "{err}"
            );
        }
        assert!(commit_id("X-Repo-Commit", sha1).is_ok());
        assert!(commit_id("X-Repo-Commit", "../../x").is_err());
        assert!(commit_id("X-Repo-Commit", sha256).is_err());
        assert!(revision("revision", "refs/pr/1").is_ok());
        assert!(revision("revision", "../main").is_err());
        assert_eq!(size("Content-Length", " 12 ").unwrap(), 12);
        assert!(size("Content-Length", "-1").is_err());
    }
}
