//! Reading a text corpus: glob patterns, plain or gzip'd files, strict UTF-8.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// One source file, decoded.
#[derive(Debug, Clone)]
pub struct Document {
    pub path: PathBuf,
    pub text: String,
}

impl Document {
    /// Paragraphs (text between blank lines), with inner line breaks turned into spaces.
    /// Tokenising paragraph by paragraph gives the same word pieces as the whole text (the
    /// pre-tokeniser splits on whitespace anyway) while letting rayon share out the work.
    pub fn paragraphs(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for line in self.text.lines() {
            let line = line.trim();
            if line.is_empty() {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            } else {
                if !cur.is_empty() {
                    cur.push(' ');
                }
                cur.push_str(line);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// The sentences of every paragraph (Unicode sentence boundaries, UAX #29), trimmed, those
    /// of fewer than `min_words` words left out (chapter headings, "CHAPTER I."). UAX #29 knows
    /// no abbreviations: "Mr. Bennet came" splits after "Mr.", and that one-word piece is then
    /// dropped as too short.
    pub fn sentences(&self, min_words: usize) -> Vec<String> {
        use unicode_segmentation::UnicodeSegmentation;
        self.paragraphs()
            .iter()
            .flat_map(|p| {
                p.unicode_sentences()
                    .map(str::trim)
                    .filter(|s| s.unicode_words().count() >= min_words)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The files the glob `patterns` match (relative ones against `base`): patterns in the order
/// given, files sorted within a pattern. A pattern matching no file is an error naming it.
pub fn resolve_patterns(patterns: &[String], base: &Path) -> Result<Vec<PathBuf>> {
    if patterns.is_empty() {
        return Err(DataError::EmptyCorpus {
            what: "no corpus patterns were given (data.corpus)".into(),
        });
    }
    let mut out = Vec::new();
    for pattern in patterns {
        let full = if Path::new(pattern).is_absolute() {
            pattern.clone()
        } else {
            base.join(pattern).to_string_lossy().into_owned()
        };
        let paths = glob::glob(&full).map_err(|e| DataError::BadPattern {
            pattern: pattern.clone(),
            msg: e.to_string(),
        })?;
        let mut paths: Vec<PathBuf> = paths
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file())
            .collect();
        if paths.is_empty() {
            return Err(DataError::NoFiles { pattern: full });
        }
        paths.sort();
        out.extend(paths);
    }
    Ok(out)
}

/// The documents of a corpus, in a fixed order: patterns in the order given, files sorted by
/// path within a pattern. The order matters: it fixes packing and the held-out tail.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub documents: Vec<Document>,
}

impl Corpus {
    /// Reads every file matched by the glob `patterns`, resolved against `base` when relative.
    pub fn from_patterns(patterns: &[String], base: &Path) -> Result<Self> {
        let documents = resolve_patterns(patterns, base)?
            .iter()
            .map(|p| read_document(p))
            .collect::<Result<Vec<_>>>()?;
        let corpus = Corpus { documents };
        if corpus.documents.iter().all(|d| d.text.trim().is_empty()) {
            return Err(DataError::EmptyCorpus {
                what: format!(
                    "all {} files matched by {:?} are empty",
                    corpus.documents.len(),
                    patterns
                ),
            });
        }
        Ok(corpus)
    }

    pub fn total_bytes(&self) -> usize {
        self.documents.iter().map(|d| d.text.len()).sum()
    }
}

/// Reads one file; `.gz` files are decompressed. Invalid UTF-8 is an error naming the byte offset.
pub fn read_document(path: &Path) -> Result<Document> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::with_capacity(raw.len() * 3);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::io(path, e))?;
        out
    } else {
        raw
    };
    let text = String::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    Ok(Document {
        path: path.to_path_buf(),
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_names_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.txt");
        std::fs::write(&p, b"hello \xff world").unwrap();
        let err = read_document(&p).unwrap_err().to_string();
        assert!(err.contains("bad.txt") && err.contains("offset 6"), "{err}");
    }

    #[test]
    fn pattern_matching_nothing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Corpus::from_patterns(&["nothing/*.txt".into()], dir.path()).unwrap_err();
        assert!(err.to_string().contains("matched no files"), "{err}");
    }

    #[test]
    fn paragraphs_join_lines_and_split_on_blank_lines() {
        let d = Document {
            path: "x".into(),
            text: "a b\nc\n\n\nd\n".into(),
        };
        assert_eq!(d.paragraphs(), vec!["a b c".to_string(), "d".to_string()]);
    }

    #[test]
    fn sentences_split_paragraphs_and_drop_short_ones() {
        let d = Document {
            path: "x".into(),
            text: "CHAPTER I.\n\nIt is a truth universally\nacknowledged. Her father said nothing!\nOk.\n"
                .into(),
        };
        assert_eq!(
            d.sentences(3),
            vec![
                "It is a truth universally acknowledged.".to_string(),
                "Her father said nothing!".to_string()
            ]
        );
    }
}
