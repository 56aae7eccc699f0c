//! Bad recipes fail before any work, with a message that names the file and the key (or line)
//! and a non-zero exit code; an existing run is never overwritten by accident.

use crate::common::{kindling, stderr};

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = kindling().args(args).output().unwrap();
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit code for {args:?}; stderr:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr for {args:?} lacks `{n}`:\n{err}");
    }
}

/// `pretrain` of the tiny recipe in a fresh runs folder, with each of `settings` as a `--set`.
fn tiny_fails_with(settings: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    let mut args = vec!["pretrain", TINY, "--set", &runs];
    for s in settings {
        args.extend(["--set", s]);
    }
    fails_with(&args, needles);
}

fn write_recipe(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.toml");
    std::fs::write(&p, text).unwrap();
    (dir, p.to_string_lossy().into_owned())
}

const TINY: &str = "recipes/tiny/bert-tiny-mlm.toml";

#[test]
fn unknown_key_is_named() {
    fails_with(
        &["pretrain", TINY, "--set", "train.stepz=3"],
        &["bert-tiny-mlm.toml", "train", "unknown field `stepz`"],
    );
}

#[test]
fn unknown_key_in_the_file_is_named() {
    let (_d, p) = write_recipe("objective = \"bert-mlm\"\n[data]\ncorpus = [\"x\"]\nseq_len = 64\nmask = { rate = 0.15, colour = 1 }\n");
    fails_with(
        &["pretrain", &p],
        &["r.toml", "data.mask", "unknown field `colour`"],
    );
}

#[test]
fn wrong_type_is_named() {
    fails_with(
        &["pretrain", TINY, "--set", "train.steps=\"many\""],
        &["train.steps", "invalid type"],
    );
    fails_with(
        &["pretrain", TINY, "--set", "model.hidden_size=1.5"],
        &["model.hidden_size"],
    );
}

#[test]
fn toml_syntax_error_names_the_line() {
    let (_d, p) = write_recipe("objective = \"bert-mlm\"\n[data]\ncorpus = [\"x\"\nseq_len = 64\n");
    fails_with(&["pretrain", &p], &["r.toml", "line 4"]);
}

#[test]
fn missing_recipe_file_is_named() {
    fails_with(
        &["pretrain", "recipes/does-not-exist.toml"],
        &["recipes/does-not-exist.toml"],
    );
}

#[test]
fn missing_required_section_is_named() {
    let (_d, p) = write_recipe("objective = \"bert-mlm\"\n");
    fails_with(&["pretrain", &p], &["missing field `data`"]);
}

#[test]
fn corpus_matching_no_files_is_named() {
    tiny_fails_with(
        &["data.corpus=[\"datasets/nothing-here/*.txt\"]"],
        &["datasets/nothing-here/*.txt", "matched no files"],
    );
}

#[test]
fn a_recipe_without_text_or_with_a_table_split_no_row_has_is_named() {
    tiny_fails_with(
        &["data.corpus=[]"],
        &["bert-tiny-mlm.toml", "data.corpus", "data.tables"],
    );
    tiny_fails_with(
        &[
            "data.tables=[{ path = \"datasets/womens-clothing-reviews/reviews.tsv.gz\", \
           text_columns = [\"text\"], split_column = \"split\", split = \"validation\" }]",
        ],
        &["reviews.tsv.gz", "split = \"validation\""],
    );
}

#[test]
fn seq_len_beyond_max_position_embeddings_is_refused() {
    fails_with(
        &["pretrain", TINY, "--set", "data.seq_len=256"],
        &["data.seq_len", "max_position_embeddings (128)"],
    );
}

#[test]
fn unknown_objective_is_named() {
    tiny_fails_with(
        &["objective=\"gpt\""],
        &["objective", "unknown objective `gpt`"],
    );
}

#[test]
fn bad_override_syntax_is_named() {
    fails_with(
        &["pretrain", TINY, "--set", "train.steps"],
        &["--set train.steps", "KEY=VALUE"],
    );
}

