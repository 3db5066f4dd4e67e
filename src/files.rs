//! Writing run outputs: atomic file writes (a reader — or a resumed sweep — never sees half a file),
//! pretty JSON and `.npy` arrays. Every command's output goes through these.

use std::io::Write;
use std::path::Path;

use ndarray_npy::WriteNpyExt;

use crate::{Error, Result};

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Write { path: path.to_path_buf(), source }
}

/// A name suffix no other process uses: the pid alone is not enough when tasks on several machines (or
/// containers, where every pid may be 1) share one output folder. Random bits name files only; they never
/// touch results.
pub fn unique_tag() -> String {
    format!("{}-{:016x}", std::process::id(), rand::random::<u64>())
}

/// Writes `bytes` to `path` through a synced temporary file in the same folder and a rename, so readers
/// see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", unique_tag()));
    let mut f = std::fs::File::create(&tmp).map_err(write_err(&tmp))?;
    f.write_all(bytes).map_err(write_err(&tmp))?;
    f.sync_all().map_err(write_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(write_err(path))
}

/// Pretty JSON, written atomically; creates the parent folder if needed.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Internal(format!("json: {e}")))?;
    write_atomic(path, text.as_bytes())
}

/// An array as `.npy` (readable by numpy and `ndarray-npy`).
pub fn write_npy<A: WriteNpyExt>(path: &Path, array: &A) -> Result<()> {
    let file = std::fs::File::create(path).map_err(write_err(path))?;
    array
        .write_npy(std::io::BufWriter::new(file))
        .map_err(|e| Error::Write { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_json_and_npy_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/a.json");
        write_json(&p, &serde_json::json!({"x": 1})).unwrap();
        write_json(&p, &serde_json::json!({"x": 2})).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["x"], 2);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);
        let a = ndarray::arr2(&[[1.0f64, 2.0], [3.0, 4.0]]);
        let q = dir.path().join("a.npy");
        write_npy(&q, &a).unwrap();
        let b: ndarray::Array2<f64> = ndarray_npy::read_npy(&q).unwrap();
        assert_eq!(a, b);
    }
}
