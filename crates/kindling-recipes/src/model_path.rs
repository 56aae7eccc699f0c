//! Model paths as recipes give them: a folder, or `hf://NS/NAME[@REV]`, pulled into the Hub
//! cache (or, offline, taken from it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::RecipeError;

/// `path` as a folder. An `hf://` path is resolved once per process: the run lifecycle reads
/// the model in several places (validation, preparation, export), and each pull asks the Hub.
pub fn resolve(path: &Path) -> Result<PathBuf, RecipeError> {
    static RESOLVED: Mutex<Option<HashMap<PathBuf, PathBuf>>> = Mutex::new(None);
    if !path.to_string_lossy().starts_with("hf://") {
        return Ok(path.to_path_buf());
    }
    let mut memo = RESOLVED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = memo.get_or_insert_with(HashMap::new).get(path) {
        return Ok(dir.clone());
    }
    let dir = kindling_hub::resolve_model_path(path).map_err(|e| RecipeError::Invalid {
        key: "model.path".into(),
        msg: e.to_string(),
    })?;
    memo.get_or_insert_with(HashMap::new)
        .insert(path.to_path_buf(), dir.clone());
    Ok(dir)
}
