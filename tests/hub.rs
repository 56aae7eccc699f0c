//! The Hub: push an export to the loopback test server over the Git LFS protocol (basic and
//! multipart), pull it back into a fresh hf-hub cache, resume after the server dies mid-upload,
//! never leak the token, and interoperate with the official Python client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kindling_hub::files::sha256_hex;
use kindling_hub::server::{ServerConfig, TestHub};
use kindling_hub::{PullOptions, PushOptions, Token};

use crate::common::{kindling, python_reference, shared_tiny_run, stderr};

const TOKEN: &str = "hf_kindling_test_secret_4242";

fn export() -> PathBuf {
    shared_tiny_run().join("export")
}

fn config(part_size: u64) -> ServerConfig {
    ServerConfig {
        token: TOKEN.into(),
        part_size,
        die_after_parts: None,
        lie: None,
    }
}

fn push_opts(hub: &TestHub, repo: &str) -> PushOptions {
    PushOptions {
        repo: repo.into(),
        private: false,
        revision: "main".into(),
        message: "test push".into(),
        endpoint: hub.url.clone(),
        token: Token::new(TOKEN),
        retries: 2,
        backoff: Duration::from_millis(20),
    }
}

fn pull_opts(hub: &TestHub, cache: &Path) -> PullOptions {
    PullOptions {
        endpoint: hub.url.clone(),
        token: Some(Token::new(TOKEN)),
        cache_dir: cache.to_path_buf(),
        revision: "main".into(),
        progress: false,
        timeout: Duration::from_secs(10),
        retries: 2,
    }
}

/// path -> sha256 of every file under `dir` (following the cache's symlinks).
fn digests(dir: &Path) -> BTreeMap<String, String> {
    kindling_hub::files::list(dir)
        .unwrap()
        .into_iter()
        .map(|f| (f.path, f.sha256))
        .collect()
}

#[test]
fn push_then_pull_gives_the_same_files_in_the_standard_cache() {
    let size = std::fs::metadata(export().join("model.safetensors"))
        .unwrap()
        .len();
    let part = 128 << 10;
    assert!(size > 2 * part, "the weights must need several parts");
    let hub = TestHub::start(config(part)).unwrap();
    let report = kindling_hub::push(&export(), &push_opts(&hub, "kindling/tiny")).unwrap();
    assert!(report.commit.is_some());
    assert_eq!(
        report.uploaded,
        ["model.safetensors"],
        "only the weights are LFS"
    );
    {
        let st = hub.state.lock().unwrap();
        // Multipart: one PUT per part, one completion, one verify.
        assert_eq!(st.count("PUT /_lfs/part/"), size.div_ceil(part) as usize);
        assert_eq!(st.count("POST /_lfs/complete/"), 1);
        assert_eq!(st.count("POST /_lfs/verify/"), 1);
    }
    let cache = tempfile::tempdir().unwrap();
    let snapshot = kindling_hub::pull("kindling/tiny", &pull_opts(&hub, cache.path())).unwrap();
    // Every file comes back byte for byte (the Hub's seeded .gitattributes is not pulled).
    let expected = digests(&export());
    assert_eq!(digests(&snapshot), expected);
    // The layout huggingface_hub and candle read.
    let repo_dir = cache.path().join("models--kindling--tiny");
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    assert_eq!(snapshot, repo_dir.join("snapshots").join(commit.trim()));
    assert!(std::fs::symlink_metadata(snapshot.join("config.json"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(repo_dir.join("blobs").is_dir());

    // A second push sends nothing and makes no commit.
    let before = hub.state.lock().unwrap().log.len();
    let again = kindling_hub::push(&export(), &push_opts(&hub, "kindling/tiny")).unwrap();
    assert!(again.commit.is_none() && again.uploaded.is_empty());
    assert_eq!(again.unchanged.len(), expected.len());
    let st = hub.state.lock().unwrap();
    let new: Vec<&String> = st.log[before..].iter().collect();
    assert!(
        new.iter()
            .all(|l| !l.contains("/_lfs/") && !l.contains("/commit/")),
        "{new:?}"
    );
}

#[test]
fn a_push_cut_off_by_a_server_crash_completes_when_rerun() {
    let part = 64 << 10;
    let mut crashing = config(part);
    crashing.die_after_parts = Some(3);
    let hub = TestHub::start(crashing).unwrap();
    let (port, state) = (hub.port, hub.state.clone());
    let err = kindling_hub::push(&export(), &push_opts(&hub, "kindling/crash")).unwrap_err();
    assert!(hub.crashed(), "the fault killed the server");
    assert!(err.to_string().contains("LFS part"), "{err}");
    drop(hub);
    // The Hub comes back (same storage, same port); the rerun finishes the job.
    let hub = TestHub::start_on(port, config(part), state).unwrap();
    let report = kindling_hub::push(&export(), &push_opts(&hub, "kindling/crash")).unwrap();
    assert!(report.commit.is_some());
    let files = hub
        .state
        .lock()
        .unwrap()
        .files("kindling/crash", "main")
        .unwrap();
    assert_eq!(
        sha256_hex(&files["model.safetensors"]),
        sha256_hex(&std::fs::read(export().join("model.safetensors")).unwrap())
    );
}

#[test]
fn the_token_appears_in_no_output_and_no_written_file() {
    let hub = TestHub::start(config(256 << 10)).unwrap();
    let before = digests(&export());
    let home = tempfile::tempdir().unwrap();
    let run = |token: &str| {
        kindling()
            .args(["push"])
            .arg(export())
            .args(["--repo", "kindling/secret"])
            .env("HF_TOKEN", token)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", home.path())
            .env("RUST_LOG", "trace")
            .output()
            .unwrap()
    };
    let ok = run(TOKEN);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // A refused token: the error must not echo it either.
    let refused = run("hf_wrong_token_0000");
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("401"), "{}", stderr(&refused));
    for (out, token) in [(&ok, TOKEN), (&refused, "hf_wrong_token_0000")] {
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(out));
        assert!(!all.contains(token), "the token leaked: {all}");
    }
    // Nothing was written into the export, and nothing written anywhere holds the token.
    assert_eq!(digests(&export()), before);
    for f in kindling_hub::files::list(home.path()).unwrap_or_default() {
        let bytes = std::fs::read(&f.local).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(TOKEN),
            "{}",
            f.path
        );
    }
}