#[test]
fn an_existing_run_is_not_overwritten_without_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::run_tiny(dir.path(), &["train.steps=2", "train.eval_every=0"]);
    let weights = dir.path().join("bert-tiny-mlm/export/model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    fails_with(
        &["pretrain", TINY, "--set", &runs, "--set", "train.steps=3"],
        &["already holds a run", "--overwrite"],
    );
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        before,
        "the earlier run is untouched"
    );
    let again = kindling()
        .args([
            "pretrain",
            TINY,
            "--overwrite",
            "--set",
            &runs,
            "--set",
            "train.steps=3",
            "--set",
            "train.eval_every=0",
        ])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "--overwrite replaces the run: {}",
        stderr(&again)
    );
}

#[test]
fn a_corpus_that_is_not_utf8_names_the_file_and_byte_offset() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("latin1.txt");
    std::fs::write(&bad, b"caf\xe9 au lait\n").unwrap();
    let corpus = format!("data.corpus=[\"{}\"]", bad.display());
    let runs = format!("runs_dir=\"{}\"", dir.path().join("runs").display());
    fails_with(
        &["pretrain", TINY, "--set", &corpus, "--set", &runs],
        &["latin1.txt", "not valid UTF-8", "offset 3"],
    );
}

#[test]
fn an_empty_corpus_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, b"").unwrap();
    let corpus = format!("data.corpus=[\"{}\"]", empty.display());
    let runs = format!("runs_dir=\"{}\"", dir.path().join("runs").display());
    fails_with(
        &["pretrain", TINY, "--set", &corpus, "--set", &runs],
        &["corpus is empty", "empty.txt"],
    );
}

#[test]
fn a_batch_that_cannot_fit_in_memory_is_refused_with_a_hint() {
    tiny_fails_with(
        &[
            "model.hidden_size=4096",
            "model.num_attention_heads=32",
            "model.intermediate_size=16384",
            "train.batch_size=1024",
        ],
        &["train.batch_size", "GB is available", "train.grad_accum"],
    );
}

#[test]
fn a_bad_time_limit_is_named() {
    fails_with(
        &["pretrain", TINY, "--set", "train.max_time=soon"],
        &["train.max_time", "`soon`", "\"45m\""],
    );
}

#[test]
fn resuming_with_another_model_or_a_mismatched_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::run_tiny(dir.path(), &["train.steps=2", "train.eval_every=0"]);
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    fails_with(
        &[
            "pretrain",
            TINY,
            "--resume",
            "auto",
            "--set",
            &runs,
            "--set",
            "model.hidden_size=128",
        ],
        &["cannot resume", "`model` differs", "recipe.toml"],
    );
    // The run's tokenizer replaced by one with another vocabulary size: the checkpoint's
    // embeddings no longer fit, and the message says which tensor and which shapes.
    let run = dir.path().join("bert-tiny-mlm");
    let other = crate::common::repo_root().join("datasets/minilm-tokenizer/tokenizer.json");
    std::fs::copy(other, run.join("tokenizer.json")).unwrap();
    fails_with(
        &["pretrain", TINY, "--resume", "auto", "--set", &runs],
        &[
            "tokenizer.json has 30522 tokens",
            "word_embeddings.weight has 2000 rows",
        ],
    );
}

#[test]
fn a_device_or_precision_this_build_cannot_use_is_named() {
    fails_with(
        &["pretrain", TINY, "--set", "device=cuda:0"],
        &["`device`", "`cuda:0`", "no GPU support"],
    );
    fails_with(
        &["pretrain", TINY, "--set", "device=tpu"],
        &["`device`", "not a device", "\"cuda:N\""],
    );
    fails_with(
        &["pretrain", TINY, "--set", "precision=bf16"],
        &["`precision`", "slower than f32"],
    );
}

