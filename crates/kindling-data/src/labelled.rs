//! Labelled text for fine-tuning and probing: a table (TSV, CSV or JSONL, optionally gzip'd)
//! with one or more text columns and a label column, read into examples that remember their
//! line, so a bad row is reported as `file:line`.
//!
//! Labels are strings (`"4"`, `"positive"`); the classes come from the recipe or, when it names
//! none, from the training rows (numbers in numeric order, other labels sorted), and a class seen
//! only in the test rows is an error rather than a silent extra output.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{DataError, Result};

/// Where a table is and which columns to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// The file: `.tsv`, `.csv` or `.jsonl` (`.gz` after any of them is decompressed).
    pub path: PathBuf,
    /// `tsv`, `csv` or `jsonl`; unset: from the file name.
    #[serde(default)]
    pub format: Option<String>,
    /// Text columns, joined with a space in this order (empty cells are left out), e.g.
    /// `["title", "text"]`.
    pub text_columns: Vec<String>,
    pub label_column: String,
    /// A column naming each row's split (`train`, `test`); unset: every row is training data.
    #[serde(default)]
    pub split_column: Option<String>,
    /// The two text columns are a sentence pair (segment A, segment B), not one joined text:
    /// both cells must hold text.
    #[serde(default)]
    pub pair: bool,
}

/// What to do with a row that cannot be an example (no label, no text; in fine-tuning also a
/// split or a class the recipe does not know): `error` (the default) stops the run before
/// anything is written, naming `file:line`; `skip` leaves the row out and counts it, as
/// pandas' `on_bad_lines="skip"` and HF datasets' `filter` let users do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    #[default]
    Error,
    Skip,
}

/// One row left out under [`OnInvalid::Skip`]: its line and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkippedRow {
    pub line: u64,
    pub why: String,
}

/// The rows left out of a table: how many, and the first few (for the log, the model card and
/// test_results.json).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Skipped {
    pub count: usize,
    pub first: Vec<SkippedRow>,
}

impl Skipped {
    /// How many rows are named; the rest are only counted.
    pub const NAMED: usize = 5;

    pub fn push(&mut self, line: u64, why: String) {
        self.count += 1;
        if self.first.len() < Self::NAMED {
            self.first.push(SkippedRow { line, why });
        }
    }

    /// `"3 invalid rows skipped (f.tsv:4: missing label ...; ...)"`, or None when none were.
    pub fn summary(&self, path: &Path) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        let named: Vec<String> = self
            .first
            .iter()
            .map(|r| format!("{}:{}: {}", path.display(), r.line, r.why))
            .collect();
        let more = if self.count > self.first.len() {
            format!("; {} more", self.count - self.first.len())
        } else {
            String::new()
        };
        Some(format!(
            "{} invalid row{} skipped ({}{more})",
            self.count,
            if self.count == 1 { "" } else { "s" },
            named.join("; ")
        ))
    }
}

/// One row: its text, its label as written, its split, and its line in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    /// Segment B of a sentence pair ([`TableSpec::pair`]).
    pub text_pair: Option<String>,
    pub label: String,
    pub split: Option<String>,
    pub line: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Tsv,
    Csv,
    Jsonl,
}

fn format_of(path: &Path, format: Option<&str>) -> Result<Format> {
    let name = match format {
        Some(f) => f.to_ascii_lowercase(),
        None => {
            let file = path.to_string_lossy().to_ascii_lowercase();
            let file = file.strip_suffix(".gz").unwrap_or(&file).to_string();
            file.rsplit('.').next().unwrap_or_default().to_string()
        }
    };
    match name.as_str() {
        "tsv" | "tab" => Ok(Format::Tsv),
        "csv" => Ok(Format::Csv),
        "jsonl" | "ndjson" | "json" => Ok(Format::Jsonl),
        other => Err(DataError::Table {
            path: path.to_path_buf(),
            msg: format!(
                "unknown table format `{other}`: expected tsv, csv or jsonl (set data.format)"
            ),
        }),
    }
}

