//! Exact resume and crash safety, through the `kindling` binary: a run killed with SIGKILL at
//! several points (one of them in the middle of a checkpoint write) and resumed each time ends
//! with the same weights and optimiser state, bit for bit, as a run that was never interrupted;
//! SIGTERM writes a checkpoint and exits cleanly; a damaged checkpoint is refused and the resume
//! falls back to the previous valid one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{kindling, stderr};

/// The tiny MLM recipe with dropout on, a checkpoint every 3 steps and evals on the way.
fn tiny(runs: &Path, name: &str, resume: bool) -> Command {
    tiny_with(runs, name, resume, &[])
}

fn tiny_with(runs: &Path, name: &str, resume: bool, extra: &[String]) -> Command {
    run_of("recipes/tiny/bert-tiny-mlm.toml", runs, name, resume, extra)
}

/// `recipe` for 30 steps, a checkpoint every 3 (the last two kept), evals every 10.
fn run_of(recipe: &str, runs: &Path, name: &str, resume: bool, extra: &[String]) -> Command {
    let mut cmd = kindling();
    cmd.args(["pretrain", recipe]);
    for s in [
        format!("runs_dir=\"{}\"", runs.display()),
        format!("name=\"{name}\""),
        "train.steps=30".into(),
        "train.save_every=3".into(),
        "train.eval_every=10".into(),
        "train.keep_last=2".into(),
    ] {
        cmd.args(["--set", &s]);
    }
    for s in extra {
        cmd.args(["--set", s]);
    }
    if resume {
        cmd.args(["--resume", "auto"]);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

fn checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Polls until `cond` holds or the child exits; true if `cond` held.
fn wait_for(child: &mut Child, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("timed out");
}

fn final_tensors(run: &Path) -> (Vec<u8>, Vec<u8>) {
    let last = run.join("checkpoints/step-00000030");
    (
        std::fs::read(last.join("model.safetensors")).unwrap(),
        std::fs::read(last.join("optimizer.safetensors")).unwrap(),
    )
}

#[test]
fn sigkill_at_several_points_then_resume_equals_an_uninterrupted_run_bit_for_bit() {
    let runs = tempfile::tempdir().unwrap();
    let out = tiny(runs.path(), "straight", false).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let want = final_tensors(&runs.path().join("straight"));

    let run = runs.path().join("killed");
    let step_dir = |s: u64| run.join("checkpoints").join(format!("step-{s:08}"));
    let writing = || {
        checkpoints(&run)
            .iter()
            .any(|p| p.file_name().unwrap().to_string_lossy().ends_with(".tmp"))
    };
    // Kill points: after checkpoint 6 exists; in the middle of a checkpoint write (the fault
    // hook holds the half-written folder open for 300 ms); after checkpoint 21 exists.
    let mut kills = 0;
    let mut killed_mid_write = false;
    for (i, point) in ["after-6", "mid-write", "after-21"].iter().enumerate() {
        let mut cmd = tiny(runs.path(), "killed", i > 0);
        if *point == "mid-write" {
            cmd.env("KINDLING_FAULT_CHECKPOINT_DELAY_MS", "300");
        }
        let mut child = cmd.spawn().unwrap();
        let hit = match *point {
            "after-6" => wait_for(&mut child, || step_dir(6).join("state.json").is_file()),
            "after-21" => wait_for(&mut child, || step_dir(21).join("state.json").is_file()),
            _ => wait_for(&mut child, writing),
        };
        if hit {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
            killed_mid_write |= *point == "mid-write" && writing();
        }
        child.wait().unwrap();
    }
    assert_eq!(kills, 3, "every kill point was reached");
    assert!(killed_mid_write, "one kill landed in a checkpoint write");
    let out = tiny(runs.path(), "killed", true).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resume: "), "{}", stderr(&out));
    let got = final_tensors(&run);
    assert!(
        got.0 == want.0,
        "final weights differ from the uninterrupted run"
    );
    assert!(got.1 == want.1, "final optimiser state differs");
    // The log has each step once, as if the run had never stopped.
    let steps: Vec<u64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
}

#[test]
fn sigterm_writes_a_checkpoint_and_exits_cleanly() {
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("term");
    let mut cmd = tiny(runs.path(), "term", false);
    cmd.args(["--set", "train.steps=100000", "--set", "train.save_every=0"]);
    let mut child = cmd.spawn().unwrap();
    // Wait until training runs (the first eval has written a checkpoint), then SIGTERM.
    assert!(wait_for(&mut child, || run.join("metrics.jsonl").is_file()));
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(128 + 15), "{err}");
    assert!(err.contains("interrupted at step"), "{err}");
    let last = checkpoints(&run).pop().expect("a checkpoint was written");
    assert!(last.join("state.json").is_file());
    assert!(!last.to_string_lossy().ends_with(".tmp"));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(last.join("state.json")).unwrap()).unwrap();
    assert!(
        err.contains(&format!("interrupted at step {}", state["step"])),
        "{err}"
    );
    // The line that says how to go on is the command itself, and it works.
    let line = err
        .lines()
        .find(|l| l.trim_start().starts_with("kindling pretrain "))
        .unwrap_or_else(|| panic!("no resume command: {err}"));
    let words = shlex::split(line.trim()).unwrap();
    assert!(
        words.ends_with(&["--resume".into(), "auto".into()]),
        "{line}"
    );
    let again = Command::new(env!("CARGO_BIN_EXE_kindling"))
        .current_dir(crate::common::repo_root())
        .args(&words[1..])
        .args(["--set", "train.steps=12"])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("resume: "), "{}", stderr(&again));
}

