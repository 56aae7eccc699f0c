//! SimCSE's unit tests.
use super::*;
use kindling_models::bert::{BertConfig, BertModel};
use kindling_models::init::hf_init;

fn tiny_model(dropout: f64) -> (BertModel, VarMap) {
    let config: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 32,
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
        "max_position_embeddings": 32
    }))
    .unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = BertModel::load(vb, &config).unwrap();
    hf_init(&varmap, 3, 0.02, Some(0)).unwrap();
    (model, varmap)
}

/// Six examples of 3-9 tokens; examples 1 and 4 are the same sentence.
fn examples() -> Vec<Example> {
    (0..6u32)
        .map(|i| {
            let j = if i == 4 { 1 } else { i };
            let ids: Vec<u32> = std::iter::once(2)
                .chain((0..3 + j).map(|k| 5 + (7 * j + 3 * k) % 40))
                .chain(std::iter::once(3))
                .collect();
            Example {
                anchor: ids.clone(),
                positive: ids,
                negative: None,
                keys: [j as u64, j as u64, 0],
            }
        })
        .collect()
}

fn batch() -> SimcseBatch {
    let ex = examples();
    SimcseBatch::from_examples(&ex.iter().collect::<Vec<_>>(), Cursor::default())
}

fn grads_of(obj: &Simcse, mode: Mode) -> (f32, Vec<(String, Vec<f32>)>) {
    let b = batch();
    let (loss, grads) = match obj.step_with_grads(&b, mode).unwrap() {
        Some((out, g)) => (out.loss, g),
        None => {
            let out = obj.step(&b, mode).unwrap();
            let g = out.loss.backward().unwrap();
            (out.loss, g)
        }
    };
    let data = obj.varmap.data().lock().unwrap();
    let mut named: Vec<(String, Vec<f32>)> = data
        .iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .expect("every parameter gets a gradient");
            (n.clone(), g.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    (loss.to_scalar().unwrap(), named)
}

/// GradCache changes memory, not mathematics: with dropout on (the views are drawn per
/// chunk, the same in both passes), the loss and every parameter's gradient equal those of
/// the plain in-batch loss back-propagated through one graph.
#[test]
fn grad_cache_gives_the_plain_loss_and_gradients() {
    let (model, varmap) = tiny_model(0.1);
    let mut obj = Simcse::new(model, varmap, Pooling::Mean, 0.05, 0);
    obj.grad_cache.chunk_size = 5; // chunks straddle anchors and positives
    let mode = Mode::Train { seed: 11 };
    let (plain_loss, plain) = grads_of(&obj, mode);
    obj.grad_cache.enabled = true;
    let (cached_loss, cached) = grads_of(&obj, mode);
    assert!(
        (plain_loss - cached_loss).abs() < 1e-5,
        "{plain_loss} vs {cached_loss}"
    );
    assert_eq!(plain.len(), cached.len());
    for ((name, a), (_, b)) in plain.iter().zip(&cached) {
        let scale = a.iter().map(|x| x.abs()).fold(1e-6f32, f32::max);
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * scale.max(1.0), "{name}: {x} vs {y}");
        }
        assert!(
            a.iter().any(|x| *x != 0.0),
            "{name} gets a non-zero gradient"
        );
    }
}

/// Dropout makes the two views of a sentence differ in training and agree in eval.
#[test]
fn dropout_views_differ_in_training_only() {
    let (model, varmap) = tiny_model(0.1);
    let obj = Simcse::new(model, varmap, Pooling::Cls, 0.05, 0);
    let rows = vec![batch().rows[0].clone(); 2];
    let train = obj
        .embed(&rows, Mode::Train { seed: 1 })
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_ne!(train[0], train[1]);
    let eval = obj
        .embed(&rows, Mode::Eval)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(eval[0], eval[1]);
}