/// One row of a table: the cells of the requested columns, in the order asked (an empty cell,
/// or a JSON null, is ""), and the row's line in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub line: u64,
    pub cells: Vec<String>,
}

/// Reads the `columns` of every row of a TSV, CSV or JSONL table (`format`: unset = from the
/// file name; `.gz` is decompressed). A column the header lacks is an error naming the columns
/// the file has; a malformed row is an error naming its line.
pub fn read_table(path: &Path, format: Option<&str>, columns: &[String]) -> Result<Vec<Row>> {
    let bytes = crate::read_maybe_gz(path)?;
    let rows = match format_of(path, format)? {
        Format::Jsonl => read_jsonl(path, &bytes, columns)?,
        f => read_delimited(
            path,
            &bytes,
            if f == Format::Tsv { b'\t' } else { b',' },
            columns,
        )?,
    };
    if rows.is_empty() {
        return Err(DataError::Table {
            path: path.to_path_buf(),
            msg: "no rows".into(),
        });
    }
    Ok(rows)
}

/// Reads every row of the table. A row without a label, or without any text, is an error
/// naming its line; so is a missing column (naming the columns the file has).
pub fn read_examples(spec: &TableSpec) -> Result<Vec<Example>> {
    read_examples_with(spec, OnInvalid::Error, &mut Skipped::default())
}

/// [`read_examples`], where under [`OnInvalid::Skip`] a row without a label or text is left
/// out and recorded in `skipped` instead. A malformed file or a missing column is an error
/// either way.
pub fn read_examples_with(
    spec: &TableSpec,
    on_invalid: OnInvalid,
    skipped: &mut Skipped,
) -> Result<Vec<Example>> {
    if spec.text_columns.is_empty() {
        return Err(DataError::Table {
            path: spec.path.clone(),
            msg: "data.text_columns is empty: name at least one text column".into(),
        });
    }
    if spec.pair && spec.text_columns.len() != 2 {
        return Err(DataError::Table {
            path: spec.path.clone(),
            msg: format!(
                "a sentence pair takes two text columns, got {:?}",
                spec.text_columns
            ),
        });
    }
    let mut columns = spec.text_columns.clone();
    columns.push(spec.label_column.clone());
    columns.extend(spec.split_column.iter().cloned());
    let rows = read_table(&spec.path, spec.format.as_deref(), &columns)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        match (example(spec, r), on_invalid) {
            (Ok(e), _) => out.push(e),
            (Err(DataError::Row { line, msg, .. }), OnInvalid::Skip) => skipped.push(line, msg),
            (Err(e), _) => return Err(e),
        }
    }
    Ok(out)
}

/// Builds an example from a row read with the columns text..., label[, split].
fn example(spec: &TableSpec, row: &Row) -> Result<Example> {
    let row_err = |msg: String| DataError::Row {
        path: spec.path.clone(),
        line: row.line,
        msg,
    };
    let n = spec.text_columns.len();
    let label = row.cells[n].trim();
    if label.is_empty() {
        return Err(row_err(format!(
            "missing label (column `{}` is empty)",
            spec.label_column
        )));
    }
    if spec.pair {
        let cell = |i: usize| {
            let t = row.cells[i].trim();
            if t.is_empty() {
                Err(row_err(format!(
                    "no text in column `{}` (segment {} of the pair)",
                    spec.text_columns[i],
                    ["A", "B"][i]
                )))
            } else {
                Ok(t.to_string())
            }
        };
        return Ok(Example {
            text: cell(0)?,
            text_pair: Some(cell(1)?),
            label: label.to_string(),
            split: row.cells.get(n + 1).map(|s| s.trim().to_string()),
            line: row.line,
        });
    }
    let parts: Vec<&str> = row.cells[..n]
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        return Err(row_err(format!(
            "no text (columns {:?} are all empty)",
            spec.text_columns
        )));
    }
    Ok(Example {
        text: parts.join(" "),
        text_pair: None,
        label: label.to_string(),
        split: row.cells.get(n + 1).map(|s| s.trim().to_string()),
        line: row.line,
    })
}

