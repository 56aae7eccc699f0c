//! Checkpoint I/O: `checkpoints/step-NNNNNNNN/{model.safetensors, optimizer.safetensors,
//! state.json}`. A checkpoint is written into a hidden temporary folder and renamed into place
//! in one step, so a crash leaves either the whole checkpoint or none of it. `state.json` lists
//! the size and SHA-256 of the two tensor files; [`verify`] checks them before anything is
//! loaded, so a checkpoint damaged later (disk, copy, editing) is refused with a message and a
//! resume falls back to the previous valid one ([`newest_valid`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

use crate::optim::Optimizer;
use crate::{io_err, Result, TrainError};

/// Everything besides tensors that a resume needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser updates completed.
    pub step: u64,
    /// The data source's cursor after the last consumed batch (opaque to the trainer).
    pub data_cursor: serde_json::Value,
    pub seed: u64,
    /// The most recent eval metrics.
    pub last_eval: Option<std::collections::BTreeMap<String, f64>>,
    /// Training wall-clock so far, over all sessions of the run (for `max_time`).
    #[serde(default)]
    pub elapsed_secs: f64,
    /// The best eval so far and the early-stopping count (see `EarlyStopping`).
    #[serde(default)]
    pub best: Option<Best>,
    /// The dynamic loss scale and its count of clean updates (f16 mixed precision).
    #[serde(default)]
    pub loss_scale: Option<(f64, u64)>,
}

/// The best value of the monitored eval metric, where it was reached, and how many evals since
/// then did not improve on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Best {
    pub metric: String,
    pub value: f64,
    pub step: u64,
    pub evals_without_improvement: u32,
}

/// The files of a checkpoint whose size and digest `state.json` records.
const TENSOR_FILES: [&str; 2] = ["model.safetensors", "optimizer.safetensors"];

/// Size in bytes and hex SHA-256 of a file.
fn digest(path: &Path) -> Result<(u64, String)> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let hash = Sha256::digest(&bytes);
    let hex = hash.iter().map(|b| format!("{b:02x}")).collect();
    Ok((bytes.len() as u64, hex))
}

pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:08}"))
}

fn named_vars(varmap: &VarMap) -> Vec<(String, Tensor)> {
    let data = varmap.data().lock().expect("varmap lock poisoned");
    let mut v: Vec<(String, Tensor)> = data
        .iter()
        .map(|(n, var)| (n.clone(), var.as_tensor().clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let bytes = safetensors::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )
    .map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// Writes a checkpoint for `state.step`; returns its folder. Keeps the newest `keep_last`.
pub fn save(
    run_dir: &Path,
    varmap: &VarMap,
    opt: &dyn Optimizer,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    save_with(run_dir, varmap, opt, state, keep_last, &[])
}

/// [`save`], also copying `extras` (files such as the run's recipe, tokenizer and metrics so
/// far) into the checkpoint, so that one checkpoint folder describes its run on its own.
pub fn save_with(
    run_dir: &Path,
    varmap: &VarMap,
    opt: &dyn Optimizer,
    state: &TrainerState,
    keep_last: usize,
    extras: &[PathBuf],
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(run_dir, state.step);
    let parent = final_dir.parent().expect("checkpoint dir has a parent");
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    // Temporary folders left by a write that was killed: never valid, never listed.
    for entry in std::fs::read_dir(parent).map_err(io_err(parent))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".step-") && name.ends_with(".tmp") {
            std::fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
        }
    }
    let tmp = parent.join(format!(".step-{:08}.tmp", state.step));
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    save_tensors(&tmp.join("model.safetensors"), &named_vars(varmap))?;
    // Fault injection for the crash tests: hold the half-written checkpoint open this long, so
    // a test can kill the process in the middle of a write. Unset in normal use.
    if let Some(ms) = std::env::var("KINDLING_FAULT_CHECKPOINT_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    save_tensors(&tmp.join("optimizer.safetensors"), &opt.state_tensors())?;
    for extra in extras.iter().filter(|p| p.is_file()) {
        let name = extra.file_name().expect("an extra file has a name");
        std::fs::copy(extra, tmp.join(name)).map_err(io_err(extra))?;
    }
    let mut st = serde_json::to_value(state).expect("state serialises");
    st["optimizer_t"] = opt.steps_done().into();
    for f in TENSOR_FILES {
        let (bytes, sha256) = digest(&tmp.join(f))?;
        st["files"][f] = serde_json::json!({ "bytes": bytes, "sha256": sha256 });
    }
    std::fs::write(
        tmp.join("state.json"),
        serde_json::to_string_pretty(&st).unwrap(),
    )
    .map_err(io_err(&tmp))?;
    // fsync the files before the rename publishes them.
    for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        let p = tmp.join(f);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&p))?;
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io_err(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io_err(&final_dir))?;
    prune(parent, keep_last, state.best.as_ref().map(|b| b.step))?;
    Ok(final_dir)
}

/// Checkpoint folders under `run_dir`, oldest first.
pub fn list(run_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    v.sort();
    v
}

/// The retention policy, apart from any I/O: of the checkpoint steps `all` (oldest first), the
/// ones to delete so that the newest `keep_last` (at least 1) and the best one remain.
pub fn to_remove(all: &[u64], keep_last: usize, best: Option<u64>) -> Vec<u64> {
    let n_old = all.len().saturating_sub(keep_last.max(1));
    all[..n_old]
        .iter()
        .copied()
        .filter(|s| Some(*s) != best)
        .collect()
}

fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