#[test]
fn a_corrupt_checkpoint_is_refused_and_resume_falls_back_to_the_previous_one() {
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("corrupt");
    let mut cmd = tiny(runs.path(), "corrupt", false);
    cmd.args(["--set", "train.steps=9", "--set", "train.eval_every=0"]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let names: Vec<String> = checkpoints(&run)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["step-00000006", "step-00000009"]);
    // Flip one byte in the middle of the newest checkpoint's weights.
    let weights = run.join("checkpoints/step-00000009/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();

    let mut cmd = tiny(runs.path(), "corrupt", true);
    cmd.args(["--set", "train.steps=12", "--set", "train.eval_every=0"]);
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("step-00000009") && err.contains("SHA-256"),
        "names the damaged checkpoint and why: {err}"
    );
    assert!(err.contains("step-00000006 (step 6)"), "falls back: {err}");

    // Named explicitly, a damaged checkpoint is an error, not a fallback.
    std::fs::write(
        run.join("checkpoints/step-00000012/optimizer.safetensors"),
        b"truncated",
    )
    .unwrap();
    let mut cmd = tiny(runs.path(), "corrupt", false);
    cmd.args(["--resume"])
        .arg(run.join("checkpoints/step-00000012"));
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("optimizer.safetensors has 9 bytes"), "{err}");
}

/// Streaming from token shards (`[data.prepare]`): prepare, train, SIGKILL after the first
/// checkpoint, resume: the same weights and optimiser state as an uninterrupted run. The resume
/// reuses the prepared folder and restarts from the (epoch, position) cursor, replaying nothing.
#[test]
fn a_run_streaming_from_token_shards_resumes_bit_for_bit() {
    let runs = tempfile::tempdir().unwrap();
    let shards = [format!(
        "data.prepare.dir=\"{}\"",
        runs.path().join("prepared").display()
    )];
    let out = tiny_with(runs.path(), "straight", false, &shards)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("(prepared)"), "{err}");
    let want = final_tensors(&runs.path().join("straight"));

    let run = runs.path().join("killed");
    let mut child = tiny_with(runs.path(), "killed", false, &shards)
        .spawn()
        .unwrap();
    let first = run.join("checkpoints/step-00000003/state.json");
    assert!(
        wait_for(&mut child, || first.is_file()),
        "ended before the kill"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let out = tiny_with(runs.path(), "killed", true, &shards)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("resume:") && err.contains("up to date, reused"),
        "{err}"
    );
    assert!(
        final_tensors(&run) == want,
        "resumed run differs from the uninterrupted one"
    );
}