fn read_delimited(
    path: &Path,
    bytes: &[u8],
    delimiter: u8,
    columns: &[String],
) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(bytes);
    let table_err = |msg: String| DataError::Table {
        path: path.to_path_buf(),
        msg,
    };
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| table_err(format!("cannot read the header line: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let idx: Vec<usize> = columns
        .iter()
        .map(|name| {
            header.iter().position(|h| h == name).ok_or_else(|| {
                table_err(format!(
                    "no column `{name}` in the header (columns: {})",
                    header.join(", ")
                ))
            })
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            DataError::Row {
                path: path.to_path_buf(),
                line,
                msg: format!("malformed row: {e}"),
            }
        })?;
        out.push(Row {
            line: record.position().map(|p| p.line()).unwrap_or(0),
            cells: idx
                .iter()
                .map(|&i| record.get(i).unwrap_or_default().to_string())
                .collect(),
        });
    }
    Ok(out)
}

fn read_jsonl(path: &Path, bytes: &[u8], columns: &[String]) -> Result<Vec<Row>> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.valid_up_to(),
    })?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i as u64 + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let not_object = |msg: String| DataError::Row {
            path: path.to_path_buf(),
            line,
            msg,
        };
        let value: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| not_object(format!("not a JSON object: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| not_object("not a JSON object".into()))?;
        out.push(Row {
            line,
            cells: columns
                .iter()
                .map(|name| match obj.get(name) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Null) | None => String::new(),
                    Some(v) => v.to_string(),
                })
                .collect(),
        });
    }
    Ok(out)
}

/// The classes of a task, in output order (index = the classifier's output unit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelSet {
    pub names: Vec<String>,
}