fn prune(parent: &Path, keep_last: usize, best_step: Option<u64>) -> Result<()> {
    let run_dir = parent.parent().expect("checkpoints/ has a parent");
    let steps: Vec<u64> = list(run_dir).iter().filter_map(|d| step_of(d)).collect();
    for step in to_remove(&steps, keep_last, best_step) {
        let old = checkpoint_dir(run_dir, step);
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(())
}

/// Checks a checkpoint folder: `state.json` parses, and each tensor file has the size and
/// SHA-256 recorded there. Returns the raw `state.json`.
pub fn verify(dir: &Path) -> Result<serde_json::Value> {
    let bad = |msg: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| bad(format!("cannot read state.json: {e}")))?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("state.json is not valid JSON: {e}")))?;
    for f in TENSOR_FILES {
        let want = &raw["files"][f];
        let (Some(bytes), Some(sha)) = (want["bytes"].as_u64(), want["sha256"].as_str()) else {
            return Err(bad(format!(
                "state.json records no size and checksum for {f}"
            )));
        };
        let path = dir.join(f);
        if !path.is_file() {
            return Err(bad(format!("{f} is missing")));
        }
        let (got_bytes, got_sha) = digest(&path)?;
        if got_bytes != bytes {
            return Err(bad(format!(
                "{f} has {got_bytes} bytes, state.json recorded {bytes} (truncated or replaced)"
            )));
        }
        if got_sha != sha {
            return Err(bad(format!(
                "{f} does not match its SHA-256 in state.json (corrupt or modified)"
            )));
        }
    }
    Ok(raw)
}

/// The newest checkpoint of `run_dir` that passes [`verify`], and the newer ones that failed,
/// with the reason each was refused.
pub fn newest_valid(run_dir: &Path) -> (Option<PathBuf>, Vec<TrainError>) {
    let mut refused = Vec::new();
    for dir in list(run_dir).into_iter().rev() {
        match verify(&dir) {
            Ok(_) => return (Some(dir), refused),
            Err(e) => refused.push(e),
        }
    }
    (None, refused)
}

/// Whether `dir`'s weights fit `varmap`: every parameter is there with its shape. Reads only
/// the safetensors header, so a resume can refuse another objective's checkpoint (or one of
/// another shape) before it changes anything in the run folder.
pub fn check_tensors(dir: &Path, varmap: &VarMap) -> Result<()> {
    let bad = |msg: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
    let path = dir.join("model.safetensors");
    let mut f = std::fs::File::open(&path).map_err(crate::io_err(&path))?;
    let header = {
        use std::io::Read;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|_| bad("model.safetensors is too short".into()))?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            return Err(bad("model.safetensors has no valid header".into()));
        }
        let mut bytes = vec![0u8; n as usize];
        f.read_exact(&mut bytes)
            .map_err(|_| bad("model.safetensors has no valid header".into()))?;
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| bad(format!("model.safetensors header: {e}")))?
    };
    let data = varmap.data().lock().expect("varmap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let want = data[name].dims();
        let Some(t) = header.get(name.as_str()) else {
            return Err(bad(format!(
                "model.safetensors has no tensor `{name}`: the checkpoint is of another model \
                 or objective"
            )));
        };
        let got: Vec<usize> = t["shape"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_u64().map(|d| d as usize))
            .collect();
        if got != want {
            return Err(bad(format!(
                "`{name}` has shape {got:?}, the model wants {want:?}"
            )));
        }
    }
    Ok(())
}

/// A checkpoint's `state.json`, verified (no tensors are loaded).
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    parse_state(dir, verify(dir)?)
}

/// The `state.json` of a checkpoint [`verify`] has already passed, read without hashing the
/// tensor files again.
pub fn read_verified_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let raw = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("state.json: {e}"),
    })?;
    parse_state(dir, raw)
}

fn parse_state(dir: &Path, raw: serde_json::Value) -> Result<TrainerState> {
    serde_json::from_value(raw).map_err(|e| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("state.json: {e}"),
    })
}

/// Loads a checkpoint's weights into `varmap` (every variable must be present) and returns
/// its state; restores the optimiser moments too when `opt` is given.
pub fn load(
    dir: &Path,
    varmap: &VarMap,
    opt: Option<&mut dyn Optimizer>,
    device: &Device,
) -> Result<TrainerState> {
    let bad = |msg: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
    let raw = verify(dir)?;
    let model = candle_core::safetensors::load(dir.join("model.safetensors"), device)
        .map_err(|e| bad(e.to_string()))?;
    {
        let data = varmap.data().lock().expect("varmap lock poisoned");
        for (name, var) in data.iter() {
            let t = model
                .get(name)
                .ok_or_else(|| bad(format!("model.safetensors has no tensor `{name}`")))?;
            if t.shape() != var.shape() {
                return Err(bad(format!(
                    "`{name}` has shape {:?}, the model wants {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(t)?;
        }
    }
    let state: TrainerState =
        serde_json::from_value(raw.clone()).map_err(|e| bad(format!("state.json: {e}")))?;
    if let Some(opt) = opt {
        let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)
            .map_err(|e| bad(e.to_string()))?;
        let t = raw["optimizer_t"]
            .as_u64()
            .ok_or_else(|| bad("state.json has no optimizer_t".into()))?;
        opt.load_state(t, &mut |n| moments.get(n).cloned())
            .map_err(bad)?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::to_remove;

    #[test]
    fn keeps_the_newest_k_and_the_best() {
        assert_eq!(to_remove(&[10, 20, 30, 40], 2, None), vec![10, 20]);
        assert_eq!(to_remove(&[10, 20, 30, 40], 2, Some(10)), vec![20]);
        assert_eq!(to_remove(&[10, 20, 30, 40], 2, Some(40)), vec![10, 20]);
        assert_eq!(
            to_remove(&[10], 0, None),
            Vec::<u64>::new(),
            "never deletes the last one"
        );
        assert_eq!(to_remove(&[10, 20], 5, None), Vec::<u64>::new());
    }
}
