//! A Hub that runs on loopback, for tests: the routes the official client and Kindling use to
//! create a repo, upload on the Git LFS path (basic and multipart), commit, and download
//! (`revision`, `tree`, `resolve` with HEAD and Range), with the Hub's headers and error codes.
//! It stores everything in memory ([`HubState`]), which outlives a server: a test can stop the
//! server in the middle of an upload and start another on the same port and state, as a Hub
//! restart would look to a client.
//!
//! It is not the Hub: one thread, no permissions beyond one bearer token, no Xet (clients must
//! set `HF_HUB_DISABLE_XET=1`), and no `.gitattributes` parsing beyond HF's default LFS list.
//!
//! It can also lie ([`Lie`]), as a compromised mirror or a broken proxy would, and store files
//! under names no Hub accepts ([`HubState::put_file`]): tests then check what clients refuse.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::files::{git_sha1_hex, sha256_hex};

/// The patterns HF seeds a new model repo's `.gitattributes` with (`filter=lfs`).
const DEFAULT_LFS: &[&str] = &[
    ".7z",
    ".arrow",
    ".bin",
    ".bz2",
    ".ckpt",
    ".ftz",
    ".gz",
    ".h5",
    ".joblib",
    ".mlmodel",
    ".model",
    ".msgpack",
    ".npy",
    ".npz",
    ".onnx",
    ".ot",
    ".parquet",
    ".pb",
    ".pickle",
    ".pkl",
    ".pt",
    ".pth",
    ".rar",
    ".safetensors",
    ".tar",
    ".tflite",
    ".tgz",
    ".wasm",
    ".xz",
    ".zip",
    ".zst",
];

/// What the server can say that a real Hub would not (one at a time).
#[derive(Debug, Clone, PartialEq)]
pub enum Lie {
    /// `resolve` answers with this `ETag` (and `X-Linked-Etag`, for LFS files).
    ETag(String),
    /// Repo info (`sha`) and `resolve` (`X-Repo-Commit`) give this commit id.
    Commit(String),
    /// The repo info lists this file a second time, with another size and blob id.
    DuplicateListing(String),
    /// `resolve` GETs redirect (302) to this base URL followed by the request's path, as the
    /// Hub sends LFS files to its CDN; HEADs answer as usual.
    RedirectDownloads(String),
    /// Every `/api/` request is redirected (307, method and body kept) to this base URL
    /// followed by the request's path.
    RedirectApi(String),
    /// Repo info requests are never answered (the connection stays open).
    SilentInfo,
    /// Downloads send the headers and half the body, then nothing until the server stops.
    StallBody,
    /// Downloads send this many bytes more than the file has (HEAD gives the true size).
    LongBody(usize),
    /// `X-Linked-Size` claims this many bytes, whatever the file has.
    ClaimSize(u64),
    /// Every request that carries `Authorization` is refused with 403, the JSON body quoting
    /// the request's headers, as a reflecting proxy does.
    EchoHeaders,
}

/// Behaviour knobs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The bearer token writes must carry.
    pub token: String,
    /// LFS objects larger than this go up in parts of this size.
    pub part_size: u64,
    /// Fault injection: after this many part PUTs the server is dead: it answers no request
    /// (each is dropped; tiny_http then sends a bare 500) until it is stopped. A crash in the
    /// middle of an upload, as a client sees it.
    pub die_after_parts: Option<usize>,
    pub lie: Option<Lie>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            token: "hf_test_token".into(),
            part_size: 5 << 20,
            die_after_parts: None,
            lie: None,
        }
    }
}

#[derive(Clone)]
struct Entry {
    bytes: Arc<Vec<u8>>,
    lfs: bool,
}

impl Entry {
    fn oid(&self) -> String {
        if self.lfs {
            sha256_hex(&self.bytes)
        } else {
            git_sha1_hex(&self.bytes)
        }
    }
}

type Tree = BTreeMap<String, Entry>;

#[derive(Default)]
struct RepoState {
    refs: BTreeMap<String, String>,
    commits: HashMap<String, Tree>,
}

/// Everything the Hub stores, and a log of the requests it answered (`"PUT /_lfs/part/.."`),
/// which tests read to see what a client sent.
#[derive(Default)]
pub struct HubState {
    repos: BTreeMap<String, RepoState>,
    lfs: HashMap<String, Arc<Vec<u8>>>,
    parts: HashMap<(String, u32), Vec<u8>>,
    commits_made: u64,
    pub log: Vec<String>,
    /// `"{server url} {method} {path}"` of each request that carried an `Authorization`
    /// header: where the token went.
    pub authorized: Vec<String>,
}