impl LabelSet {
    /// The classes of `examples`: numbers in numeric order (`"1" .. "5"`), otherwise sorted.
    pub fn infer<'a>(examples: impl IntoIterator<Item = &'a Example>) -> Self {
        let mut names: Vec<String> = examples.into_iter().map(|e| e.label.clone()).collect();
        names.sort();
        names.dedup();
        if names.iter().all(|n| n.parse::<f64>().is_ok()) {
            names.sort_by(|a, b| {
                a.parse::<f64>()
                    .unwrap()
                    .total_cmp(&b.parse::<f64>().unwrap())
            });
        }
        LabelSet { names }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The class index of each example; a label outside the set is an error naming its line.
    pub fn encode(&self, examples: &[Example], path: &Path) -> Result<Vec<u32>> {
        examples
            .iter()
            .map(|e| {
                self.names
                    .iter()
                    .position(|n| *n == e.label)
                    .map(|i| i as u32)
                    .ok_or_else(|| DataError::Row {
                        path: path.to_path_buf(),
                        line: e.line,
                        msg: format!(
                            "unknown class `{}` (the classes are {:?})",
                            e.label, self.names
                        ),
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &Path) -> TableSpec {
        TableSpec {
            path: path.to_path_buf(),
            format: None,
            text_columns: vec!["title".into(), "text".into()],
            label_column: "label".into(),
            split_column: Some("split".into()),
            pair: false,
        }
    }

    #[test]
    fn tsv_rows_join_text_columns_and_keep_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.tsv");
        std::fs::write(
            &p,
            "split\ttitle\ttext\tlabel\ntrain\tGreat\tlovely dress\t5\ntest\t\tshort \"quoted\" text\t2\n",
        )
        .unwrap();
        let rows = read_examples(&spec(&p)).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].text, "Great lovely dress");
        assert_eq!(rows[0].split.as_deref(), Some("train"));
        assert_eq!(rows[1].text, "short \"quoted\" text");
        assert_eq!((rows[0].line, rows[1].line), (2, 3));
    }

    #[test]
    fn a_pair_keeps_its_two_segments_and_names_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.tsv");
        std::fs::write(
            &p,
            "split\ttitle\ttext\tlabel\ntrain\tGreat\tlovely dress\t5\ntest\t\tno title\t2\n",
        )
        .unwrap();
        let mut s = spec(&p);
        s.pair = true;
        let err = read_examples(&s).unwrap_err().to_string();
        assert!(
            err.contains("t.tsv:3") && err.contains("no text in column `title`"),
            "{err}"
        );
        let mut skipped = Skipped::default();
        let rows = read_examples_with(&s, OnInvalid::Skip, &mut skipped).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].text.as_str(), rows[0].text_pair.as_deref()),
            ("Great", Some("lovely dress"))
        );
        assert_eq!(skipped.count, 1);
        s.text_columns.push("label".into());
        let err = read_examples(&s).unwrap_err().to_string();
        assert!(err.contains("two text columns"), "{err}");
    }

    #[test]
    fn read_table_returns_the_asked_columns_of_tsv_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let tsv = dir.path().join("t.tsv");
        std::fs::write(&tsv, "a\tb\tc\n1\t\t3\n4\t5\t6\n").unwrap();
        let cols = vec!["c".to_string(), "b".to_string()];
        let rows = read_table(&tsv, None, &cols).unwrap();
        assert_eq!(rows[0].cells, vec!["3", ""]);
        assert_eq!(
            (rows[1].line, rows[1].cells.clone()),
            (3, vec!["6".into(), "5".into()])
        );
        let jsonl = dir.path().join("t.jsonl");
        std::fs::write(
            &jsonl,
            "{\"b\": null, \"c\": 3}\n\n{\"b\": \"x\", \"c\": \"y\"}\n",
        )
        .unwrap();
        let rows = read_table(&jsonl, None, &cols).unwrap();
        assert_eq!(rows[0].cells, vec!["3", ""]);
        assert_eq!(
            (rows[1].line, rows[1].cells.clone()),
            (3, vec!["y".into(), "x".into()])
        );
        let err = read_table(&tsv, None, &["d".to_string()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no column `d`") && err.contains("a, b, c"),
            "{err}"
        );
    }

    #[test]
    fn missing_label_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "split,title,text,label\ntrain,a,b,1\ntrain,c,d,\n").unwrap();
        let err = read_examples(&spec(&p)).unwrap_err().to_string();
        assert!(
            err.contains("t.csv:3") && err.contains("missing label"),
            "{err}"
        );
    }

    #[test]
    fn missing_column_lists_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "split,title,body,label\ntrain,a,b,1\n").unwrap();
        let err = read_examples(&spec(&p)).unwrap_err().to_string();
        assert!(
            err.contains("no column `text`") && err.contains("body"),
            "{err}"
        );
    }

    #[test]
    fn jsonl_numbers_as_labels_and_bad_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(
            &p,
            "{\"title\": \"x\", \"text\": \"y\", \"label\": 3}\n\n{\"text\": \"z\", \"label\": 1}\n",
        )
        .unwrap();
        let mut s = spec(&p);
        s.split_column = None;
        let rows = read_examples(&s).unwrap();
        assert_eq!(rows[0].label, "3");
        assert_eq!(rows[1].text, "z");
        assert_eq!(rows[1].line, 3);
        std::fs::write(&p, "{\"text\": \"y\", \"label\": 3}\n{oops\n").unwrap();
        let err = read_examples(&s).unwrap_err().to_string();
        assert!(err.contains("t.jsonl:2"), "{err}");
    }

    #[test]
    fn labels_sort_numerically_and_unknown_class_names_the_line() {
        let ex = |label: &str, line| Example {
            text: "t".into(),
            text_pair: None,
            label: label.into(),
            split: None,
            line,
        };
        let train = [ex("10", 2), ex("9", 3), ex("10", 4)];
        let set = LabelSet::infer(&train);
        assert_eq!(set.names, ["9", "10"]);
        assert_eq!(set.encode(&train, Path::new("f")).unwrap(), [1, 0, 1]);
        let err = set
            .encode(&[ex("7", 12)], Path::new("f.tsv"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.tsv:12") && err.contains("unknown class `7`"),
            "{err}"
        );
    }
}