#[test]
fn an_inconsistent_export_is_refused_before_anything_is_sent() {
    let hub = TestHub::start(config(1 << 20)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for f in kindling_hub::files::list(&export()).unwrap() {
        std::fs::copy(&f.local, dir.path().join(&f.path)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["num_hidden_layers"] = 3.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = kindling_hub::push(dir.path(), &push_opts(&hub, "kindling/bad")).unwrap_err();
    assert!(err.to_string().contains("num_hidden_layers 3"), "{err}");
    std::fs::copy(export().join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("README.md"), "no front matter\n").unwrap();
    let err = kindling_hub::push(dir.path(), &push_opts(&hub, "kindling/bad")).unwrap_err();
    assert!(err.to_string().contains("README.md"), "{err}");
    assert!(hub.state.lock().unwrap().log.is_empty(), "nothing was sent");
}

#[test]
fn hf_model_paths_download_once_and_work_offline_from_the_cache() {
    let hub = TestHub::start(config(1 << 20)).unwrap();
    kindling_hub::push(&export(), &push_opts(&hub, "kindling/embedder")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let input = cache.path().join("in.txt");
    std::fs::write(&input, "it is a truth universally acknowledged\n").unwrap();
    let embed = |offline: bool| {
        let mut c = kindling();
        c.args(["embed", "hf://kindling/embedder", "--input"])
            .arg(&input)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HUB_CACHE", cache.path().join("hub"))
            .env_remove("HF_TOKEN");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        }
        c.output().unwrap()
    };
    let online = embed(false);
    assert!(online.status.success(), "{}", stderr(&online));
    let downloads = hub.state.lock().unwrap().count("/resolve/");
    assert!(downloads > 0);
    let offline = embed(true);
    assert!(offline.status.success(), "{}", stderr(&offline));
    assert_eq!(online.stdout, offline.stdout, "same model, same embedding");
    assert_eq!(
        hub.state.lock().unwrap().count("/resolve/"),
        downloads,
        "offline: no request"
    );
}

/// The official client: huggingface_hub uploads, Kindling pulls; Kindling pushes,
/// huggingface_hub downloads. Needs KINDLING_PYTHON with huggingface_hub (.ci/run sets it up).
#[test]
fn huggingface_hub_and_kindling_read_what_the_other_wrote() {
    if std::env::var_os("KINDLING_PYTHON").is_none() {
        crate::common::skipped("the huggingface_hub cross-check (KINDLING_PYTHON not set)");
        return;
    }
    let hub = TestHub::start(config(256 << 10)).unwrap();
    let py = |args: &[&str]| {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let text = python_reference("hub_client.py", &args).expect("KINDLING_PYTHON is set");
        serde_json::from_str::<serde_json::Value>(text.lines().last().unwrap()).unwrap()
    };
    let export = export();
    let expected = digests(&export);

    // Python uploads (multipart for the weights), Kindling pulls.
    py(&[
        "upload",
        &hub.url,
        TOKEN,
        "py/tiny",
        export.to_str().unwrap(),
    ]);
    assert!(hub.state.lock().unwrap().count("PUT /_lfs/part/") > 1);
    let cache = tempfile::tempdir().unwrap();
    let snap = kindling_hub::pull("py/tiny", &pull_opts(&hub, cache.path())).unwrap();
    assert_eq!(digests(&snap), expected);

    // Kindling pushes, Python downloads.
    kindling_hub::push(&export, &push_opts(&hub, "rs/tiny")).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let got = py(&[
        "download",
        &hub.url,
        TOKEN,
        "rs/tiny",
        cache.path().to_str().unwrap(),
    ]);
    let mut files: BTreeMap<String, String> = got["files"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    files.remove(".gitattributes");
    assert_eq!(files, expected);
}
