//! Token, endpoint and cache folder, found where the official client (`huggingface_hub`) looks.

use std::path::PathBuf;

use crate::HubError;

/// A Hub access token. Its `Debug` and `Display` print `hf_***`, so it cannot leak through a log
/// line or an error message; only [`Token::bearer`] exposes it, for the `Authorization` header.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(secret: impl Into<String>) -> Self {
        Token(secret.into().trim().to_string())
    }

    /// The `Authorization` header value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(hf_***)")
    }
}

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hf_***")
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn home() -> Option<PathBuf> {
    env("HOME").map(PathBuf::from)
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> Option<PathBuf> {
    env("HF_HOME").map(PathBuf::from).or_else(|| {
        env("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| home().map(|h| h.join(".cache")))
            .map(|c| c.join("huggingface"))
    })
}

/// The token: `HF_TOKEN`, else the file `HF_TOKEN_PATH` names, else `$HF_HOME/token`; None when
/// none is set (public downloads need none).
pub fn token() -> Result<Option<Token>, HubError> {
    if let Some(t) = env("HF_TOKEN") {
        return Ok(Some(Token::new(t)));
    }
    let path = match env("HF_TOKEN_PATH") {
        Some(p) => PathBuf::from(p),
        None => match hf_home() {
            Some(h) => h.join("token"),
            None => return Ok(None),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(Token::new(t))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HubError::Io { path, source }),
    }
}

/// `HF_ENDPOINT`, else `https://huggingface.co`, without a trailing slash.
pub fn endpoint() -> String {
    env("HF_ENDPOINT")
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

/// The hub cache: `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `$HF_HOME/hub`,
/// `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`, in that order (as Python).
pub fn cache_dir() -> PathBuf {
    env("HF_HUB_CACHE")
        .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("hub")))
        .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"))
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only.
pub fn offline() -> bool {
    env("HF_HUB_OFFLINE")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// `text` from a server made fit to print or store: `token` (and anything else shaped like a
/// Hub token, `hf_` and 8 or more letters or digits) becomes `hf_***`, and control characters
/// other than newline and tab are dropped, so that an echoed header cannot leak the secret and
/// an error body cannot move the terminal's cursor. A reflecting proxy or an error page that
/// quotes the request's `Authorization` header is the case this is for.
pub fn redact(text: &str, token: Option<&Token>) -> String {
    let mut text = text.to_string();
    if let Some(t) = token.filter(|t| !t.0.is_empty()) {
        text = text.replace(&t.0, "hf_***");
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("hf_") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 3..];
        let n = tail
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(tail.len());
        out.push_str("hf_");
        if n >= 8 {
            out.push_str("***");
            rest = &tail[n..];
        } else {
            rest = tail;
        }
    }
    out.push_str(rest);
    out.retain(|c| !c.is_control() || c == '\n' || c == '\t');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_is_redacted_before_it_is_shown() {
        let t = Token::new("hf_kindling_test_secret_4242");
        let echoed = "403: request had Authorization: Bearer hf_kindling_test_secret_4242, \
                      X-Other: hf_AbCdEfGh12345678 hf_hub hf_"
            .to_string();
        assert_eq!(
            redact(&echoed, Some(&t)),
            "403: request had Authorization: Bearer hf_***, X-Other: hf_*** hf_hub hf_"
        );
        assert_eq!(redact("a\x1b[2Jb\r\nc\td", None), "a[2Jb\nc\td");
    }

    #[test]
    fn a_token_never_formats_its_secret() {
        let t = Token::new("hf_secretvalue123\n");
        assert_eq!(format!("{t} {t:?}"), "hf_*** Token(hf_***)");
        assert_eq!(t.bearer(), "Bearer hf_secretvalue123");
    }
}
