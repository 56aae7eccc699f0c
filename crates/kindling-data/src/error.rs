use std::path::PathBuf;

/// Everything that can go wrong between a corpus on disk and a batch of self-labels.
/// Each variant carries the values a user needs to fix the input.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("corpus pattern `{pattern}` matched no files")]
    NoFiles { pattern: String },
    #[error("bad corpus pattern `{pattern}`: {msg}")]
    BadPattern { pattern: String, msg: String },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid UTF-8: invalid byte at offset {offset} (of the decompressed text)", path.display())]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("the corpus is empty: {what}")]
    EmptyCorpus { what: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("tokenizer {}: {msg}", path.display())]
    TokenizerFile { path: PathBuf, msg: String },
    #[error("{}:{line}: {msg}", path.display())]
    Row {
        path: PathBuf,
        /// 1-based line of the file (the header is line 1 in TSV/CSV).
        line: u64,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    Table { path: PathBuf, msg: String },
    #[error("invalid data setting `{key}`: {msg}")]
    Config { key: &'static str, msg: String },
}

pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}