impl HubState {
    /// The files of `repo` at `rev` (path -> bytes), for tests.
    pub fn files(&self, repo: &str, rev: &str) -> Option<BTreeMap<String, Vec<u8>>> {
        let r = self.repos.get(repo)?;
        let tree = r.commits.get(r.refs.get(rev)?)?;
        Some(
            tree.iter()
                .map(|(p, e)| (p.clone(), e.bytes.as_ref().clone()))
                .collect(),
        )
    }

    /// Stores `bytes` as `path` in `repo` at `rev`'s commit as it is, without the checks a
    /// commit makes: for names no Hub would accept (`../x`, `/etc/x`), which a lying mirror
    /// may still list.
    pub fn put_file(&mut self, repo: &str, rev: &str, path: &str, bytes: &[u8]) -> Option<()> {
        let r = self.repos.get_mut(repo)?;
        let sha = r.refs.get(rev)?.clone();
        r.commits.get_mut(&sha)?.insert(
            path.to_string(),
            Entry {
                bytes: Arc::new(bytes.to_vec()),
                lfs: is_lfs_path(path),
            },
        );
        Some(())
    }

    /// Requests whose log line contains `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log.iter().filter(|l| l.contains(needle)).count()
    }
}

/// A running server.
pub struct TestHub {
    pub url: String,
    pub port: u16,
    pub state: Arc<Mutex<HubState>>,
    stop: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestHub {
    /// Starts on a free loopback port with empty state.
    pub fn start(config: ServerConfig) -> std::io::Result<Self> {
        Self::start_on(0, config, Arc::new(Mutex::new(HubState::default())))
    }

    /// Starts on `port` (0: any free one) with `state` (a restart passes the old one).
    pub fn start_on(
        port: u16,
        config: ServerConfig,
        state: Arc<Mutex<HubState>>,
    ) -> std::io::Result<Self> {
        Self::start_at("127.0.0.1", port, config, state)
    }

    /// Starts on another loopback address (`127.0.0.2`: another host, as a client sees it).
    pub fn start_at(
        host: &str,
        port: u16,
        config: ServerConfig,
        state: Arc<Mutex<HubState>>,
    ) -> std::io::Result<Self> {
        // A restart on the port of a server just stopped: tiny_http's accept thread lets go of
        // the listening socket only once a connection wakes it, so knock and try again.
        let mut tries = 0;
        let server = loop {
            match Server::http((host, port)) {
                Ok(s) => break s,
                Err(e) if port != 0 && tries < 40 => {
                    tries += 1;
                    let _ = std::net::TcpStream::connect((host, port));
                    std::thread::sleep(Duration::from_millis(50));
                    let _ = e;
                }
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        };
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .ok_or_else(|| std::io::Error::other("no IP address"))?;
        let url = format!("http://{host}:{port}");
        let stop = Arc::new(AtomicBool::new(false));
        let dead = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, dead, url) = (state.clone(), stop.clone(), dead.clone(), url.clone());
            std::thread::spawn(move || {
                let mut hub = Handler {
                    config,
                    state,
                    base: url,
                    parts_seen: 0,
                    dead,
                    stop: stop.clone(),
                    held: Vec::new(),
                };
                while !stop.load(Ordering::SeqCst) {
                    match server.recv_timeout(Duration::from_millis(50)) {
                        Ok(Some(req)) => hub.handle(req),
                        Ok(None) => {}
                        Err(_) => break,
                    }
                }
                // Dropping the server closes the listening socket.
            })
        };
        Ok(TestHub {
            url,
            port,
            state,
            stop,
            dead,
            thread: Some(thread),
        })
    }

