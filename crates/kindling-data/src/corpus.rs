//! Reading a text corpus: glob patterns, plain or gzip'd files, strict UTF-8; and text columns
//! of tables (a review per row), so a model can be pretrained on the text of a labelled
//! dataset's training split without its labels (domain-adaptive pretraining).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// Text columns of a table read as corpus text: each row becomes one paragraph (its columns
/// joined with a space, empty cells left out), and a table one document. With `split_column`
/// and `split`, only the rows of that split are read: pretraining on a labelled dataset's
/// `train` rows never sees its test text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextTable {
    /// `.tsv`, `.csv` or `.jsonl`, optionally `.gz`; relative to the working directory.
    pub path: PathBuf,
    /// `tsv`, `csv` or `jsonl`; unset: from the file name.
    #[serde(default)]
    pub format: Option<String>,
    pub text_columns: Vec<String>,
    #[serde(default)]
    pub split_column: Option<String>,
    /// The split to read (e.g. `train`); needs `split_column`.
    #[serde(default)]
    pub split: Option<String>,
}

impl TextTable {
    /// The table as one document, a paragraph per row of the chosen split.
    pub fn read(&self, base: &Path) -> Result<Document> {
        let path = if self.path.is_absolute() {
            self.path.clone()
        } else {
            base.join(&self.path)
        };
        let bad = |msg: String| DataError::Table {
            path: path.clone(),
            msg,
        };
        if self.text_columns.is_empty() {
            return Err(bad("text_columns is empty: name the columns to read".into()));
        }
        let split = match (&self.split_column, &self.split) {
            (Some(c), Some(s)) => Some((c, s)),
            (None, None) => None,
            (Some(c), None) => {
                return Err(bad(format!(
                    "split_column = \"{c}\" needs split = \"...\" (the rows to read)"
                )))
            }
            (None, Some(s)) => {
                return Err(bad(format!(
                    "split = \"{s}\" needs split_column (the column naming each row's split)"
                )))
            }
        };
        let n = self.text_columns.len();
        let mut columns = self.text_columns.clone();
        columns.extend(split.map(|(c, _)| c.clone()));
        let rows = crate::labelled::read_table(&path, self.format.as_deref(), &columns)?;
        let mut text = String::new();
        let mut kept = 0usize;
        for row in &rows {
            if split.is_some_and(|(_, s)| row.cells[n].trim() != s.as_str()) {
                continue;
            }
            // The cells' words joined by single spaces: a line break inside a cell would
            // otherwise split the row into paragraphs, and empty cells drop out.
            let words: Vec<&str> = row.cells[..n]
                .iter()
                .flat_map(|c| c.split_whitespace())
                .collect();
            let paragraph = words.join(" ");
            if !paragraph.is_empty() {
                text.push_str(&paragraph);
                text.push_str("\n\n");
                kept += 1;
            }
        }
        if kept == 0 {
            return Err(bad(match split {
                Some((c, s)) => format!("no row with text has {c} = \"{s}\""),
                None => "no row has text in the text columns".into(),
            }));
        }
        Ok(Document { path, text })
    }
}

impl Corpus {
    /// Reads every file matched by the glob `patterns`, resolved against `base` when relative.
    pub fn from_patterns(patterns: &[String], base: &Path) -> Result<Self> {
        Self::from_sources(patterns, &[], base)
    }

    /// The files of `patterns` (none is fine when `tables` are given), then one document per
    /// table, in the order given.
    pub fn from_sources(patterns: &[String], tables: &[TextTable], base: &Path) -> Result<Self> {
        let mut documents = if patterns.is_empty() && !tables.is_empty() {
            Vec::new()
        } else {
            resolve_patterns(patterns, base)?
                .iter()
                .map(|p| read_document(p))
                .collect::<Result<Vec<_>>>()?
        };
        for t in tables {
            documents.push(t.read(base)?);
        }
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
    fn a_table_gives_one_paragraph_per_row_of_its_split() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("t.tsv"),
            "split\ttitle\ttext\tlabel\ntrain\tNice\tFits  well\t5\ntest\tSecret\tNever seen\t1\n\
             train\t\tToo small\t2\ntrain\t\t\t3\n",
        )
        .unwrap();
        let table = TextTable {
            path: "t.tsv".into(),
            format: None,
            text_columns: vec!["title".into(), "text".into()],
            split_column: Some("split".into()),
            split: Some("train".into()),
        };
        let corpus = Corpus::from_sources(&[], &[table.clone()], dir.path()).unwrap();
        assert_eq!(corpus.documents.len(), 1);
        assert_eq!(
            corpus.documents[0].paragraphs(),
            vec!["Nice Fits well".to_string(), "Too small".to_string()]
        );
        // Every row, without the split filter.
        let all = TextTable {
            split_column: None,
            split: None,
            ..table.clone()
        };
        let doc = all.read(dir.path()).unwrap();
        assert!(doc.text.contains("Secret Never seen"), "{}", doc.text);
        // A split no row has, or a split without its column, is an error naming the file.
        let none = TextTable {
            split: Some("validation".into()),
            ..table.clone()
        };
        let err = none.read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("t.tsv") && err.contains("validation"), "{err}");
        let half = TextTable {
            split_column: None,
            ..table
        };
        let err = half.read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("needs split_column"), "{err}");
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
