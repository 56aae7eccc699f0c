//! Checkpoint I/O: `checkpoints/step-NNNNNNNN/{model.safetensors, optimizer.safetensors,
//! state.json}`. A checkpoint is written into a hidden temporary folder and renamed into place
//! in one step, so a crash leaves either the whole checkpoint or none of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::optim::AdamW;
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
    opt: &AdamW,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(run_dir, state.step);
    let parent = final_dir.parent().expect("checkpoint dir has a parent");
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = parent.join(format!(".step-{:08}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    save_tensors(&tmp.join("model.safetensors"), &named_vars(varmap))?;
    save_tensors(&tmp.join("optimizer.safetensors"), &opt.state_tensors())?;
    let mut st = serde_json::to_value(state).expect("state serialises");
    st["optimizer_t"] = opt.t.into();
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
    prune(parent, keep_last)?;
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

fn prune(parent: &Path, keep_last: usize) -> Result<()> {
    let run_dir = parent.parent().expect("checkpoints/ has a parent");
    let all = list(run_dir);
    for old in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
        std::fs::remove_dir_all(old).map_err(io_err(old))?;
    }
    Ok(())
}

/// Loads a checkpoint's weights into `varmap` (every variable must be present) and returns
/// its state; restores the optimiser moments too when `opt` is given.
pub fn load(
    dir: &Path,
    varmap: &VarMap,
    opt: Option<&mut AdamW>,
    device: &Device,
) -> Result<TrainerState> {
    let bad = |msg: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg,
    };
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
    let text =
        std::fs::read_to_string(dir.join("state.json")).map_err(io_err(&dir.join("state.json")))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    let state: TrainerState =
        serde_json::from_value(raw.clone()).map_err(|e| bad(format!("state.json: {e}")))?;
    if let Some(opt) = opt {
        let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)
            .map_err(|e| bad(e.to_string()))?;
        let t = raw["optimizer_t"]
            .as_u64()
            .ok_or_else(|| bad("state.json has no optimizer_t".into()))?;
        opt.load_state(t, |n| moments.get(n).cloned())
            .map_err(bad)?;
    }
    Ok(state)
}