    /// Stops and waits for the server thread; the port is free afterwards.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Whether the fault injection has killed the server.
    pub fn crashed(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Handler {
    config: ServerConfig,
    state: Arc<Mutex<HubState>>,
    base: String,
    parts_seen: usize,
    dead: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// Requests left unanswered on purpose ([`Lie::SilentInfo`]).
    held: Vec<Request>,
}

struct Answer {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(String, String)>,
    /// Send half the body, then stall ([`Lie::StallBody`]).
    stall: bool,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer {
        status,
        body: body.to_string().into_bytes(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        stall: false,
    }
}

/// A body that gives its first half, then blocks until the server stops.
struct Stalling {
    data: std::io::Cursor<Vec<u8>>,
    stop: Arc<AtomicBool>,
}

impl std::io::Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let half = self.data.get_ref().len() as u64 / 2;
        if self.data.position() < half {
            let n = ((half - self.data.position()) as usize).min(buf.len());
            return self.data.read(&mut buf[..n]);
        }
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(std::io::Error::other("server stopped"))
    }
}

fn error(status: u16, code: &str, msg: &str) -> Answer {
    let mut a = answer(status, json!({ "error": msg }));
    a.headers.push(("X-Error-Code".into(), code.into()));
    a.headers.push(("X-Error-Message".into(), msg.into()));
    a
}

fn decode(seg: &str) -> String {
    seg.replace("%2F", "/")
        .replace("%2f", "/")
        .replace("%25", "%")
}

/// A percent-encoded path segment, decoded.
fn decode_path(seg: &str) -> String {
    percent_encoding::percent_decode_str(seg)
        .decode_utf8_lossy()
        .into_owned()
}

fn is_lfs_path(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    DEFAULT_LFS.iter().any(|ext| name.ends_with(ext))
        || name.contains(".tar.")
        || name.contains("tfevents")
}

impl Handler {
    fn handle(&mut self, mut req: Request) {
        let method = req.method().clone();
        let url = req.url().to_string();
        let (path, query) = url.split_once('?').unwrap_or((&url, ""));
        let path = path.to_string();
        let query = query.to_string();
        let header = |name: &str| {
            req.headers()
                .iter()
                .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
                .map(|h| h.value.as_str().to_string())
        };
        let authorization = header("Authorization");
        let authorised = authorization.as_deref() == Some(&format!("Bearer {}", self.config.token));
        let range = header("Range");
        let echoed: String = req
            .headers()
            .iter()
            .map(|h| format!("{}: {}", h.field, h.value))
            .collect::<Vec<_>>()
            .join("; ");
        let mut body = Vec::new();
        let _ = req.as_reader().read_to_end(&mut body);
        if method == Method::Put && path.starts_with("/_lfs/part/") {
            self.parts_seen += 1;
            if self
                .config
                .die_after_parts
                .is_some_and(|n| self.parts_seen > n)
            {
                self.dead.store(true, Ordering::SeqCst);
            }
        }
        if self.dead.load(Ordering::SeqCst) {
            drop(req); // no answer from a dead server
            return;
        }
        {
            let mut st = self.state.lock().expect("state");
            st.log.push(format!("{method} {path}"));
            if authorization.is_some() {
                st.authorized.push(format!("{} {method} {path}", self.base));
            }
        }
        let lie = self.config.lie.clone();
        if lie == Some(Lie::SilentInfo) && path.starts_with("/api/models/") && method == Method::Get
        {
            self.held.push(req);
            return;
        }
        let a = if let (Some(Lie::RedirectApi(to)), true) = (&lie, path.starts_with("/api/")) {
            let mut a = answer(307, json!({}));
            a.headers.push(("Location".into(), format!("{to}{path}")));
            a
        } else if lie == Some(Lie::EchoHeaders) && authorization.is_some() {
            let msg = format!("Forbidden. Your request headers were: {echoed}");
            answer(403, json!({ "error": msg }))
        } else {
            self.route(&method, &path, &query, &body, authorised, range.as_deref())
        };
        let headers: Vec<Header> = a
            .headers
            .iter()
            .filter_map(|(k, v)| Header::from_bytes(k.as_bytes(), v.as_bytes()).ok())
            .collect();
        // Identity encoding whatever the size, so a HEAD answer carries Content-Length.
        let status = tiny_http::StatusCode(a.status);
        let len = a.body.len();
        let _ = if a.stall {
            let data = Stalling {
                data: std::io::Cursor::new(a.body),
                stop: self.stop.clone(),
            };
            req.respond(
                Response::new(status, headers, data, Some(len), None)
                    .with_chunked_threshold(usize::MAX),
            )
        } else {
            req.respond(
                Response::new(
                    status,
                    headers,
                    std::io::Cursor::new(a.body),
                    Some(len),
                    None,
                )
                .with_chunked_threshold(usize::MAX),
            )
        };
    }