/// `device`, `precision` and `model.hidden_act` are typed: a value outside the set is refused
/// as the recipe is read, naming the key and the values there are, in every recipe family.
#[test]
fn header_values_are_typed_in_every_recipe() {
    fails_with(
        &["pretrain", TINY, "--set", "precision=f8"],
        &["precision", "unknown variant `f8`", "bf16"],
    );
    fails_with(
        &["pretrain", TINY, "--set", "model.hidden_act=swish"],
        &["model.hidden_act", "unknown variant `swish`", "gelu_new"],
    );
    for (cmd, recipe) in [
        ("pretrain", "recipes/tiny/simcse-tiny.toml"),
        ("pretrain", "recipes/tiny/simclr-tiny.toml"),
        ("finetune", "recipes/tiny/finetune-tiny.toml"),
    ] {
        fails_with(
            &[cmd, recipe, "--set", "device=tpu"],
            &["`device`", "not a device", "\"cuda:N\""],
        );
        fails_with(
            &[cmd, recipe, "--set", "precision=f8"],
            &["precision", "unknown variant `f8`"],
        );
    }
    // SimCSE and fine-tuning take `precision` too; bf16 on a CPU is refused with the reason.
    let dir = tempfile::tempdir().unwrap();
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    fails_with(
        &[
            "pretrain",
            "recipes/tiny/simcse-tiny.toml",
            "--set",
            &runs,
            "--set",
            "device=cpu",
            "--set",
            "precision=bf16",
        ],
        &["`precision`", "slower than f32"],
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no run folder"
    );
}

#[test]
fn an_out_of_range_setting_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    fails_with(
        &[
            "pretrain",
            TINY,
            "--set",
            &runs,
            "--set",
            "data.mask.rate=1.5",
        ],
        &["data.mask.rate", "must be in (0, 1), got 1.5"],
    );
}

/// Every kind of recipe (MLM, SimCSE, vision, fine-tuning) reads one shared header: the same
/// keys with the same defaults, the same messages for a key none of them has, and a saved
/// `recipe.toml` that reads back as the recipe it came from.
#[test]
fn every_recipe_kind_shares_one_header() {
    use kindling_recipes::finetune::FinetuneRecipe;
    use kindling_recipes::recipe::{Header, Recipe};
    use kindling_recipes::simcse::SimcseRecipe;
    use kindling_recipes::vision::VisionRecipe;
    let dir = tempfile::tempdir().unwrap();
    let runs = format!("runs_dir=\"{}\"", dir.path().display());
    for (cmd, recipe) in [
        ("pretrain", TINY),
        ("pretrain", "recipes/tiny/simcse-tiny.toml"),
        ("pretrain", "recipes/tiny/simclr-tiny.toml"),
        ("finetune", "recipes/tiny/finetune-tiny.toml"),
    ] {
        fails_with(
            &[cmd, recipe, "--set", &runs, "--set", "sede=3"],
            &[
                recipe,
                "`sede`",
                "`seed`",
                "`kernels`",
                "`precision`",
                "`train`",
            ],
        );
        fails_with(
            &[cmd, recipe, "--set", &runs, "--set", "kernels=\"turbo\""],
            &["`kernels`", "fused", "composed"],
        );
    }

    // Unset, the header is the same everywhere; a file's stem names the run.
    let defaults: Header = toml::from_str("").unwrap();
    assert_eq!(defaults.seed, 17);
    assert_eq!(defaults.runs_dir, std::path::PathBuf::from("runs"));
    assert_eq!(defaults.name(), "run");

    let p = std::path::Path::new;
    let ft = FinetuneRecipe::load(p("recipes/tiny/finetune-tiny.toml"), &[]).unwrap();
    let sim = SimcseRecipe::load(p("recipes/tiny/simcse-tiny.toml"), &[]).unwrap();
    let vis = VisionRecipe::load(p("recipes/tiny/simclr-tiny.toml"), &[]).unwrap();
    let mlm = Recipe::load(p(TINY), &[]).unwrap();
    assert_eq!(ft.header.name(), "finetune-tiny");
    assert_eq!(mlm.header.name(), "bert-tiny-mlm");

    // What a run folder saves reads back as the same recipe.
    let saved = dir.path().join("saved.toml");
    let back = |text: String| {
        std::fs::write(&saved, text).unwrap();
        saved.as_path()
    };
    assert_eq!(Recipe::load(back(mlm.to_toml()), &[]).unwrap(), mlm);
    assert_eq!(FinetuneRecipe::load(back(ft.to_toml()), &[]).unwrap(), ft);
    assert_eq!(SimcseRecipe::load(back(sim.to_toml()), &[]).unwrap(), sim);
    assert_eq!(VisionRecipe::load(back(vis.to_toml()), &[]).unwrap(), vis);
    assert!(mlm
        .to_toml()
        .starts_with("objective = \"bert-mlm\"\nname = \"bert-tiny-mlm\""));
}

