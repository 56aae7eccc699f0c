//! The tiny recipe end to end: it trains, its eval loss falls, and the run folder holds what a
//! user looks at (resolved recipe, metrics log, loss plot, checkpoint, export).

use crate::common::shared_tiny_run;

fn eval_losses(run: &std::path::Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "eval")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn tiny_recipe_trains_and_its_eval_loss_falls() {
    let run = shared_tiny_run();
    let losses = eval_losses(run);
    assert_eq!(losses.len(), 3, "eval every 20 of 60 steps");
    let vocab = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(run.join("export/config.json")).unwrap(),
    )
    .unwrap()["vocab_size"]
        .as_f64()
        .unwrap();
    assert!(
        losses[0] < vocab.ln(),
        "first eval {} is below chance ln(V) = {}",
        losses[0],
        vocab.ln()
    );
    assert!(losses[2] < losses[0] - 0.1, "eval loss falls: {losses:?}");
}

#[test]
fn run_folder_holds_recipe_metrics_plot_checkpoint_and_export() {
    let run = shared_tiny_run();
    for f in [
        "recipe.toml",
        "tokenizer.json",
        "metrics.jsonl",
        "plots/loss.png",
        "checkpoints/step-00000060/model.safetensors",
        "checkpoints/step-00000060/optimizer.safetensors",
        "checkpoints/step-00000060/state.json",
        "export/config.json",
        "export/model.safetensors",
        "export/tokenizer.json",
        "export/vocab.txt",
        "export/tokenizer_config.json",
        "export/special_tokens_map.json",
        "export/README.md",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    let png = std::fs::read(run.join("plots/loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The saved recipe is the resolved one: defaults filled in, loadable again.
    let resolved = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(
        resolved.contains("warmup_steps = 6") && resolved.contains("beta2"),
        "{resolved}"
    );
    kindling_recipes::Recipe::load(&run.join("recipe.toml"), &[]).unwrap();
}

#[test]
fn same_seed_gives_the_same_final_weights() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::run_tiny(
        dir.path(),
        &["train.steps=8", "train.eval_every=0", "name=\"again\""],
    );
    crate::common::run_tiny(
        dir.path(),
        &["train.steps=8", "train.eval_every=0", "name=\"again2\""],
    );
    let a = std::fs::read(dir.path().join("again/export/model.safetensors")).unwrap();
    let b = std::fs::read(dir.path().join("again2/export/model.safetensors")).unwrap();
    assert_eq!(a, b);
}

#[test]
fn every_shipped_recipe_parses_and_names_an_objective() {
    let root = crate::common::repo_root();
    let mut seen = 0;
    for pattern in ["recipes/*.toml", "recipes/*/*.toml"] {
        for path in glob::glob(&root.join(pattern).to_string_lossy())
            .unwrap()
            .flatten()
        {
            // Fine-tuning and probe recipes name a `task` instead of an `objective`; vision
            // and SimCSE recipes have their own formats.
            let doc: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
            fn ok<T>(r: Result<T, kindling_recipes::RecipeError>, path: &std::path::Path) -> T {
                r.unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            }
            // A suite of tasks (`kindling evaluate`): each task's recipe loads with its settings.
            if doc.get("task").is_some_and(|t| t.is_array()) {
                let suite = ok(kindling_recipes::suite::Suite::load(&path), &path);
                for t in &suite.tasks {
                    let mut sets = suite.set.clone();
                    sets.extend(t.set.iter().cloned());
                    let recipe = root.join(&t.recipe);
                    if t.kind == kindling_recipes::suite::TaskKind::Embeddings {
                        use kindling_recipes::embedding_eval::EmbeddingEvalRecipe;
                        ok(EmbeddingEvalRecipe::load(&recipe, &sets), &path);
                    } else {
                        let r = kindling_recipes::finetune::FinetuneRecipe::load(&recipe, &sets);
                        ok(r, &path);
                    }
                }
                seen += 1;
                continue;
            }
            match (
                doc.get("task").and_then(|t| t.as_str()),
                doc.get("objective").and_then(|t| t.as_str()),
            ) {
                // An image task trains (`kindling finetune`) when it has a `[train]`, and is a
                // probe (`kindling probe`) otherwise.
                (Some("image-classification"), _) if doc.contains_key("train") => {
                    use kindling_recipes::vision::finetune::ImageFinetuneRecipe;
                    ok(ImageFinetuneRecipe::load(&path, &[]), &path);
                }
                (Some("image-classification"), _) => {
                    ok(
                        kindling_recipes::vision::probe::VisionProbeRecipe::load(&path, &[]),
                        &path,
                    );
                }
                (Some(_), _) => {
                    ok(
                        kindling_recipes::finetune::FinetuneRecipe::load(&path, &[]),
                        &path,
                    );
                }
                (None, Some("simcse")) => {
                    ok(
                        kindling_recipes::simcse::SimcseRecipe::load(&path, &[]),
                        &path,
                    );
                }
                (None, Some(o)) if kindling_recipes::vision::objectives().contains(&o) => {
                    ok(
                        kindling_recipes::vision::VisionRecipe::load(&path, &[]),
                        &path,
                    );
                }
                _ => {
                    let r = ok(kindling_recipes::Recipe::load(&path, &[]), &path);
                    assert!(
                        kindling_recipes::registry::lookup(
                            kindling_recipes::registry::Kind::Objective,
                            &r.objective
                        )
                        .is_ok(),
                        "{}",
                        path.display()
                    );
                }
            }
            seen += 1;
        }
    }
    assert!(seen >= 15, "found {seen} recipes");
}

#[test]
fn a_recipe_pretrains_on_the_text_of_a_tables_training_split() {
    // Domain-adaptive pretraining: the reviews' titles and texts (train rows only, labels
    // unused) instead of the novel; the tokenizer learns the reviews' words and the model card
    // names the table, its columns and the split.
    let runs = tempfile::tempdir().unwrap();
    crate::common::run_tiny(
        runs.path(),
        &[
            "data.corpus=[]",
            "data.tables=[{ path = \"datasets/womens-clothing-reviews/reviews.tsv.gz\", \
             text_columns = [\"title\", \"text\"], split_column = \"split\", split = \"train\" }]",
            "train.steps=4",
            "train.eval_every=0",
        ],
    );
    let run = runs.path().join("bert-tiny-mlm");
    let tokenizer = std::fs::read_to_string(run.join("tokenizer.json")).unwrap();
    for word in ["\"fabric\"", "\"jeans\""] {
        assert!(tokenizer.contains(word), "the vocabulary lacks {word}");
    }
    let card = std::fs::read_to_string(run.join("export/README.md")).unwrap();
    assert!(
        card.contains("reviews.tsv.gz (columns title, text, rows with split = train)"),
        "{card}"
    );
}

#[test]
fn max_epochs_caps_the_steps_at_that_many_passes_over_the_training_split() {
    let runs = tempfile::tempdir().unwrap();
    crate::common::run_tiny(
        runs.path(),
        &[
            "train.max_epochs=1",
            "train.steps=100000",
            "train.eval_every=0",
        ],
    );
    let data: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(runs.path().join("bert-tiny-mlm/data.json")).unwrap(),
    )
    .unwrap();
    let per_epoch = data["train_blocks"].as_u64().unwrap() / 16;
    let last = runs
        .path()
        .join(format!("bert-tiny-mlm/checkpoints/step-{per_epoch:08}"));
    assert!(
        last.is_dir(),
        "the run ends after one epoch, at step {per_epoch}"
    );
}
