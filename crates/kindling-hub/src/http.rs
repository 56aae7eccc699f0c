//! HTTP with the Hub's conventions: bearer auth, errors read from `X-Error-Message` or a JSON
//! `{"error": ...}` body, and retries with exponential backoff on 5xx, 429 and dropped
//! connections (what huggingface_hub's `http_backoff` retries).
//!
//! What a server says is not trusted:
//! * Redirects are followed here, not by ureq, so that `Authorization` goes only to the
//!   endpoint's own origin (scheme, host, port), never to the host a redirect names, as
//!   `requests` strips it for the official client. A target that is not an http(s) URL is an
//!   error.
//! * Every text from a server that ends up in an error (messages, bodies) has the token
//!   redacted and control characters removed ([`crate::auth::redact`]).
//! * JSON answers are read up to a size limit, and a server that stops sending hits the read
//!   timeout instead of hanging the command.

use std::io::Read;
use std::time::Duration;

use url::Url;

use crate::{auth, HubError, Token};

/// Redirects followed for one request; a longer chain is an error.
const MAX_REDIRECTS: usize = 10;

/// The largest JSON answer read (a listing of a repo with ~100k files is ~20 MB).
const MAX_JSON_BYTES: u64 = 64 << 20;

/// A client for one endpoint.
pub struct Http {
    agent: ureq::Agent,
    pub endpoint: String,
    /// The endpoint's (scheme, host, port): the only origin the token is sent to.
    origin: Option<Origin>,
    token: Option<Token>,
    /// Retries after the first attempt.
    pub retries: u32,
    /// The first wait; doubled after each failure, capped at 8 s.
    pub backoff: Duration,
}

/// A request body.
pub enum Body<'a> {
    None,
    Json(&'a serde_json::Value),
    Bytes(&'a [u8], &'a str),
}

/// Which redirects [`Http::send_with`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirects {
    /// Every redirect (downloads: the Hub sends LFS files to a CDN).
    Follow,
    /// Only those to the endpoint's own origin; a redirect elsewhere is returned as the answer,
    /// whose headers (`X-Linked-Etag`, `X-Linked-Size`) describe the file. This is how the
    /// official client reads a file's metadata.
    SameOrigin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

fn origin(url: &Url) -> Option<Origin> {
    Some(Origin {
        scheme: url.scheme().to_string(),
        host: url.host_str()?.to_ascii_lowercase(),
        port: url.port_or_known_default(),
    })
}

impl Http {
    /// A client with the upload timeouts: 20 s to connect, 300 s without a byte while waiting
    /// for an answer (the Hub can take minutes to verify a large commit).
    pub fn new(endpoint: &str, token: Option<Token>, retries: u32, backoff: Duration) -> Self {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        Http {
            agent: agent(Duration::from_secs(20), Duration::from_secs(300)),
            origin: Url::parse(&endpoint).ok().as_ref().and_then(origin),
            endpoint,
            token,
            retries,
            backoff,
        }
    }