/// Each vision method's `[loss]` is its own type: a key meant for another method is an error
/// naming this method's keys, every value is checked, and nothing is written; the keys a
/// method reads round-trip through the saved recipe.toml, which holds those keys alone.
#[test]
fn a_vision_loss_key_of_another_method_or_out_of_range_is_named() {
    const SIMCLR: &str = "recipes/tiny/simclr-tiny.toml";
    let runs = tempfile::tempdir().unwrap();
    let runs_dir = format!("runs_dir=\"{}\"", runs.path().display());
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["loss.queue_size=64"],
            &["loss.queue_size", "not a setting of simclr", "temperature"],
        ),
        (
            &["objective=\"vicreg\"", "loss.temperature=0.5"],
            &[
                "loss.temperature",
                "vicreg",
                "sim_weight, var_weight, cov_weight",
            ],
        ),
        (
            &["objective=\"simsiam\"", "loss.ema_base=0.9"],
            &["loss.ema_base", "simsiam", "fix_predictor_lr"],
        ),
        (&["loss.temperature=0"], &["loss.temperature", "above 0"]),
        (
            &["objective=\"moco\"", "loss.queue_size=0"],
            &["loss.queue_size", "at least 1"],
        ),
        (
            &[
                "objective=\"byol\"",
                "loss.ema_base=0.999",
                "loss.ema_final=0.9",
            ],
            &["loss.ema_final", "[ema_base, 1]"],
        ),
        (
            &["objective=\"barlow\"", "loss.lambda=-1"],
            &["loss.lambda", "above 0"],
        ),
        (
            &["objective=\"vicreg\"", "loss.cov_weight=nan"],
            &["loss.cov_weight", "finite"],
        ),
        (
            &["objective=\"moco\"", "loss.queue_size=\"big\""],
            &["loss.queue_size", "invalid type"],
        ),
    ];
    for (settings, needles) in cases {
        let mut args = vec!["pretrain", SIMCLR, "--set", &runs_dir];
        for s in *settings {
            args.extend(["--set", s]);
        }
        fails_with(&args, needles);
    }
    assert_eq!(std::fs::read_dir(runs.path()).unwrap().count(), 0);

    use kindling_recipes::vision::{LossConfig, VisionRecipe};
    let path = std::path::Path::new(SIMCLR);
    let moco = VisionRecipe::load(
        path,
        &["objective=\"moco\"".into(), "loss.queue_size=96".into()],
    )
    .unwrap();
    let LossConfig::MoCo(m) = moco.loss else {
        panic!("a moco recipe reads moco's settings, got {:?}", moco.loss)
    };
    assert_eq!((m.queue_size, m.temperature, m.ema_base), (96, 0.2, 0.99));
    let saved: toml::Table = moco.to_toml().parse().unwrap();
    let keys: Vec<&String> = saved["loss"].as_table().unwrap().keys().collect();
    assert_eq!(keys, ["temperature", "queue_size", "ema_base", "ema_final"]);
    // A run folder saved before the split holds every method's keys at their defaults: it
    // still loads, to the same settings.
    let legacy = "loss.temperature=0.2,loss.queue_size=4096,loss.scale=0.1,loss.sim_weight=25.0,\
                  loss.fix_predictor_lr=false,loss.ema_base=0.99";
    let overrides: Vec<String> = legacy.split(',').map(String::from).collect();
    let old = VisionRecipe::load(path, &overrides).unwrap();
    assert_eq!(old, VisionRecipe::load(path, &[]).unwrap());
}