/// DINO with multi-crop (2 global 28px and 6 local 12px views of each image, a ViT reading
/// resized positions for the local ones), killed with SIGKILL twice (before and after the
/// teacher temperature's warmup and the last layer's freeze end) and resumed: the weights, the
/// EMA teacher, the centre, the update count and the optimiser state end bit for bit as an
/// uninterrupted run's.
#[test]
fn a_multi_crop_dino_run_resumes_bit_for_bit_after_sigkill() {
    let runs = tempfile::tempdir().unwrap();
    let dino = |name: &str, resume: bool| {
        let extra = [
            "loss.warmup_teacher_temperature_steps=12".to_string(),
            "loss.freeze_last_layer_steps=8".into(),
        ];
        run_of(
            "recipes/tiny/dino-tiny.toml",
            runs.path(),
            name,
            resume,
            &extra,
        )
    };
    let out = dino("straight", false).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let want = final_tensors(&runs.path().join("straight"));
    let header = String::from_utf8_lossy(&want.0[..want.0.len().min(1 << 16)]).to_string();
    for name in [
        "dino.center",
        "dino.updates",
        "target.dino.last_layer.weight",
    ] {
        assert!(header.contains(name), "checkpoints carry {name}");
    }

    let run = runs.path().join("killed");
    for (i, step) in [6u64, 15].iter().enumerate() {
        let mut child = dino("killed", i > 0).spawn().unwrap();
        let state = run
            .join("checkpoints")
            .join(format!("step-{step:08}"))
            .join("state.json");
        assert!(
            wait_for(&mut child, || state.is_file()),
            "ended before the kill after step {step}"
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    let out = dino("killed", true).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resume: "), "{}", stderr(&out));
    let got = final_tensors(&run);
    assert!(
        got.0 == want.0,
        "final weights differ from the uninterrupted run"
    );
    assert!(got.1 == want.1, "final optimiser state differs");
}

#[test]
fn a_muon_run_resumes_bit_for_bit_and_checkpoints_its_momentum() {
    let runs = tempfile::tempdir().unwrap();
    let muon = [
        "train.optimizer.kind=\"muon\"".to_string(),
        "train.optimizer.momentum=0.95".into(),
        "train.optimizer.nesterov=true".into(),
    ];
    let out = tiny_with(runs.path(), "straight", false, &muon)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let want = final_tensors(&runs.path().join("straight"));
    let header = String::from_utf8_lossy(&want.1[..want.1.len().min(1 << 16)]).to_string();
    assert!(
        header.contains("muon_momentum.bert.encoder.layer.0.attention.self.query.weight")
            && header.contains("exp_avg.bert.embeddings.word_embeddings.weight")
            && !header.contains("exp_avg.bert.encoder.layer.0.attention.self.query.weight"),
        "hidden matrices on Muon, embeddings on AdamW"
    );

    let run = runs.path().join("killed");
    let mut child = tiny_with(runs.path(), "killed", false, &muon)
        .spawn()
        .unwrap();
    let first = run.join("checkpoints/step-00000006/state.json");
    assert!(
        wait_for(&mut child, || first.is_file()),
        "ended before the kill"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let out = tiny_with(runs.path(), "killed", true, &muon)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        final_tensors(&run) == want,
        "resumed Muon run differs from the uninterrupted one"
    );
}

/// A second run on a folder that a run is writing (`--overwrite` or `--resume auto` from another
/// terminal, or `kindling export`) exits 2 naming the first run's process, and deletes or writes
/// nothing: the first run trains on and ends as it would have. Once it has ended, the folder is
/// free again.
#[test]
fn a_second_run_on_a_busy_run_folder_is_refused_and_touches_nothing() {
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("busy");
    let mut cmd = tiny(runs.path(), "busy", false);
    cmd.args(["--set", "train.steps=100000", "--set", "train.save_every=2"]);
    // Not piped: nothing reads the first run's progress until it ends.
    let mut first = cmd.stderr(Stdio::null()).spawn().unwrap();
    assert!(wait_for(&mut first, || !checkpoints(&run).is_empty()));
    let pid = first.id();
    let mut overwrite = tiny(runs.path(), "busy", false);
    overwrite.arg("--overwrite");
    let mut export = kindling();
    export.arg("export").arg(&run);
    for (what, mut second) in [
        ("--overwrite", overwrite),
        ("--resume auto", tiny(runs.path(), "busy", true)),
        ("export", export),
    ] {
        let out = second.stderr(Stdio::piped()).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains(&format!(
                "{} is in use by another kindling process (pid {pid})",
                run.display()
            )),
            "{what}: {err}"
        );
        assert!(
            first.try_wait().unwrap().is_none(),
            "{what} stopped the first run"
        );
        assert!(!checkpoints(&run).is_empty() && run.join("metrics.jsonl").is_file());
    }
    // The first run still trains: it goes on writing checkpoints after the refusals.
    let before = checkpoints(&run).pop().unwrap();
    assert!(wait_for(&mut first, || checkpoints(&run).pop().unwrap() > before));
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    assert_eq!(first.wait().unwrap().code(), Some(128 + 15));
    // Free again: the export (one process at a time) now runs.
    let out = kindling().args(["export"]).arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}
