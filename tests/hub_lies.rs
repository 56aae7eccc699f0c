//! A Hub that lies cannot turn `kindling pull` or `kindling push` against the user.
//!
//! `HF_ENDPOINT` is routinely pointed at mirrors and proxies. Each test here points it at the
//! loopback test Hub answering with one lie a compromised mirror could tell (a file name that
//! climbs out of the cache, an ETag or commit id that is a path, a redirect to another host, a
//! body that stalls or goes on, an error page that echoes the request's headers) and checks
//! that the command refuses it with an error naming the field, does not panic, sends the token
//! to no other host, prints it nowhere, and leaves every file outside the cache byte for byte
//! as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kindling_hub::server::{HubState, Lie, ServerConfig, TestHub};
use kindling_hub::{PushOptions, Token};

use crate::common::{kindling, shared_tiny_run, stderr};

const TOKEN: &str = "hf_kindling_lies_secret_0042";

fn config(lie: Option<Lie>) -> ServerConfig {
    ServerConfig {
        token: TOKEN.into(),
        part_size: 1 << 20,
        die_after_parts: None,
        lie,
    }
}

/// A server whose repo `repo` holds the tiny export, pushed while the server still told the
/// truth; the lie starts afterwards (a restart on the same port and state).
fn lying_hub(repo: &str, lie: Option<Lie>) -> TestHub {
    let honest = TestHub::start(config(None)).unwrap();
    let opts = PushOptions {
        repo: repo.into(),
        private: false,
        revision: "main".into(),
        message: "upload".into(),
        endpoint: honest.url.clone(),
        token: Token::new(TOKEN),
        retries: 1,
        backoff: Duration::from_millis(10),
    };
    kindling_hub::push(&shared_tiny_run().join("export"), &opts).unwrap();
    let (port, state) = (honest.port, honest.state.clone());
    honest.stop();
    TestHub::start_on(port, config(lie), state).unwrap()
}

/// A folder holding the user's files (`victim.txt`, `notes/plan.md`) and, beside them, the
/// hf-hub cache `hub/`.
struct Home {
    dir: tempfile::TempDir,
    /// What [`Home::outside`] gave when the home was made.
    initial: BTreeMap<PathBuf, String>,
}

impl Home {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("victim.txt"), "the user's own file\n").unwrap();
        std::fs::create_dir(dir.path().join("notes")).unwrap();
        std::fs::write(dir.path().join("notes/plan.md"), "# plan\n").unwrap();
        let mut home = Home {
            dir,
            initial: BTreeMap::new(),
        };
        home.initial = home.outside();
        home
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("hub")
    }

    /// Every path outside the cache, with its kind and bytes (or link target).
    fn outside(&self) -> BTreeMap<PathBuf, String> {
        fn walk(dir: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p == skip {
                    continue;
                }
                let meta = std::fs::symlink_metadata(&p).unwrap();
                let what = if meta.file_type().is_symlink() {
                    format!("link -> {}", std::fs::read_link(&p).unwrap().display())
                } else if meta.is_dir() {
                    walk(&p, skip, out);
                    "folder".into()
                } else {
                    format!("file {:?}", std::fs::read(&p).unwrap())
                };
                out.insert(p, what);
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), &self.cache(), &mut out);
        out
    }

    /// `kindling pull REPO` against `hub`, with the token set; fails the test if it runs for
    /// more than a minute (a hang).
    fn pull(&self, hub: &TestHub, repo: &str) -> Output {
        let mut cmd = kindling();
        cmd.args(["pull", repo])
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HUB_CACHE", self.cache())
            .env("HF_TOKEN", TOKEN)
            .env("HF_HUB_DOWNLOAD_TIMEOUT", "1")
            .env_remove("HF_HUB_OFFLINE");
        within_a_minute(cmd)
    }
}

fn within_a_minute(mut cmd: std::process::Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id();
    let done = Arc::new(Mutex::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                if *done.lock().unwrap() {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::process::Command::new("kill")
                .args(["-9", &id.to_string()])
                .status();
            true
        })
    };
    let out = child.wait_with_output().unwrap();
    *done.lock().unwrap() = true;
    assert!(
        !watchdog.join().unwrap(),
        "the command hung: killed after a minute"
    );
    out
}

/// The command failed with an error (exit 1, no panic) that names `field`, printed no token,
/// and left everything outside the cache as it was.
fn refused(out: &Output, field: &str, home: &Home, before: &BTreeMap<PathBuf, String>) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(field), "the error names {field:?}: {err}");
    let all = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
    assert!(!all.contains(TOKEN), "the token leaked: {all}");
    assert_eq!(&home.outside(), before, "files outside the cache changed");
}

/// A refusal while reading the listing or the metadata: nothing at all was written, in the
/// cache or outside it.
fn refused_before_writing(out: &Output, field: &str, home: &Home, repo: &str) {
    refused(out, field, home, &home.initial);
    let folder = home
        .cache()
        .join(format!("models--{}", repo.replace('/', "--")));
    assert!(!folder.exists(), "{} was created", folder.display());
}