/// The loss against its definition, row by row; a duplicate sentence in the batch is not
/// used as a negative.
#[test]
fn info_nce_matches_the_formula_and_masks_duplicates() {
    let reps = Tensor::new(
        &[
            [1f32, 0.0],
            [0.6, 0.8],
            [0.0, 1.0],
            [0.8, 0.6],
            [0.6, 0.8],
            [-1.0, 0.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let t = 0.5;
    // Anchors 0, 1, 2; positives 3, 4, 5. Anchor 0 and 2 share a text (key 7).
    let keys = [7, 8, 7, 7, 8, 7];
    let got: f32 = info_nce(&reps, 3, &keys, t).unwrap().to_scalar().unwrap();
    let v = reps.to_vec2::<f32>().unwrap();
    let cos = |a: &[f32], b: &[f32]| {
        let n = |x: &[f32]| x.iter().map(|y| y * y).sum::<f32>().sqrt();
        a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (n(a) * n(b))
    };
    let mut want = 0.0;
    for i in 0..3 {
        let mut denom = 0.0;
        for j in 0..3 {
            let masked = j != i && (keys[3 + j] == keys[3 + i] || keys[3 + j] == keys[i]);
            if !masked {
                denom += (cos(&v[i], &v[3 + j]) / t as f32).exp();
            }
        }
        want -= ((cos(&v[i], &v[3 + i]) / t as f32).exp() / denom).ln();
    }
    want /= 3.0;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    // Without the duplicate, candidate 5 counts against anchor 0: a larger loss.
    let distinct = [7, 8, 9, 7, 8, 9];
    let plain: f32 = info_nce(&reps, 3, &distinct, t)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(plain > got);
}

/// Three ranks of 2 (anchor, positive, hard negative) triplets, InfoNCE gathered over the
/// group: loss and gradients are those of InfoNCE on the 6 triplets in one process, with a
/// duplicate text across ranks (anchor 0's text is rank 2's first negative) masked there too.
#[test]
fn gathered_info_nce_over_ranks_is_info_nce_of_the_global_batch() {
    use kindling_train::distributed::LocalGroup;
    let (world, n, d) = (3usize, 2usize, 4usize);
    let row = |i: usize| -> Vec<f32> {
        (0..d)
            .map(|j| ((i * 31 + j * 17) % 13) as f32 / 6.0 - 1.0)
            .collect()
    };
    // Global rows: 6 anchors, 6 positives, 6 negatives; keys likewise.
    let global: Vec<Vec<f32>> = (0..3 * world * n).map(row).collect();
    let mut keys: Vec<u64> = (0..(3 * world * n) as u64).map(|i| 1000 + i).collect();
    keys[2 * world * n + 2 * n] = keys[0]; // rank 2's first negative repeats anchor 0
    keys[1] = u64::MAX - 5; // a key above 2^53: exact through the gather
    let flat = |rows: &[Vec<f32>]| rows.concat();
    let g = Var::from_vec(flat(&global), (3 * world * n, d), &Device::Cpu).unwrap();
    let single = info_nce(g.as_tensor(), world * n, &keys, 0.3).unwrap();
    let want = single.to_scalar::<f32>().unwrap();
    let want_grad = single
        .backward()
        .unwrap()
        .get(g.as_tensor())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    // Rank r's local rows and keys: its anchors, positives and negatives.
    let part = |r: usize| -> Vec<usize> {
        (0..3)
            .flat_map(|block| (0..n).map(move |i| block * world * n + r * n + i))
            .collect()
    };
    let ranks: Vec<(f32, Vec<(usize, Vec<f32>)>)> = LocalGroup::run(world, |grp| {
        let (global, keys) = (&global, &keys);

        let idx = part(grp.rank());
        let rows: Vec<Vec<f32>> = idx.iter().map(|&i| global[i].clone()).collect();
        let local_keys: Vec<u64> = idx.iter().map(|&i| keys[i]).collect();
        let v = Var::from_vec(flat(&rows), (3 * n, d), &Device::Cpu).unwrap();
        let loss = info_nce_in_group(v.as_tensor(), n, &local_keys, 0.3, Some(&grp)).unwrap();
        let grads = loss.backward().unwrap();
        let mean = grp
            .all_reduce_sum(&loss)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            / world as f32;
        let gv = (grads.get(v.as_tensor()).unwrap() / world as f64)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        (mean, idx.into_iter().zip(gv).collect())
    });
    for (r, (loss, rows)) in ranks.iter().enumerate() {
        assert!(
            (loss - want).abs() < 1e-5,
            "rank {r}: loss {loss} vs {want}"
        );
        for (i, grad) in rows {
            for (x, y) in grad.iter().zip(&want_grad[*i]) {
                assert!((x - y).abs() < 1e-5, "rank {r}, global row {i}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn recall_counts_the_rank_of_each_querys_own_document() {
    let q = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![1.0, 1.0]];
    // Query 0 finds doc 0 first; query 1's doc comes second (after doc 2); query 2's first.
    let d = vec![vec![1.0, 0.0], vec![-1.0, 0.2], vec![1.0, 0.9]];
    let m = crate::metrics::retrieval_scores(&q, &d, &[1, 2]);
    assert_eq!(m["recall_at_1"], 2.0 / 3.0);
    assert_eq!(m["recall_at_2"], 1.0);
    assert!((m["mrr"] - (1.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
}

/// The loader's cursor is the whole resume state: seeking to it continues the same
/// sequence of batches, across an epoch boundary.
#[test]
fn loader_resumes_from_its_cursor() {
    let data = Arc::new(examples());
    let straight: Vec<SimcseBatch> = SimcseLoader::new(data.clone(), 2, 5).take(7).collect();
    assert_eq!(
        straight[3].cursor_after,
        Cursor {
            epoch: 1,
            position: 1
        }
    );
    let mut resumed = SimcseLoader::new(data, 2, 5);
    resumed.seek(straight[2].cursor_after);
    for (a, b) in resumed.take(4).zip(&straight[3..]) {
        assert_eq!(a.rows, b.rows);
        assert_eq!(a.keys, b.keys);
    }
    // Different epochs draw different orders.
    assert_ne!(straight[0].rows, straight[3].rows);
}
