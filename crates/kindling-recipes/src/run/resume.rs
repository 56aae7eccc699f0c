//! Which checkpoint a resumed run continues from, and loading it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::VarMap;
use kindling_train::checkpoint;

use crate::{RecipeError, Resume};

/// [`resume_checkpoint`] for any recipe type whose run folder is `run_dir` (without the
/// MLM-specific same-run checks).
pub fn resume_checkpoint_in(
    run_dir: &Path,
    resume: &Resume,
) -> Result<Option<PathBuf>, RecipeError> {
    let run_dir = run_dir.to_path_buf();
    let newest = |dir: &Path| {
        let (found, refused) = checkpoint::newest_valid(dir);
        for e in refused {
            eprintln!("warning: skipping a damaged checkpoint: {e}");
        }
        found
    };
    let (dir, found) = match resume {
        Resume::Auto => {
            let found = newest(&run_dir);
            if found.is_none() {
                eprintln!(
                    "resume: no valid checkpoint in {}; starting a fresh run",
                    run_dir.display()
                );
            }
            (run_dir.clone(), found)
        }
        Resume::Path(p) if p.join("state.json").is_file() => {
            checkpoint::verify(p)?;
            let dir = p
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            (dir, Some(p.clone()))
        }
        Resume::Path(p) => {
            let found = newest(p).ok_or_else(|| RecipeError::Resume {
                path: p.clone(),
                msg: "no valid checkpoint there (checkpoints/step-*/)".into(),
            })?;
            (p.clone(), Some(found))
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
    Ok(found)
}

/// Loads a checkpoint into `varmap` and `opt` for a resume, with its data cursor.
pub(crate) fn load_for_resume<C: serde::de::DeserializeOwned>(
    dir: &Path,
    varmap: &VarMap,
    opt: &mut dyn kindling_train::Optimizer,
    device: &Device,
) -> Result<(kindling_train::TrainerState, C), RecipeError> {
    let state = checkpoint::load(dir, varmap, Some(opt), device)?;
    let cursor =
        serde_json::from_value(state.data_cursor.clone()).map_err(|e| RecipeError::Resume {
            path: dir.to_path_buf(),
            msg: format!("data cursor {}: {e}", state.data_cursor),
        })?;
    eprintln!("resume: {} (step {})", dir.display(), state.step);
    Ok((state, cursor))
}
