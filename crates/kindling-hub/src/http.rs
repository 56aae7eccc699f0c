//! HTTP with the Hub's conventions: bearer auth, errors read from `X-Error-Message` or a JSON
//! `{"error": ...}` body, and retries with exponential backoff on 5xx, 429 and dropped
//! connections (what huggingface_hub's `http_backoff` retries).

use std::time::Duration;

use crate::{HubError, Token};

/// A client for one endpoint.
pub struct Http {
    agent: ureq::Agent,
    pub endpoint: String,
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

impl Http {
    pub fn new(endpoint: &str, token: Option<Token>, retries: u32, backoff: Duration) -> Self {
        Http {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(20))
                .timeout_read(Duration::from_secs(300))
                .user_agent(concat!("kindling/", env!("CARGO_PKG_VERSION")))
                .build(),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            retries,
            backoff,
        }
    }

    /// `url` relative to the endpoint (starting with `/`) or absolute.
    pub fn url(&self, url: &str) -> String {
        if url.starts_with("http://") || url.starts_with("https://") {
            url.to_string()
        } else {
            format!("{}{url}", self.endpoint)
        }
    }

    /// Sends a request, retrying transient failures. `auth`: add the bearer token (not for
    /// presigned upload URLs, which carry their own authorisation). `headers`: extra headers.
    pub fn send(
        &self,
        what: &str,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Body,
        auth: bool,
    ) -> Result<ureq::Response, HubError> {
        let url = self.url(url);
        let mut wait = self.backoff;
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(8));
            }
            let mut req = self.agent.request(method, &url);
            if auth {
                if let Some(t) = &self.token {
                    req = req.set("Authorization", &t.bearer());
                }
            }
            for (k, v) in headers {
                req = req.set(k, v);
            }
            let res = match &body {
                Body::None => req.call(),
                Body::Json(v) => req.send_json(*v),
                Body::Bytes(b, content_type) => req.set("Content-Type", content_type).send_bytes(b),
            };
            match res {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(status, r)) if status >= 500 || status == 429 => {
                    last = format!("{status} {}", error_message(r));
                }
                Err(ureq::Error::Status(status, r)) => {
                    return Err(HubError::Status {
                        what: what.to_string(),
                        status,
                        msg: error_message(r),
                    })
                }
                Err(ureq::Error::Transport(t)) => last = t.to_string(),
            }
        }
        Err(HubError::Transport {
            what: what.to_string(),
            msg: last,
            attempts: self.retries + 1,
        })
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
        r.into_json().map_err(|e| HubError::Protocol {
            what: what.to_string(),
            msg: format!("not JSON: {e}"),
        })
    }
}

/// The Hub's error text: `X-Error-Message`, else `{"error": ...}`, else the body.
fn error_message(r: ureq::Response) -> String {
    if let Some(m) = r.header("X-Error-Message") {
        return m.to_string();
    }
    let text = r.into_string().unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| text.chars().take(300).collect())
}
