//! Which checkpoint a resumed run continues from, and loading it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::VarMap;
use kindling_train::checkpoint;

use crate::{RecipeError, Resume};

/// The checkpoints a `--resume` may continue from, newest first, each of whose files match
/// the checksums in its `state.json`: every such checkpoint of the run folder (`auto`, or a run
/// folder named), with a warning for each damaged one skipped, or exactly the checkpoint folder
/// named. Empty (with a note) for `auto` on a folder without a valid checkpoint: a fresh start.
/// Reads only: nothing in the run folder changes.
pub struct Candidates {
    pub dirs: Vec<PathBuf>,
    /// A checkpoint folder was named: it must load; no other is tried.
    pub explicit: bool,
}

impl Candidates {
    /// No resume: a fresh start.
    pub fn none() -> Self {
        Candidates {
            dirs: Vec::new(),
            explicit: false,
        }
    }
}

/// The [`Candidates`] of `resume` for the run folder `run_dir`; a checkpoint of another run
/// folder is an error.
pub fn resume_candidates(run_dir: &Path, resume: &Resume) -> Result<Candidates, RecipeError> {
    let run_dir = run_dir.to_path_buf();
    let valid = |dir: &Path| {
        let mut found = Vec::new();
        for c in checkpoint::list(dir).into_iter().rev() {
            match checkpoint::verify(&c) {
                Ok(_) => found.push(c),
                Err(e) => eprintln!("warning: skipping a damaged checkpoint: {e}"),
            }
        }
        found
    };
    let (dir, found, explicit) = match resume {
        Resume::Auto => {
            let found = valid(&run_dir);
            if found.is_empty() {
                eprintln!(
                    "resume: no valid checkpoint in {}; starting a fresh run",
                    run_dir.display()
                );
            }
            (run_dir.clone(), found, false)
        }
        Resume::Path(p) if p.join("state.json").is_file() => {
            checkpoint::verify(p)?;
            let dir = p
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            (dir, vec![p.clone()], true)
        }
        Resume::Path(p) => {
            let found = valid(p);
            if found.is_empty() {
                return Err(RecipeError::Resume {
                    path: p.clone(),
                    msg: "no valid checkpoint there (checkpoints/step-*/)".into(),
                });
            }
            (p.clone(), found, false)
        }
    };
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    if !same(&dir, &run_dir) {
        return Err(RecipeError::Resume {
            path: dir,
            msg: format!(
                "that checkpoint belongs to another run folder than this recipe's ({}); use the \
                 run's recipe.toml or --set name=...",
                run_dir.display()
            ),
        });
    }
    Ok(Candidates {
        dirs: found,
        explicit,
    })
}

/// The newest of `candidates` that `load` accepts (it loads the weights, the optimizer state
/// and the data cursor, and checks that they fit this run's model and data), with what it
/// returned. A candidate `load` refuses is skipped with a warning, unless it was named
/// explicitly; none accepted is an error. `Ok(None)`: no candidates, a fresh start.
pub(crate) fn first_loadable<T>(
    candidates: &Candidates,
    mut load: impl FnMut(&Path) -> Result<T, RecipeError>,
) -> Result<Option<(PathBuf, T)>, RecipeError> {
    let mut refused = Vec::new();
    for dir in &candidates.dirs {
        match load(dir) {
            Ok(t) => {
                match checkpoint::read_verified_state(dir) {
                    Ok(state) => eprintln!("resume: {} (step {})", dir.display(), state.step),
                    Err(_) => eprintln!("resume: {}", dir.display()),
                }
                return Ok(Some((dir.clone(), t)));
            }
            Err(e) if candidates.explicit => {
                return Err(RecipeError::Resume {
                    path: dir.clone(),
                    msg: e.to_string(),
                })
            }
            Err(e) => {
                eprintln!("warning: skipping a checkpoint that does not fit this run: {e}");
                refused.push(e.to_string());
            }
        }
    }
    match candidates.dirs.first() {
        None => Ok(None),
        Some(newest) => Err(RecipeError::Resume {
            path: newest.parent().unwrap_or(newest).to_path_buf(),
            msg: format!(
                "no checkpoint there fits this run ({}); nothing was changed",
                refused.join("; ")
            ),
        }),
    }
}

/// The newest checkpoint [`resume_candidates`] finds (for recipes that check it as they load).
pub fn resume_checkpoint_in(
    run_dir: &Path,
    resume: &Resume,
) -> Result<Option<PathBuf>, RecipeError> {
    Ok(resume_candidates(run_dir, resume)?.dirs.into_iter().next())
}

/// Loads the checkpoint `dir` for a resume: its weights (their names and shapes checked
/// against `varmap` first), the optimizer state into `opt`, and its data cursor as `C`, which
/// `check` must accept (a cursor past the end of this run's data means the checkpoint was not
/// trained on it). Changes nothing on disk; on an error the model and optimizer may hold part
/// of the checkpoint, and the next candidate's load replaces all of it.
pub(crate) fn load_checked<C: serde::de::DeserializeOwned>(
    dir: &Path,
    varmap: &VarMap,
    opt: &mut dyn kindling_train::Optimizer,
    device: &Device,
    check: impl FnOnce(&C) -> Result<(), String>,
) -> Result<(kindling_train::TrainerState, C), RecipeError> {
    let bad = |msg: String| RecipeError::Resume {
        path: dir.to_path_buf(),
        msg,
    };
    checkpoint::check_tensors(dir, varmap)?;
    let state = checkpoint::load(dir, varmap, Some(opt), device)?;
    let cursor: C = serde_json::from_value(state.data_cursor.clone())
        .map_err(|e| bad(format!("state.json data_cursor {}: {e}", state.data_cursor)))?;
    check(&cursor).map_err(|m| {
        bad(format!(
            "its data cursor {} {m}: the checkpoint was not trained on this data",
            state.data_cursor
        ))
    })?;
    Ok((state, cursor))
}

/// A saved `(epoch, position)` cursor over `n` items, for a [`super::Loader::seek`]: parsed,
/// and a position past the end refused (the checkpoint was trained on other data).
pub(crate) fn cursor_within(
    cursor: &serde_json::Value,
    n: u64,
    items: &str,
) -> Result<kindling_data::Cursor, String> {
    let c: kindling_data::Cursor = serde_json::from_value(cursor.clone())
        .map_err(|e| format!("is not an (epoch, position) cursor: {e}"))?;
    if c.position > n {
        return Err(format!("is past the end of the {n} {items}"));
    }
    Ok(c)
}