    fn route(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        body: &[u8],
        authorised: bool,
        range: Option<&str>,
    ) -> Answer {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let write = matches!(method, Method::Post | Method::Put);
        let presigned = segs.first() == Some(&"_lfs") && segs.get(1) != Some(&"verify");
        if write && !presigned && !authorised {
            return error(
                401,
                "Unauthorized",
                "Invalid credentials in Authorization header",
            );
        }
        let json_body = || serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
        match (method, segs.as_slice()) {
            (Method::Post, ["api", "repos", "create"]) => self.create(&json_body()),
            (Method::Post, ["api", "validate-yaml"]) => {
                answer(200, json!({"errors": [], "warnings": []}))
            }
            (Method::Post, ["api", "models", ns, name, "preupload", rev]) => {
                self.preupload(&format!("{ns}/{name}"), &decode(rev), &json_body())
            }
            (Method::Post, ["api", "models", ns, name, "commit", rev]) => {
                self.commit(&format!("{ns}/{name}"), &decode(rev), body)
            }
            (Method::Post, ["api", "models", ns, name, "branch", rev]) => {
                self.branch(&format!("{ns}/{name}"), &decode(rev))
            }
            (Method::Get, ["api", "models", ns, name]) => {
                self.info(&format!("{ns}/{name}"), "main", query)
            }
            (Method::Get, ["api", "models", ns, name, "revision", rev]) => {
                self.info(&format!("{ns}/{name}"), &decode(rev), query)
            }
            (Method::Get, ["api", "models", ns, name, "tree", rev, rest @ ..]) => self.tree(
                &format!("{ns}/{name}"),
                &decode(rev),
                &rest.join("/"),
                query,
            ),
            (Method::Post, [ns, git, "info", "lfs", "objects", "batch"])
                if git.ends_with(".git") =>
            {
                self.batch(
                    &format!("{ns}/{}", git.trim_end_matches(".git")),
                    &json_body(),
                )
            }
            (Method::Put, ["_lfs", "upload", _secret, oid]) => self.store(oid, body.to_vec()),
            (Method::Put, ["_lfs", "part", _secret, oid, n]) => {
                let n: u32 = n.parse().unwrap_or(0);
                let etag = format!("\"{}\"", &sha256_hex(body)[..32]);
                self.state
                    .lock()
                    .expect("state")
                    .parts
                    .insert((oid.to_string(), n), body.to_vec());
                let mut a = answer(200, json!({}));
                a.headers.push(("ETag".into(), etag));
                a
            }
            (Method::Post, ["_lfs", "complete", _secret, oid]) => self.complete(oid, &json_body()),
            (Method::Post, ["_lfs", "verify", oid]) => {
                let v = json_body();
                let st = self.state.lock().expect("state");
                match st.lfs.get(*oid) {
                    Some(b) if v["size"].as_u64() == Some(b.len() as u64) => answer(200, json!({})),
                    _ => error(404, "EntryNotFound", "object not stored"),
                }
            }
            (Method::Get | Method::Head, [ns, name, "resolve", rev, rest @ ..]) => self.resolve(
                method,
                &format!("{ns}/{name}"),
                &decode(rev),
                &rest
                    .iter()
                    .map(|s| decode_path(s))
                    .collect::<Vec<_>>()
                    .join("/"),
                range,
            ),
            _ => error(
                404,
                "EntryNotFound",
                &format!("no route for {method} {path}"),
            ),
        }
    }

    fn create(&mut self, v: &Value) -> Answer {
        let name = v["name"].as_str().unwrap_or_default();
        let ns = v["organization"].as_str().unwrap_or("user");
        if name.is_empty() {
            return error(400, "BadRequest", "no name");
        }
        let id = format!("{ns}/{name}");
        let url = format!("{}/{id}", self.base);
        let mut st = self.state.lock().expect("state");
        if st.repos.contains_key(&id) {
            return answer(
                409,
                json!({"error": "You already created this model repo", "url": url}),
            );
        }
        let mut tree = Tree::new();
        let attrs: String = DEFAULT_LFS
            .iter()
            .map(|e| format!("*{e} filter=lfs diff=lfs merge=lfs -text\n"))
            .collect();
        tree.insert(
            ".gitattributes".into(),
            Entry {
                bytes: Arc::new(attrs.into_bytes()),
                lfs: false,
            },
        );
        st.commits_made += 1;
        let sha = git_sha1_hex(format!("{id} initial {}", st.commits_made).as_bytes());
        let mut repo = RepoState::default();
        repo.refs.insert("main".into(), sha.clone());
        repo.commits.insert(sha, tree);
        st.repos.insert(id, repo);
        answer(200, json!({ "url": url }))
    }

