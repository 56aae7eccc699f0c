//! Writing files in the Hugging Face layout: safetensors with `{"format": "pt"}` metadata (what
//! `transformers` writes and expects), and JSON, each written to a temporary name and renamed so
//! a crash never leaves a half-written file behind.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use candle_core::Tensor;

use crate::{ModelError, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| ModelError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Writes named tensors as safetensors with HF's `{"format": "pt"}` metadata (plus `extra`).
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    extra: &[(&str, String)],
) -> Result<()> {
    let mut meta: HashMap<String, String> =
        HashMap::from([("format".to_string(), "pt".to_string())]);
    meta.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    // safetensors wants contiguous row-major data.
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| ModelError::File {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
    write_atomic(path, &bytes)
}

/// Every variable of `varmap`, sorted by name: what a `model.safetensors` export holds.
pub fn varmap_tensors(varmap: &candle_nn::VarMap) -> Vec<(String, Tensor)> {
    let data = varmap.data().lock().expect("varmap lock poisoned");
    let mut v: Vec<(String, Tensor)> = data
        .iter()
        .map(|(n, var)| (n.clone(), var.as_tensor().clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Writes a JSON value, pretty-printed, atomically.
pub fn save_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_atomic(
        path,
        (serde_json::to_string_pretty(value).expect("JSON values serialise") + "\n").as_bytes(),
    )
}
