//! Evaluation batches: the retrieval set (queries as anchors, their documents as positives)
//! and the STS pairs (first sentences as anchors, second as positives), whose embeddings the
//! objective collects for `finish_eval`.

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
    let batches = pair_batches(&r.read()?, tokenizer, max_length, batch_size, false)?;
    let n = batches.iter().map(|b| b.n).sum();
    Ok((batches, n))
}

/// The STS pairs as eval batches (after the retrieval batches: `first` is their count), and
/// the gold scores in row order.
pub fn sts_batches(
    s: &Sts,
    tokenizer: &Tokenizer,
    max_length: usize,
    batch_size: usize,
    first: usize,
) -> Result<(Vec<SimcseBatch>, Vec<f64>), RecipeError> {
    let (pairs, gold) = s.read()?;
    let mut batches = pair_batches(&pairs, tokenizer, max_length, batch_size, true)?;
    for b in &mut batches {
        b.cursor_after.position += first as u64;
    }
    Ok((batches, gold))
}

fn pair_batches(
    pairs: &[[String; 2]],
    tokenizer: &Tokenizer,
    max_length: usize,
    batch_size: usize,
    sts: bool,
) -> Result<Vec<SimcseBatch>, RecipeError> {
    let texts: Vec<[Option<String>; 3]> = pairs
        .iter()
        .map(|[a, b]| [Some(a.clone()), Some(b.clone()), None])
        .collect();
    let mut examples = encode_examples(&texts, tokenizer, max_length)?;
    // Keys by row, not by text: two rows with the same title are still two queries.
    for (i, e) in examples.iter_mut().enumerate() {
        e.keys = [2 * i as u64, 2 * i as u64 + 1, 0];
    }
    Ok(examples
        .chunks(batch_size.max(2))
        .enumerate()
        .map(|(k, c)| {
            let refs: Vec<&Example> = c.iter().collect();
            let mut b = SimcseBatch::from_examples(
                &refs,
                Cursor {
                    epoch: 0,
                    position: k as u64,
                },
            );
            b.sts = sts;
            b
        })
        .collect())
}