fn tamper(hub: &TestHub, repo: &str, path: &str) {
    hub.state
        .lock()
        .unwrap()
        .put_file(repo, "main", path, b"the server's bytes\n")
        .unwrap();
}

#[test]
fn file_names_that_leave_the_snapshot_are_refused() {
    let home = Home::new();
    let absolute = home.dir.path().join("victim.txt");
    let long = format!("{}.json", "n".repeat(300));
    let names = [
        // From snapshots/<commit>/: up four folders is the user's home.
        "../../../../victim.txt",
        absolute.to_str().unwrap(),
        "notes/../../../../../victim.txt",
        "..\\..\\..\\..\\victim.txt",
        "C:/Users/victim.txt",
        "a\0b.txt",
        "red\x1b[31m.txt",
        long.as_str(),
    ];
    for (i, name) in names.iter().enumerate() {
        let repo = format!("lie/name{i}");
        let hub = lying_hub(&repo, None);
        tamper(&hub, &repo, name);
        let out = home.pull(&hub, &repo);
        refused_before_writing(
            &out,
            "file name (`rfilename`) in the repo info",
            &home,
            &repo,
        );
    }
}

#[test]
fn etags_and_commit_ids_that_are_paths_are_refused() {
    let home = Home::new();
    let victim = home.dir.path().join("victim.txt");
    let etags = [
        "\"../../../../victim.txt\"".to_string(),
        format!("\"{}\"", victim.display()),
        "\"not-a-hash\"".to_string(),
    ];
    for (i, etag) in etags.iter().enumerate() {
        let repo = format!("lie/etag{i}");
        let hub = lying_hub(&repo, Some(Lie::ETag(etag.clone())));
        let out = home.pull(&hub, &repo);
        refused_before_writing(&out, "ETag of", &home, &repo);
    }
    for (i, commit) in ["../../../../evil", "/tmp/evil", "main"].iter().enumerate() {
        let repo = format!("lie/commit{i}");
        let hub = lying_hub(&repo, Some(Lie::Commit(commit.to_string())));
        let out = home.pull(&hub, &repo);
        refused_before_writing(&out, "commit id (`sha`) of the repo info", &home, &repo);
    }
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "the user's own file\n"
    );
}

#[test]
fn a_listing_that_names_a_file_twice_or_a_file_as_a_folder_is_refused() {
    let home = Home::new();
    let hub = lying_hub(
        "lie/twice",
        Some(Lie::DuplicateListing("config.json".into())),
    );
    let out = home.pull(&hub, "lie/twice");
    refused_before_writing(&out, "each file listed once", &home, "lie/twice");

    let hub = lying_hub("lie/folder", None);
    tamper(&hub, "lie/folder", "config.json/inner.txt");
    let out = home.pull(&hub, "lie/folder");
    refused_before_writing(&out, "both a file and the folder", &home, "lie/folder");
}

#[test]
fn sizes_are_checked_against_the_listing_and_bodies_cannot_go_on() {
    let home = Home::new();
    let hub = lying_hub("lie/claim", Some(Lie::ClaimSize(10_000_000_000)));
    let out = home.pull(&hub, "lie/claim");
    refused_before_writing(&out, "X-Linked-Size of", &home, "lie/claim");
    assert!(stderr(&out).contains("10000000000"), "{}", stderr(&out));

    let before = home.outside();
    let hub = lying_hub("lie/long", Some(Lie::LongBody(4096)));
    let out = home.pull(&hub, "lie/long");
    refused(&out, "more than the", &home, &before);
    let repo = home.cache().join("models--lie--long");
    assert!(
        !repo.join("snapshots").exists(),
        "no snapshot for a failed pull"
    );
    let blobs: Vec<String> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        blobs.iter().all(|b| !b.starts_with('.')),
        "no temporary file left behind: {blobs:?}"
    );
}

#[test]
fn a_server_that_stops_answering_ends_the_pull_with_an_error_not_a_hang() {
    let home = Home::new();
    let hub = lying_hub("lie/silent", Some(Lie::SilentInfo));
    let out = home.pull(&hub, "lie/silent");
    refused_before_writing(&out, "repo info", &home, "lie/silent");

    let before = home.outside();
    let hub = lying_hub("lie/stall", Some(Lie::StallBody));
    let out = home.pull(&hub, "lie/stall");
    refused(&out, "the server stopped sending after", &home, &before);
    assert!(stderr(&out).contains("HF_HUB_DOWNLOAD_TIMEOUT"));
    assert!(!home.cache().join("models--lie--stall/snapshots").exists());
}

