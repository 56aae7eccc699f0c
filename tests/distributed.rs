//! Data parallelism through the `kindling` binary, on the CPU: `--nproc 2` launches two ranks
//! that talk over loopback TCP. Two ranks of one batch each make the update one process makes
//! accumulating those two batches, bit for bit; only rank 0 writes; a two-rank run resumes
//! exactly; SimCLR's negatives span the ranks; a failing rank stops the launch with its error.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::{kindling, stderr};

/// The tiny recipe (dropout on) for 30 steps with a checkpoint every 10, in `runs/name`, run.
fn tiny(runs: &Path, name: &str, launch: &[&str], extra: &[&str]) -> Output {
    tiny_command(runs, name, launch, extra)
        .output()
        .expect("running kindling")
}

/// [`tiny`]'s command, not started.
fn tiny_command(runs: &Path, name: &str, launch: &[&str], extra: &[&str]) -> Command {
    let mut cmd = kindling();
    cmd.args(["pretrain", "recipes/tiny/bert-tiny-mlm.toml"])
        .args(launch);
    for s in [
        &format!("runs_dir=\"{}\"", runs.display()),
        &format!("name=\"{name}\""),
        "train.steps=30",
        "train.save_every=10",
        "train.keep_last=5",
    ]
    .into_iter()
    .chain(extra.iter().copied())
    {
        cmd.args(["--set", s]);
    }
    cmd
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "run failed:\n{}", stderr(&out));
    out
}

fn checkpoint_names(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn two_ranks_update_as_one_process_accumulating_their_two_batches() {
    let runs = tempfile::tempdir().unwrap();
    ok(tiny(runs.path(), "parallel", &["--nproc", "2"], &[]));
    ok(tiny(runs.path(), "single", &[], &["train.grad_accum=2"]));
    let (p, s) = (runs.path().join("parallel"), runs.path().join("single"));
    // Each rank scales its loss by 1/1 and the mean over ranks halves the sum; the single
    // process scales each micro-batch's loss by 1/2 and adds: the same numbers, exactly.
    for file in [
        "export/model.safetensors",
        "checkpoints/step-00000030/optimizer.safetensors",
    ] {
        let (a, b) = (
            std::fs::read(p.join(file)).unwrap(),
            std::fs::read(s.join(file)).unwrap(),
        );
        assert!(
            a == b,
            "{file} differs between 2 ranks and 1 process x 2 micro-batches"
        );
    }
    // Rank 0 alone writes: one metrics record per step, the same checkpoints, and the log
    // shows the group's loss (the same as the single process's).
    assert_eq!(checkpoint_names(&p), checkpoint_names(&s));
    let records = |run: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v.get("loss").is_some() && v.get("lr").is_some())
            .collect()
    };
    let (rp, rs) = (records(&p), records(&s));
    assert_eq!(rp.len(), 30, "one training record per step");
    for (a, b) in rp.iter().zip(&rs) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-6 * lb.abs(),
            "step {}: loss {la} vs {lb}",
            a["step"]
        );
        assert_eq!(
            a["grad_norm"], b["grad_norm"],
            "step {}: the averaged gradient",
            a["step"]
        );
    }
}

#[test]
fn a_two_rank_run_resumed_from_a_checkpoint_ends_as_one_run_straight_through() {
    let runs = tempfile::tempdir().unwrap();
    ok(tiny(runs.path(), "straight", &["--nproc", "2"], &[]));
    // The same run, cut back to its step-10 checkpoint and resumed: the data cursor and the
    // optimiser state are the group's, so the rest of the run repeats exactly.
    let (straight, cut) = (runs.path().join("straight"), runs.path().join("cut"));
    let copy = std::process::Command::new("cp")
        .args(["-r"])
        .arg(&straight)
        .arg(&cut)
        .status()
        .unwrap();
    assert!(copy.success());
    for later in ["step-00000020", "step-00000030"] {
        std::fs::remove_dir_all(cut.join("checkpoints").join(later)).unwrap();
    }
    std::fs::remove_dir_all(cut.join("export")).unwrap();
    let out = kindling()
        .args([
            "pretrain",
            "recipes/tiny/bert-tiny-mlm.toml",
            "--nproc",
            "2",
        ])
        .args(["--resume", "auto", "--set"])
        .arg(format!("runs_dir=\"{}\"", runs.path().display()))
        .args(["--set", "name=\"cut\"", "--set", "train.steps=30"])
        .args(["--set", "train.save_every=10", "--set", "train.keep_last=5"])
        .output()
        .unwrap();
    let out = ok(out);
    assert!(stderr(&out).contains("(step 10)"), "{}", stderr(&out));
    let file = "checkpoints/step-00000030/model.safetensors";
    assert!(
        std::fs::read(straight.join(file)).unwrap() == std::fs::read(cut.join(file)).unwrap(),
        "the resumed run's final weights differ"
    );
}

