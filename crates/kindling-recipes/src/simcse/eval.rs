//! Retrieval evaluation: query and document batches, recall@k and MRR.

#[allow(unused_imports)]
use super::*;

/// The retrieval set as eval batches: queries as anchors, docs as positives (keys distinct per
/// row, so the eval loss is title -> text InfoNCE within each batch).
pub fn retrieval_batches(
    r: &Retrieval,
    tokenizer: &Tokenizer,
    max_length: usize,
    batch_size: usize,
) -> Result<(Vec<SimcseBatch>, usize), RecipeError> {
    let mut columns = vec![r.query_column.clone(), r.doc_column.clone()];
    columns.extend(r.split_column.iter().cloned());
    let rows = read_table(&r.table, r.format.as_deref(), &columns)?;
    let mut pairs: Vec<[Option<String>; 3]> = rows
        .into_iter()
        .filter(|row| r.split_column.is_none() || row.cells[2].trim() == r.split)
        .filter(|row| !row.cells[0].trim().is_empty() && !row.cells[1].trim().is_empty())
        .map(|row| {
            [
                Some(row.cells[0].trim().to_string()),
                Some(row.cells[1].trim().to_string()),
                None,
            ]
        })
        .collect();
    if r.max_rows > 0 {
        pairs.truncate(r.max_rows);
    }
    if pairs.len() < 2 {
        return Err(RecipeError::Invalid {
            key: "eval.retrieval".into(),
            msg: format!(
                "{}: {} rows with both `{}` and `{}` in split `{}`; retrieval needs at least 2",
                r.table.display(),
                pairs.len(),
                r.query_column,
                r.doc_column,
                r.split
            ),
        });
    }
    let mut examples = encode_examples(&pairs, tokenizer, max_length)?;
    // Keys by row, not by text: two rows with the same title are still two queries.
    for (i, e) in examples.iter_mut().enumerate() {
        e.keys = [2 * i as u64, 2 * i as u64 + 1, 0];
    }
    let n = examples.len();
    let batches = examples
        .chunks(batch_size.max(2))
        .enumerate()
        .map(|(k, c)| {
            let refs: Vec<&Example> = c.iter().collect();
            SimcseBatch::from_examples(
                &refs,
                Cursor {
                    epoch: 0,
                    position: k as u64,
                },
            )
        })
        .collect();
    Ok((batches, n))
}