#[test]
fn symlinks_in_the_cache_are_never_written_through() {
    let home = Home::new();
    let elsewhere = home.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for (i, folder) in ["snapshots", "blobs", "refs"].iter().enumerate() {
        let repo = format!("lie/linked{i}");
        let hub = lying_hub(&repo, None);
        let repo_dir = home.cache().join(format!("models--lie--linked{i}"));
        std::fs::create_dir_all(&repo_dir).unwrap();
        std::os::unix::fs::symlink(&elsewhere, repo_dir.join(folder)).unwrap();
        let before = home.outside();
        let out = home.pull(&hub, &repo);
        refused(&out, "symbolic link", &home, &before);
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    // A file link in a snapshot that points out of the cache (left by anyone) is replaced, and
    // the file it pointed at keeps its bytes.
    let hub = lying_hub("lie/filelink", None);
    let good = home.pull(&hub, "lie/filelink");
    assert!(good.status.success(), "{}", stderr(&good));
    let snapshot = PathBuf::from(String::from_utf8_lossy(&good.stdout).trim());
    let config = snapshot.join("config.json");
    std::fs::remove_file(&config).unwrap();
    std::os::unix::fs::symlink(home.dir.path().join("victim.txt"), &config).unwrap();
    let before = home.outside();
    let again = home.pull(&hub, "lie/filelink");
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(home.outside(), before);
    let target = std::fs::read_link(&config).unwrap();
    assert!(target.starts_with("../../blobs"), "{}", target.display());
}

#[test]
fn the_token_never_goes_to_the_host_a_redirect_names() {
    // The CDN: another host (127.0.0.2) serving the same storage.
    let state = Arc::new(Mutex::new(HubState::default()));
    let cdn = TestHub::start_at("127.0.0.2", 0, config(None), state.clone()).unwrap();
    let hub = lying_hub(
        "lie/redirect",
        Some(Lie::RedirectDownloads(cdn.url.clone())),
    );
    // The CDN reads what the Hub stores.
    let cdn = {
        let (port, hub_state) = (cdn.port, hub.state.clone());
        cdn.stop();
        TestHub::start_at("127.0.0.2", port, config(None), hub_state).unwrap()
    };
    let home = Home::new();
    let before = home.outside();
    let out = home.pull(&hub, "lie/redirect");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(home.outside(), before);
    let st = hub.state.lock().unwrap();
    let downloads = st
        .log
        .iter()
        .filter(|l| l.starts_with("GET") && l.contains("/resolve/"))
        .count();
    assert!(
        downloads >= 2,
        "both hosts were asked for files: {:?}",
        st.log
    );
    assert!(
        st.authorized
            .iter()
            .any(|l| l.starts_with(&format!("{} GET /api/models/", hub.url))),
        "the Hub itself got the token: {:?}",
        st.authorized
    );
    let leaked: Vec<&String> = st
        .authorized
        .iter()
        .filter(|l| l.starts_with(&cdn.url))
        .collect();
    assert!(leaked.is_empty(), "the token went to the CDN: {leaked:?}");
    // And nothing in the cache holds it.
    for f in kindling_hub::files::list(&home.cache()).unwrap() {
        let bytes = std::fs::read(&f.local).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(TOKEN),
            "{}",
            f.path
        );
    }
}

#[test]
fn a_push_redirected_to_another_host_sends_it_no_token() {
    let state = Arc::new(Mutex::new(HubState::default()));
    let elsewhere = TestHub::start_at("127.0.0.2", 0, config(None), state.clone()).unwrap();
    let hub = TestHub::start(config(Some(Lie::RedirectApi(elsewhere.url.clone())))).unwrap();
    let opts = PushOptions {
        repo: "lie/moved".into(),
        private: false,
        revision: "main".into(),
        message: "upload".into(),
        endpoint: hub.url.clone(),
        token: Token::new(TOKEN),
        retries: 1,
        backoff: Duration::from_millis(10),
    };
    let err = kindling_hub::push(&shared_tiny_run().join("export"), &opts).unwrap_err();
    // The other host saw the request, without the token, and refused it.
    assert!(err.to_string().contains("401"), "{err}");
    let st = state.lock().unwrap();
    assert_eq!(st.count("POST /api/repos/create"), 1, "{:?}", st.log);
    assert!(st.authorized.is_empty(), "{:?}", st.authorized);
    assert_eq!(
        hub.state.lock().unwrap().authorized.len(),
        1,
        "only the endpoint got it"
    );
}

#[test]
fn a_server_that_echoes_the_request_headers_cannot_make_kindling_print_the_token() {
    let home = Home::new();
    let hub = lying_hub("lie/echo", Some(Lie::EchoHeaders));
    let out = home.pull(&hub, "lie/echo");
    refused_before_writing(&out, "403", &home, "lie/echo");
    assert!(
        stderr(&out).contains("Authorization: Bearer hf_***"),
        "the echo is shown, redacted: {}",
        stderr(&out)
    );

    let push = within_a_minute({
        let mut c = kindling();
        c.arg("push")
            .arg(shared_tiny_run().join("export"))
            .args(["--repo", "lie/echo-push"])
            .env("HF_TOKEN", TOKEN)
            .env("HF_ENDPOINT", &hub.url)
            .env("HF_HOME", home.dir.path().join("hf-home"))
            .env("RUST_LOG", "trace");
        c
    });
    let err = stderr(&push);
    assert_eq!(push.status.code(), Some(1), "{err}");
    assert!(
        err.contains("403") && err.contains("Bearer hf_***"),
        "{err}"
    );
    let all = format!("{}{err}", String::from_utf8_lossy(&push.stdout));
    assert!(!all.contains(TOKEN), "the token leaked: {all}");
}
