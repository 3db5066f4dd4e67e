//! Weights on disk: safetensors files with f32 tensors named as in the [`ParamStore`] (names and shapes
//! in docs/tensors.md), so PyTorch users can load them with `safetensors.torch.load_file`.
//!
//! The file's `__metadata__` maps every tensor name to its parameter group (`"embedding"`, `"router"`, ...)
//! and `"format"` to `"pt"`; [`load_safetensors`] reads the groups back, and a model's `from_store` checks
//! names, shapes and groups against the layout it expects.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::{Param, ParamStore, Real};
use crate::param::Group;
use crate::Error;

/// Writes every tensor of `store` as f32 (row-major, little-endian) under its name.
pub fn save_safetensors<F: Real>(store: &ParamStore<F>, path: &Path) -> crate::Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = store
        .params
        .iter()
        .map(|p| {
            let data: Vec<u8> = p
                .value
                .iter()
                .flat_map(|v| (v.to_f64().unwrap_or(f64::NAN) as f32).to_le_bytes())
                .collect();
            (p.name.clone(), p.value.shape().to_vec(), data)
        })
        .collect();
    let mut names = std::collections::HashSet::new();
    for (name, _, _) in &bytes {
        if !names.insert(name.as_str()) {
            return Err(Error::Internal(format!("tensor name `{name}` appears twice in the store")));
        }
    }
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor `{name}`: {e}")))
        })
        .collect::<crate::Result<Vec<_>>>()?;
    let mut meta: HashMap<String, String> = store.params.iter().map(|p| (p.name.clone(), p.group.name().to_string())).collect();
    meta.insert("format".into(), "pt".into());
    safetensors::tensor::serialize_to_file(views, Some(meta), path).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Reads a safetensors file written by [`save_safetensors`] (or any file of f32/f64 tensors whose
/// metadata gives each tensor's group). Tensors are returned sorted by name; a model's `from_store`
/// puts them in its own order.
pub fn load_safetensors(path: &Path) -> crate::Result<ParamStore<f32>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    let parse_err = |reason: String| Error::Parse { path: path.to_path_buf(), reason };
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| parse_err(e.to_string()))?;
    let groups = metadata.metadata().clone().unwrap_or_default();
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| parse_err(e.to_string()))?;
    let mut list = tensors.tensors();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    let mut store = ParamStore { params: Vec::with_capacity(list.len()) };
    for (name, view) in list {
        let group_name = groups
            .get(&name)
            .ok_or_else(|| parse_err(format!("tensor `{name}` has no group in the file's metadata")))?;
        let group = Group::from_name(group_name)
            .ok_or_else(|| parse_err(format!("tensor `{name}` has unknown group `{group_name}`")))?;
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
            other => return Err(parse_err(format!("tensor `{name}` has dtype {other:?}; only F32 and F64 are read"))),
        };
        let value = ndarray::ArrayD::from_shape_vec(view.shape().to_vec(), values)
            .map_err(|e| parse_err(format!("tensor `{name}`: {e}")))?;
        store.params.push(Param { name, group, value });
    }
    Ok(store)
}
