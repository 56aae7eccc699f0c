//! The run folder: one process at a time (`RunLock`), and what a run may replace in it.

use std::path::{Path, PathBuf};

use kindling_train::checkpoint;

use super::resume::{resume_candidates, Candidates};
use crate::{RecipeError, RunOptions};

/// A run folder held by this process for as long as the guard lives: an advisory lock
/// (`flock`) on `RUN/.lock`, which holds this process's id for the message a second process
/// gets. A second `kindling` on the same folder (another terminal, a forgotten background job,
/// `--overwrite` or `--resume` while the first still trains) then stops with
/// [`RecipeError::RunInUse`] before it reads, deletes or writes anything, instead of
/// interleaving its checkpoints and logs with the first run's. The kernel drops the lock when
/// the process ends, however it ends (SIGKILL included), so a crash leaves no stale lock.
#[derive(Debug)]
pub(crate) struct RunLock {
    _file: Option<std::fs::File>,
}

impl RunLock {
    /// Takes `dir`'s lock (creating the folder), or fails naming the process that holds it.
    /// On a file system without locks the run goes on unguarded, with a warning.
    pub(crate) fn acquire(dir: &Path) -> Result<RunLock, RecipeError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut lock = Self::open(dir, true)?.expect("created");
        lock.claim(dir)?;
        Ok(lock)
    }

    /// Takes the lock of a run folder that already has one, changing nothing in it (the
    /// process id is written by [`RunLock::claim`], once validation has passed); `None` when
    /// there is no lock file yet (a fresh folder, or none at all).
    pub(crate) fn hold_existing(dir: &Path) -> Result<Option<RunLock>, RecipeError> {
        Self::open(dir, false)
    }

    /// The lock, held, or `None` when `create` is false and there is no lock file.
    fn open(dir: &Path, create: bool) -> Result<Option<RunLock>, RecipeError> {
        use std::io::Read;
        let path = dir.join(".lock");
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        match file.try_lock() {
            Ok(()) => Ok(Some(RunLock { _file: Some(file) })),
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                // Empty if the holder has not written its id yet.
                let _ = file.read_to_string(&mut pid);
                Err(RecipeError::RunInUse {
                    path: dir.to_path_buf(),
                    pid: pid.trim().parse().ok(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                eprintln!(
                    "warning: cannot lock {} ({e}); nothing stops a second run on this folder",
                    path.display()
                );
                Ok(Some(RunLock { _file: None }))
            }
        }
    }

    /// Writes this process's id into the held lock file, for the message a second process gets.
    fn claim(&mut self, dir: &Path) -> Result<(), RecipeError> {
        use std::io::{Seek, Write};
        let path = dir.join(".lock");
        if let Some(file) = &mut self._file {
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| write!(file, "{}", std::process::id()))
                .map_err(io(&path))?;
        }
        Ok(())
    }

    /// The lock for writing: `held` (from [`RunLock::hold_existing`]) with this process's id
    /// written, or a new one (creating the folder).
    pub(crate) fn commit(held: Option<RunLock>, dir: &Path) -> Result<RunLock, RecipeError> {
        match held {
            Some(mut lock) => {
                lock.claim(dir)?;
                Ok(lock)
            }
            None => Self::acquire(dir),
        }
    }
}

/// What [`prepare_run_folder`] would refuse, checked before any work: a fresh run on a folder
/// that holds a run, without `--overwrite`. Writes nothing.
pub(crate) fn check_run_folder(
    dir: &Path,
    opts: &RunOptions,
    resuming: bool,
) -> Result<(), RecipeError> {
    if !resuming && !opts.overwrite && !checkpoint::list(dir).is_empty() {
        return Err(RecipeError::RunExists {
            path: dir.to_path_buf(),
        });
    }
    Ok(())
}