    fn branch(&mut self, id: &str, rev: &str) -> Answer {
        let mut st = self.state.lock().expect("state");
        let Some(repo) = st.repos.get_mut(id) else {
            return error(404, "RepoNotFound", &format!("repository {id} not found"));
        };
        if repo.refs.contains_key(rev) {
            return error(409, "Conflict", "branch already exists");
        }
        let main = repo.refs["main"].clone();
        repo.refs.insert(rev.to_string(), main);
        answer(200, json!({}))
    }

    fn tree_at(&self, id: &str, rev: &str) -> Result<(String, Tree), Answer> {
        let st = self.state.lock().expect("state");
        let repo = st
            .repos
            .get(id)
            .ok_or_else(|| error(404, "RepoNotFound", &format!("repository {id} not found")))?;
        let sha = repo
            .refs
            .get(rev)
            .cloned()
            .or_else(|| repo.commits.contains_key(rev).then(|| rev.to_string()))
            .ok_or_else(|| {
                error(
                    404,
                    "RevisionNotFound",
                    &format!("revision {rev} not found"),
                )
            })?;
        Ok((sha.clone(), repo.commits[&sha].clone()))
    }

    fn preupload(&mut self, id: &str, rev: &str, v: &Value) -> Answer {
        let (_, tree) = match self.tree_at(id, rev) {
            Ok(t) => t,
            Err(a) => return a,
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let files: Vec<Value> = v["files"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|f| {
                let path = f["path"].as_str().unwrap_or_default();
                let size = f["size"].as_u64().unwrap_or(0);
                let sample = b64.decode(f["sample"].as_str().unwrap_or_default()).unwrap_or_default();
                let lfs = is_lfs_path(path) || size >= 10 << 20 || sample.contains(&0);
                let mut out = json!({"path": path, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false});
                if let Some(e) = tree.get(path) {
                    out["oid"] = e.oid().into();
                }
                out
            })
            .collect();
        answer(200, json!({ "files": files }))
    }

    fn batch(&mut self, id: &str, v: &Value) -> Answer {
        if !self.state.lock().expect("state").repos.contains_key(id) {
            return error(404, "RepoNotFound", &format!("repository {id} not found"));
        }
        let objects: Vec<Value> = v["objects"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                let oid = o["oid"].as_str().unwrap_or_default().to_string();
                let size = o["size"].as_u64().unwrap_or(0);
                if self.state.lock().expect("state").lfs.contains_key(&oid) {
                    return json!({"oid": oid, "size": size});
                }
                let secret = &sha256_hex(format!("{oid}{}", self.config.token).as_bytes())[..16];
                let verify = json!({"href": format!("{}/_lfs/verify/{oid}", self.base)});
                if size > self.config.part_size {
                    let mut header = serde_json::Map::new();
                    header.insert("chunk_size".into(), self.config.part_size.to_string().into());
                    for n in 1..=size.div_ceil(self.config.part_size) {
                        header.insert(
                            format!("{n:05}"),
                            format!("{}/_lfs/part/{secret}/{oid}/{n}", self.base).into(),
                        );
                    }
                    json!({"oid": oid, "size": size, "actions": {
                        "upload": {"href": format!("{}/_lfs/complete/{secret}/{oid}", self.base), "header": header},
                        "verify": verify}})
                } else {
                    json!({"oid": oid, "size": size, "actions": {
                        "upload": {"href": format!("{}/_lfs/upload/{secret}/{oid}", self.base)},
                        "verify": verify}})
                }
            })
            .collect();
        let mut a = answer(200, json!({"transfer": "basic", "objects": objects}));
        a.headers = vec![("Content-Type".into(), "application/vnd.git-lfs+json".into())];
        a
    }