    /// Sets both the connect and the read timeout: a server that accepts no connection, or
    /// sends no byte for `timeout`, ends the request with an error.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.agent = agent(timeout, timeout);
        self
    }

    /// `url` relative to the endpoint (starting with `/`) or absolute.
    pub fn url(&self, url: &str) -> String {
        if url.starts_with("http://") || url.starts_with("https://") {
            url.to_string()
        } else {
            format!("{}{url}", self.endpoint)
        }
    }

    /// Whether a request to `url` carries the token: only on the endpoint's own origin.
    pub fn sends_token_to(&self, url: &str) -> bool {
        self.token.is_some() && self.same_origin(url)
    }

    /// `text` from a server, fit to print: the token redacted, control characters removed.
    pub fn redact(&self, text: &str) -> String {
        auth::redact(text, self.token.as_ref())
    }

    /// A protocol error whose message quotes the server.
    pub fn protocol(&self, what: &str, msg: &str) -> HubError {
        HubError::Protocol {
            what: what.to_string(),
            msg: self.redact(msg),
        }
    }

    /// [`Http::send_with`], following every redirect.
    pub fn send(
        &self,
        what: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
        auth: bool,
    ) -> Result<ureq::Response, HubError> {
        self.send_with(what, method, url, headers, body, auth, Redirects::Follow)
    }

    /// Sends a request, retrying transient failures. `auth`: add the bearer token (only ever to
    /// the endpoint's origin; presigned URLs carry their own authorisation). `headers`: extra
    /// headers. Redirects are followed as `redirects` says; 307/308 repeat the method and body,
    /// 301/302/303 turn a POST into a GET, as browsers and `requests` do.
    #[allow(clippy::too_many_arguments)]
    pub fn send_with(
        &self,
        what: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
        auth: bool,
        redirects: Redirects,
    ) -> Result<ureq::Response, HubError> {
        let first = self.url(url);
        let mut wait = self.backoff;
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(8));
            }
            let mut url = first.clone();
            let mut method = method.to_string();
            let mut body = &body;
            let mut hops = 0;
            let res = loop {
                let mut req = self.agent.request(&method, &url);
                if auth && self.sends_token_to(&url) {
                    if let Some(t) = &self.token {
                        req = req.set("Authorization", &t.bearer());
                    }
                }
                for (k, v) in headers {
                    req = req.set(k, v);
                }
                let res = match body {
                    Body::None => req.call(),
                    Body::Json(v) => req.send_json(*v),
                    Body::Bytes(b, content_type) => {
                        req.set("Content-Type", content_type).send_bytes(b)
                    }
                };
                let r = match res {
                    Ok(r) if is_redirect(r.status()) => r,
                    other => break other,
                };
                let target = self.redirect_target(what, &url, &r)?;
                if redirects == Redirects::SameOrigin && !self.same_origin(&target) {
                    break Ok(r);
                }
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(
                        self.protocol(what, &format!("more than {MAX_REDIRECTS} redirects"))
                    );
                }
                if matches!(r.status(), 301..=303) && method != "GET" && method != "HEAD" {
                    method = "GET".into();
                    body = &Body::None;
                }
                url = target;
            };
            match res {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(status, r)) if status >= 500 || status == 429 => {
                    last = format!("{status} {}", self.error_message(r));
                }
                Err(ureq::Error::Status(status, r)) => {
                    return Err(HubError::Status {
                        what: what.to_string(),
                        status,
                        msg: self.error_message(r),
                    })
                }
                Err(ureq::Error::Transport(t)) => last = self.redact(&t.to_string()),
            }
        }
        Err(HubError::Transport {
            what: what.to_string(),
            msg: last,
            attempts: self.retries + 1,
        })
    }

    fn same_origin(&self, url: &str) -> bool {
        self.origin.is_some() && Url::parse(url).ok().as_ref().and_then(origin) == self.origin
    }

    /// A redirect's `Location`, resolved against the request's URL; an http(s) URL or an error.
    fn redirect_target(
        &self,
        what: &str,
        from: &str,
        r: &ureq::Response,
    ) -> Result<String, HubError> {
        let bad = |value: &str, expected: &str| HubError::Untrusted {
            field: format!("{what}: redirect Location"),
            value: self.redact(value),
            expected: expected.into(),
        };
        let location = r
            .header("Location")
            .ok_or_else(|| bad("", "a redirect names its target"))?;
        let base = Url::parse(from).map_err(|_| bad(from, "an http(s) URL"))?;
        let target = base
            .join(location)
            .map_err(|_| bad(location, "an http(s) URL"))?;
        if !matches!(target.scheme(), "http" | "https") || target.host_str().is_none() {
            return Err(bad(location, "an http(s) URL"));
        }
        Ok(target.to_string())
    }

    /// [`Http::send`] and parse the answer as JSON.
    pub fn json(
        &self,
        what: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<serde_json::Value, HubError> {
        let r = self.send(what, method, url, headers, body, true)?;
        self.read_json(what, r)
    }

    /// An answer's body as JSON, read up to a size limit.
    pub fn read_json(&self, what: &str, r: ureq::Response) -> Result<serde_json::Value, HubError> {
        let mut bytes = Vec::new();
        r.into_reader()
            .take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| HubError::Transport {
                what: what.to_string(),
                msg: self.redact(&e.to_string()),
                attempts: 1,
            })?;
        if bytes.len() as u64 > MAX_JSON_BYTES {
            return Err(self.protocol(what, &format!("answer longer than {MAX_JSON_BYTES} bytes")));
        }
        serde_json::from_slice(&bytes).map_err(|e| self.protocol(what, &format!("not JSON: {e}")))
    }

    /// The Hub's error text: `X-Error-Message`, else `{"error": ...}`, else the body; redacted.
    fn error_message(&self, r: ureq::Response) -> String {
        if let Some(m) = r.header("X-Error-Message") {
            return self.redact(m);
        }
        let mut text = String::new();
        let _ = r.into_reader().take(64 << 10).read_to_string(&mut text);
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| text.chars().take(300).collect());
        self.redact(&msg)
    }
}

fn agent(connect: Duration, read: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(connect)
        .timeout_read(read)
        // Redirects are followed by `send_with`, which decides where the token goes.
        .redirects(0)
        .user_agent(concat!("kindling/", env!("CARGO_PKG_VERSION")))
        .build()
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// What stays as it is in a URL path segment: RFC 3986's unreserved characters.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one URL path segment: a revision (`refs/pr/1` -> `refs%2Fpr%2F1`) or one
/// folder or file name of a repo path.
pub fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_only_to_the_endpoints_origin() {
        let http = Http::new(
            "https://hub.example/",
            Some(Token::new("hf_x")),
            0,
            Duration::ZERO,
        );
        assert!(http.sends_token_to("https://hub.example/api/models/a/b"));
        assert!(
            http.sends_token_to("https://HUB.example:443/x"),
            "default port, host case"
        );
        assert!(
            !http.sends_token_to("http://hub.example/x"),
            "another scheme"
        );
        assert!(
            !http.sends_token_to("https://hub.example:8443/x"),
            "another port"
        );
        assert!(
            !http.sends_token_to("https://cdn.example/x"),
            "another host"
        );
        assert!(!http.sends_token_to("https://hub.example.evil/x"));
        assert!(
            !http.sends_token_to("https://hub.example@evil/x"),
            "userinfo tricks"
        );
        let anonymous = Http::new("https://hub.example", None, 0, Duration::ZERO);
        assert!(!anonymous.sends_token_to("https://hub.example/x"));
    }

    #[test]
    fn revisions_are_one_path_segment() {
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_segment("v1.0_a-b~"), "v1.0_a-b~");
        assert_eq!(encode_segment("a b%#?"), "a%20b%25%23%3F");
    }
}