/// A run folder read and checked but not yet changed: the first phase of every run.
///
/// ```text
/// plan_run         hold the lock if the folder has one (a busy run stops here), list the
///                  checkpoints a resume may continue from, refuse to replace a run without
///                  --overwrite                                        reads only
/// (the recipe)     data, tokenizer, model; first_loadable picks the checkpoint whose
///                  weights, optimizer state and cursor fit           reads only
/// commit           the lock with this process's id; --overwrite deletes the old run;
///                  recipe.toml                                        the first write
/// ```
/// In a data-parallel run only rank 0 holds the lock and writes; the other ranks only read.
pub(crate) struct PlannedRun {
    pub dir: PathBuf,
    pub candidates: Candidates,
    held: Option<RunLock>,
    rank: usize,
}

/// Plans the run in `run_dir` (see [`PlannedRun`]).
pub(crate) fn plan_run(
    run_dir: PathBuf,
    opts: &RunOptions,
    rank: usize,
) -> Result<PlannedRun, RecipeError> {
    let held = match rank {
        0 => RunLock::hold_existing(&run_dir)?,
        _ => None,
    };
    let candidates = match &opts.resume {
        Some(r) => resume_candidates(&run_dir, r)?,
        None => Candidates::none(),
    };
    if rank == 0 {
        check_run_folder(&run_dir, opts, !candidates.dirs.is_empty())?;
    }
    Ok(PlannedRun {
        dir: run_dir,
        candidates,
        held,
        rank,
    })
}

impl PlannedRun {
    /// The first write: takes the lock (rank 0), then replaces or continues the run folder
    /// and saves the resolved recipe (see [`prepare_run_folder`]). `resuming`: a checkpoint
    /// was picked. The run keeps the returned guard until it ends.
    pub(crate) fn commit(
        self,
        recipe_toml: &str,
        opts: &RunOptions,
        resuming: bool,
    ) -> Result<Option<RunLock>, RecipeError> {
        if self.rank > 0 {
            return Ok(None);
        }
        let lock = RunLock::commit(self.held, &self.dir)?;
        prepare_run_folder(self.dir, recipe_toml, opts, resuming)?;
        Ok(Some(lock))
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RecipeError + '_ {
    move |source| RecipeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// [`prepare_run_dir`] for any recipe type: `toml` is the resolved recipe.
pub(crate) fn prepare_run_folder(
    dir: PathBuf,
    toml: &str,
    opts: &RunOptions,
    resuming: bool,
) -> Result<PathBuf, RecipeError> {
    if !resuming && !checkpoint::list(&dir).is_empty() {
        if !opts.overwrite {
            return Err(RecipeError::RunExists { path: dir });
        }
        for sub in ["checkpoints", "export", "plots"] {
            let p = dir.join(sub);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(io(&p))?;
            }
        }
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("metrics.") || name.starts_with("events.out.tfevents.") {
                std::fs::remove_file(entry.path()).map_err(io(&entry.path()))?;
            }
        }
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    kindling_models::export::write_atomic(&dir.join("recipe.toml"), toml.as_bytes())?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_folder_is_held_by_one_guard_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let held = RunLock::acquire(&run).unwrap();
        // flock conflicts between two opens of the file, in one process as in two.
        match RunLock::acquire(&run) {
            Err(RecipeError::RunInUse { path, pid }) => {
                assert_eq!(path, run);
                assert_eq!(pid, Some(std::process::id()));
            }
            other => panic!("expected RunInUse, got {other:?}"),
        }
        drop(held);
        let again = RunLock::acquire(&run).unwrap();
        drop(again);
    }

    #[test]
    fn holding_an_existing_lock_writes_nothing_until_commit() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        assert!(
            RunLock::hold_existing(&run).unwrap().is_none(),
            "no folder, no lock"
        );
        drop(RunLock::acquire(&run).unwrap());
        std::fs::write(run.join(".lock"), "12345").unwrap();
        let held = RunLock::hold_existing(&run).unwrap();
        assert!(held.is_some());
        assert!(matches!(
            RunLock::hold_existing(&run),
            Err(RecipeError::RunInUse { .. })
        ));
        assert_eq!(std::fs::read_to_string(run.join(".lock")).unwrap(), "12345");
        let lock = RunLock::commit(held, &run).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.join(".lock")).unwrap(),
            std::process::id().to_string()
        );
        drop(lock);
    }
}