#[test]
fn a_bad_setting_fails_the_launch_with_the_ranks_error_and_status() {
    let runs = tempfile::tempdir().unwrap();
    let out = tiny(
        runs.path(),
        "bad",
        &["--nproc", "2"],
        &["train.batch_size=0"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("train.batch_size"),
        "{}",
        stderr(&out)
    );
}

/// SimCLR over two ranks: each rank's NT-Xent sees the other's projections as negatives (the
/// gathered loss is checked against the global batch in `vision::simclr`'s tests). Here the
/// launch trains, rank 0 alone exports, and the first step's contrastive loss shows the
/// gathered negatives: with twice the candidates (4 x 64 instead of 2 x 64) at the same
/// initialisation, NT-Xent is about ln 2 higher than one process's on one rank's batch.
#[test]
fn simclr_trains_over_two_ranks_with_the_negatives_of_both() {
    let runs = tempfile::tempdir().unwrap();
    let first_ssl_loss = |name: &str, launch: &[&str]| {
        let out = kindling()
            .args(["pretrain", "recipes/tiny/simclr-tiny.toml"])
            .args(launch)
            .arg("--set")
            .arg(format!("runs_dir=\"{}\"", runs.path().display()))
            .args([
                "--set",
                &format!("name=\"{name}\""),
                "--set",
                "probe.enabled=false",
            ])
            .output()
            .unwrap();
        ok(out);
        let run = runs.path().join(name);
        assert!(run.join("export/model.safetensors").is_file());
        let first: serde_json::Value = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .find(|v: &serde_json::Value| v["step"] == 1)
            .unwrap();
        first["ssl_loss"].as_f64().unwrap()
    };
    let (two, one) = (
        first_ssl_loss("two", &["--nproc", "2"]),
        first_ssl_loss("one", &[]),
    );
    let gap = two - one;
    assert!(
        (gap - 2f64.ln()).abs() < 0.15,
        "NT-Xent {two:.3} over 2 ranks vs {one:.3}: {gap:.3}"
    );
}

/// SimCSE over two ranks of 16 sentences against one process on the same 32 (dropout off, so
/// both see the same encoder): the first step's loss and gradient norm agree, which they only
/// do if each rank's anchors meet the other rank's sentences as negatives, with gradient; with
/// and without GradCache.
#[test]
fn simcse_over_two_ranks_is_simcse_on_their_joint_batch() {
    let runs = tempfile::tempdir().unwrap();
    let model = crate::common::shared_tiny_run().join("export");
    let first_step = |name: &str, launch: &[&str], batch: &str| {
        let out = kindling()
            .args(["pretrain", "recipes/tiny/simcse-tiny.toml"])
            .args(launch)
            .arg("--set")
            .arg(format!("runs_dir=\"{}\"", runs.path().display()))
            .arg("--set")
            .arg(format!("model.path=\"{}\"", model.display()))
            .args(["--set", &format!("name=\"{name}\""), "--set", batch])
            .args(["--set", "model.hidden_dropout_prob=0.0"])
            .args(["--set", "model.attention_probs_dropout_prob=0.0"])
            .args(["--set", "train.steps=2", "--set", "train.eval_every=0"])
            .output()
            .unwrap();
        ok(out);
        let step: serde_json::Value =
            std::fs::read_to_string(runs.path().join(name).join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .find(|v: &serde_json::Value| v["step"] == 1)
                .unwrap();
        (
            step["loss"].as_f64().unwrap(),
            step["grad_norm"].as_f64().unwrap(),
        )
    };
    let one = first_step("one", &[], "train.batch_size=32");
    // Also with GradCache: the gathered loss's gradient reaches the chunks' second pass.
    for (name, gc) in [("two", "false"), ("two-gc", "true")] {
        let launch = ["--nproc", "2", "--set", &format!("grad_cache.enabled={gc}")];
        let two = first_step(name, &launch, "train.batch_size=16");
        assert!(
            (two.0 - one.0).abs() < 1e-4 * one.0,
            "{name}: loss {two:?} vs {one:?}"
        );
        assert!(
            (two.1 - one.1).abs() < 1e-3 * one.1,
            "{name}: gradient norm {two:?} vs {one:?}"
        );
    }
}

/// A CPU build asked for GPUs, or a rank started with a malformed launch variable, stops
/// before anything runs, saying what to change.
#[test]
fn launch_settings_a_build_or_environment_cannot_honour_are_refused() {
    // (A CUDA build would try to launch.)
    if !cfg!(feature = "cuda") {
        let out = kindling()
            .args([
                "pretrain",
                "recipes/tiny/bert-tiny-mlm.toml",
                "--gpus",
                "0,1",
            ])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("--gpus: this build of kindling has no GPU support"),
            "{err}"
        );
    }
    let out = kindling()
        .args(["pretrain", "recipes/tiny/bert-tiny-mlm.toml"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "5")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("RANK=5: expected less than WORLD_SIZE=2"),
        "{err}"
    );
}

/// A SIGTERM sent to the launcher alone (as a job scheduler sends it) reaches every rank: they
/// stop at the same step, rank 0 writes its checkpoint, and the launcher exits 128 + 15.
#[test]
fn sigterm_to_the_launcher_stops_every_rank_with_a_checkpoint() {
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("term");
    let child = kindling()
        .args([
            "pretrain",
            "recipes/tiny/bert-tiny-mlm.toml",
            "--nproc",
            "2",
        ])
        .arg("--set")
        .arg(format!("runs_dir=\"{}\"", runs.path().display()))
        .args(["--set", "name=\"term\"", "--set", "train.steps=100000"])
        .args(["--set", "train.save_every=0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Training runs once rank 0 has logged a step.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !run.join("metrics.jsonl").is_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "no training step after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(128 + 15), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    assert_eq!(checkpoint_names(&run).len(), 1, "{err}");
}

/// The multi-node form, without the launcher: two `kindling pretrain` processes started by hand
/// with torchrun's variables train exactly what `--nproc 2` trains.
#[test]
fn ranks_started_with_torchrun_variables_train_what_the_launcher_trains() {
    let runs = tempfile::tempdir().unwrap();
    ok(tiny(runs.path(), "launched", &["--nproc", "2"], &[]));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ranks: Vec<std::process::Child> = (0..2)
        .map(|rank| {
            let mut cmd = tiny_command(runs.path(), "by-hand", &[], &[]);
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in ranks {
        ok(child.wait_with_output().unwrap());
    }
    let file = "export/model.safetensors";
    let read = |name: &str| std::fs::read(runs.path().join(name).join(file)).unwrap();
    assert!(read("launched") == read("by-hand"), "{file} differs");
}
