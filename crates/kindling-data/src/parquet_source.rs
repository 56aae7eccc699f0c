//! Parquet sources (the format HF datasets stores its shards in): one text column, read row
//! group by row group through the record API, so memory stays bounded by a row group.

use std::fs::File;
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;

use crate::error::{DataError, Result};

/// Calls `f` with the string in column `column` of every row (nulls and empty strings skipped).
pub fn for_each_text(
    path: &Path,
    column: &str,
    f: &mut dyn FnMut(String) -> Result<()>,
) -> Result<()> {
    let bad = |msg: String| DataError::Table {
        path: path.to_path_buf(),
        msg,
    };
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| bad(format!("not a parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let names: Vec<String> = schema
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    if !names.iter().any(|n| n == column) {
        return Err(bad(format!(
            "no column `{column}` (columns: {}; set data.prepare.text_field)",
            names.join(", ")
        )));
    }
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| bad(format!("cannot read rows: {e}")))?;
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
        for (name, field) in row.get_column_iter() {
            if name != column {
                continue;
            }
            match field {
                Field::Str(s) if !s.trim().is_empty() => f(s.clone())?,
                Field::Str(_) | Field::Null => {}
                other => {
                    return Err(bad(format!(
                        "row {i}: column `{column}` holds {other}, expected a string"
                    )))
                }
            }
        }
    }
    Ok(())
}