    fn store(&mut self, oid: &str, bytes: Vec<u8>) -> Answer {
        if sha256_hex(&bytes) != oid {
            return error(400, "BadRequest", "content does not match its oid");
        }
        self.state
            .lock()
            .expect("state")
            .lfs
            .insert(oid.to_string(), Arc::new(bytes));
        answer(200, json!({}))
    }

    fn complete(&mut self, oid: &str, v: &Value) -> Answer {
        let mut numbers: Vec<u32> = v["parts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["partNumber"].as_u64().map(|n| n as u32))
            .collect();
        numbers.sort();
        let mut bytes = Vec::new();
        {
            let st = self.state.lock().expect("state");
            for n in &numbers {
                match st.parts.get(&(oid.to_string(), *n)) {
                    Some(p) => bytes.extend_from_slice(p),
                    None => return error(400, "BadRequest", &format!("part {n} was not uploaded")),
                }
            }
        }
        let a = self.store(oid, bytes);
        if a.status == 200 {
            self.state
                .lock()
                .expect("state")
                .parts
                .retain(|(o, _), _| o != oid);
        }
        a
    }

    fn commit(&mut self, id: &str, rev: &str, body: &[u8]) -> Answer {
        let (parent, mut tree) = match self.tree_at(id, rev) {
            Ok(t) => t,
            Err(a) => return a,
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let text = String::from_utf8_lossy(body);
        let mut summary = String::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                return error(400, "BadRequest", "a commit line is not JSON");
            };
            let val = &v["value"];
            let path = val["path"].as_str().unwrap_or_default().to_string();
            match v["key"].as_str() {
                Some("header") => summary = val["summary"].as_str().unwrap_or_default().into(),
                Some("file") => {
                    let Ok(bytes) = b64.decode(val["content"].as_str().unwrap_or_default()) else {
                        return error(400, "BadRequest", &format!("{path}: content is not base64"));
                    };
                    if bytes.len() > 10 << 20 {
                        return error(400, "BadRequest", &format!(
                            "Your push was rejected because it contains files larger than 10 MiB ({path}); use LFS"));
                    }
                    tree.insert(
                        path,
                        Entry {
                            bytes: Arc::new(bytes),
                            lfs: false,
                        },
                    );
                }
                Some("lfsFile") => {
                    let oid = val["oid"].as_str().unwrap_or_default();
                    let stored = self.state.lock().expect("state").lfs.get(oid).cloned();
                    match stored {
                        Some(bytes) => {
                            tree.insert(path, Entry { bytes, lfs: true });
                        }
                        None => {
                            return error(
                                400,
                                "BadRequest",
                                &format!("{path}: LFS object {oid} was never uploaded"),
                            )
                        }
                    }
                }
                Some("deletedFile") => {
                    tree.remove(&path);
                }
                Some("deletedFolder") => {
                    let prefix = format!("{}/", path.trim_end_matches('/'));
                    tree.retain(|p, _| !p.starts_with(&prefix));
                }
                other => return error(400, "BadRequest", &format!("unknown commit key {other:?}")),
            }
        }
        let mut st = self.state.lock().expect("state");
        st.commits_made += 1;
        let sha = git_sha1_hex(format!("{parent}{summary}{}", st.commits_made).as_bytes());
        let repo = st.repos.get_mut(id).expect("checked by tree_at");
        repo.commits.insert(sha.clone(), tree);
        repo.refs.insert(rev.to_string(), sha.clone());
        answer(
            200,
            json!({
            "commitOid": sha, "commitUrl": format!("{}/{id}/commit/{sha}", self.base),
            "commitMessage": summary, "pullRequestUrl": null}),
        )
    }

    fn info(&mut self, id: &str, rev: &str, query: &str) -> Answer {
        let (sha, tree) = match self.tree_at(id, rev) {
            Ok(t) => t,
            Err(a) => return a,
        };
        // `?blobs=true`: sizes, blob ids and LFS hashes, as the Hub gives them.
        let blobs = query
            .split('&')
            .any(|kv| kv == "blobs=true" || kv == "blobs=1");
        let mut siblings: Vec<Value> = tree
            .iter()
            .map(|(p, e)| {
                let mut v = json!({ "rfilename": p });
                if blobs {
                    v["size"] = e.bytes.len().into();
                    v["blobId"] = git_sha1_hex(&e.bytes).into();
                    if e.lfs {
                        v["lfs"] = json!({"sha256": sha256_hex(&e.bytes), "size": e.bytes.len(), "pointerSize": 134});
                    }
                }
                v
            })
            .collect();
        if let Some(Lie::DuplicateListing(name)) = &self.config.lie {
            siblings.push(json!({"rfilename": name, "size": 3, "blobId": git_sha1_hex(b"abc")}));
        }
        let sha = match &self.config.lie {
            Some(Lie::Commit(c)) => c.clone(),
            _ => sha,
        };
        answer(
            200,
            json!({
            "id": id, "modelId": id, "sha": sha, "private": false, "disabled": false,
            "gated": false, "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
            "lastModified": "2026-01-01T00:00:00.000Z", "siblings": siblings}),
        )
    }

    fn tree(&mut self, id: &str, rev: &str, under: &str, _query: &str) -> Answer {
        let (_, tree) = match self.tree_at(id, rev) {
            Ok(t) => t,
            Err(a) => return a,
        };
        let prefix = if under.is_empty() {
            String::new()
        } else {
            format!("{under}/")
        };
        let entries: Vec<Value> = tree
            .iter()
            .filter(|(p, _)| p.starts_with(&prefix))
            .map(|(p, e)| {
                let mut v = json!({"type": "file", "oid": git_sha1_hex(&e.bytes), "size": e.bytes.len(), "path": p});
                if e.lfs {
                    v["lfs"] = json!({"oid": sha256_hex(&e.bytes), "size": e.bytes.len(), "pointerSize": 134});
                }
                v
            })
            .collect();
        answer(200, Value::Array(entries))
    }

    fn resolve(
        &mut self,
        method: &Method,
        id: &str,
        rev: &str,
        path: &str,
        range: Option<&str>,
    ) -> Answer {
        let lie = self.config.lie.clone();
        if let (Some(Lie::RedirectDownloads(to)), Method::Get) = (&lie, method) {
            let mut a = answer(302, json!({}));
            a.headers
                .push(("Location".into(), format!("{to}/{id}/resolve/{rev}/{path}")));
            return a;
        }
        let (sha, tree) = match self.tree_at(id, rev) {
            Ok(t) => t,
            Err(a) => return a,
        };
        let sha = match &lie {
            Some(Lie::Commit(c)) => c.clone(),
            _ => sha,
        };
        let Some(e) = tree.get(path) else {
            return error(
                404,
                "EntryNotFound",
                &format!("{path} not found in {id}@{rev}"),
            );
        };
        let mut bytes = e.bytes.as_ref().clone();
        let size = bytes.len();
        if let (Some(Lie::LongBody(extra)), Method::Get) = (&lie, method) {
            bytes.resize(size + extra, b'x');
        }
        let etag = match &lie {
            Some(Lie::ETag(t)) => t.clone(),
            _ => format!("\"{}\"", git_sha1_hex(&e.bytes)),
        };
        let mut headers = vec![
            ("X-Repo-Commit".to_string(), sha),
            ("ETag".to_string(), etag.clone()),
            ("Accept-Ranges".to_string(), "bytes".to_string()),
            (
                "Content-Type".to_string(),
                "application/octet-stream".to_string(),
            ),
        ];
        if e.lfs {
            let linked = match &lie {
                Some(Lie::ETag(_)) => etag,
                _ => format!("\"{}\"", sha256_hex(&e.bytes)),
            };
            headers.push(("X-Linked-Etag".into(), linked));
            headers.push(("X-Linked-Size".into(), size.to_string()));
        }
        if let Some(Lie::ClaimSize(n)) = &lie {
            headers.retain(|(k, _)| k != "X-Linked-Size");
            headers.push(("X-Linked-Size".into(), n.to_string()));
        }
        let stall = lie == Some(Lie::StallBody) && *method == Method::Get;
        let span = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| {
                let start: usize = a.parse().ok()?;
                let end: usize = if b.is_empty() {
                    size.checked_sub(1)?
                } else {
                    b.parse().ok()?
                };
                (start <= end && end < size).then_some((start, end))
            });
        match span {
            Some((start, end)) => {
                headers.push((
                    "Content-Range".into(),
                    format!("bytes {start}-{end}/{size}"),
                ));
                Answer {
                    status: 206,
                    body: bytes[start..=end].to_vec(),
                    headers,
                    stall,
                }
            }
            None => Answer {
                status: 200,
                body: bytes,
                headers,
                stall,
            },
        }
    }
}
