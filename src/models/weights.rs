//! Reading weight files in the formats the upstream projects ship: safetensors, PyTorch
//! `pytorch_model.bin` and Lightning `.ckpt` (a zip pickle holding `state_dict`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::ModelError;

/// The on-disk format of a weights file, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    Safetensors,
    /// A torch zip pickle: `.bin`, `.pt`, `.pth` or a Lightning `.ckpt`.
    Pickle,
}

impl WeightsFormat {
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "safetensors" => Some(Self::Safetensors),
            "bin" | "pt" | "pth" | "ckpt" => Some(Self::Pickle),
            _ => None,
        }
    }
}

/// Reads every tensor of a weights file whose name `keep` accepts, converted to `dtype` and
/// moved to `device`.
pub fn read_tensors(
    path: &Path,
    dtype: DType,
    device: &Device,
    keep: &dyn Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>, ModelError> {
    read_state_dict(path, keep)?
        .into_iter()
        .map(|(name, t)| {
            let t = t
                .to_dtype(dtype)
                .and_then(|t| t.to_device(device))
                .map_err(|e| ModelError::weights(path, format!("tensor {name}: {e}")))?;
            Ok((name, t))
        })
        .collect()
}

/// Reads the tensors `keep` accepts as stored (dtype unchanged, on the CPU), e.g. to convert a
/// checkpoint to safetensors.
///
/// Pickles are read from their `state_dict` entry when they have one (Lightning checkpoints)
/// and from the top level otherwise (`torch.save(model.state_dict())`).
pub fn read_state_dict(
    path: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>, ModelError> {
    if !path.is_file() {
        return Err(ModelError::Missing {
            path: path.to_owned(),
            hint: "Pass the path of an existing weights file (.safetensors, .bin or .ckpt).".into(),
        });
    }
    let format = WeightsFormat::of(path).ok_or_else(|| {
        ModelError::weights(
            path,
            "unknown weights format; expected .safetensors, .bin, .pt, .pth or .ckpt",
        )
    })?;
    let tensors: HashMap<String, Tensor> = match format {
        WeightsFormat::Safetensors => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| ModelError::weights(path, e))?
            .into_iter()
            .filter(|(name, _)| keep(name))
            .collect(),
        WeightsFormat::Pickle => read_pickle(path, keep)?.into_iter().collect(),
    };
    if tensors.is_empty() {
        return Err(ModelError::weights(path, "the file holds no model tensors"));
    }
    Ok(tensors)
}

fn read_pickle(
    path: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    use candle_core::pickle::PthTensors;
    // A Lightning checkpoint nests the weights under `state_dict`; a plain state dict does not.
    let pth = match PthTensors::new(path, Some("state_dict")) {
        Ok(p) if !p.tensor_infos().is_empty() => p,
        _ => PthTensors::new(path, None).map_err(|e| {
            ModelError::weights(
                path,
                format!(
                    "{e}. Only torch's zip format (PyTorch >= 1.6) is readable; re-save a legacy \
                     file with torch.save, or convert it to .safetensors"
                ),
            )
        })?,
    };
    if pth.tensor_infos().is_empty() {
        // Not a state dict at all: perhaps a TorchScript archive, whose data.pkl is the module.
        return read_torchscript(path, keep);
    }
    let mut names: Vec<&String> = pth.tensor_infos().keys().filter(|n| keep(n)).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let t = pth
                .get(name)
                .map_err(|e| ModelError::weights(path, format!("tensor {name}: {e}")))?
                .ok_or_else(|| ModelError::weights(path, format!("tensor {name} vanished")))?;
            Ok((name.clone(), t))
        })
        .collect()
}

/// Reads the parameters and buffers of a TorchScript archive (`torch.jit.save`, the format of
/// OpenAI's published CLIP `.pt` files) under their `state_dict()` names.
///
/// Its `data.pkl` pickles the module tree itself: each module is an object of a `__torch__.*`
/// class built from a dict of attributes, where submodules nest and tensors are leaves. candle
/// reads only flat state dicts, so this walks the tree and joins the attribute names with dots.
fn read_torchscript(
    path: &Path,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Tensor)>, ModelError> {
    use candle_core::pickle::Stack;
    use std::io::{BufReader, Read};

    let err = |e: &dyn std::fmt::Display| ModelError::weights(path, e.to_string());
    let open = || -> Result<zip::ZipArchive<BufReader<std::fs::File>>, ModelError> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        zip::ZipArchive::new(BufReader::new(file)).map_err(|e| err(&e))
    };
    let mut zip = open()?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok().map(std::borrow::Cow::into_owned))
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| err(&"no data.pkl: neither a state dict nor a TorchScript archive"))?;
    let dir = pkl.trim_end_matches(".pkl").to_owned();
    let root = {
        let mut reader = BufReader::new(zip.by_name(&pkl).map_err(|e| err(&e))?);
        let mut stack = Stack::empty();
        stack.read_loop(&mut reader).map_err(|e| err(&e))?;
        stack.finalize().map_err(|e| err(&e))?
    };
    let mut infos = Vec::new();
    collect_module_tensors(root, String::new(), Path::new(&dir), &mut infos);
    infos.retain(|i| keep(&i.name));
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    infos
        .into_iter()
        .map(|info| {
            let what = |e: &dyn std::fmt::Display| {
                ModelError::weights(path, format!("tensor {}: {e}", info.name))
            };
            let layout = &info.layout;
            if !layout.is_contiguous() {
                return Err(what(
                    &"stored non-contiguous; re-save it with .contiguous()",
                ));
            }
            let mut entry = zip.by_name(&info.path).map_err(|e| what(&e))?;
            std::io::copy(
                &mut (&mut entry).take(layout.start_offset() as u64),
                &mut std::io::sink(),
            )
            .map_err(|e| what(&e))?;
            let mut bytes = vec![0u8; layout.shape().elem_count() * info.dtype.size_in_bytes()];
            entry.read_exact(&mut bytes).map_err(|e| what(&e))?;
            let t = Tensor::from_raw_buffer(&bytes, info.dtype, layout.dims(), &Device::Cpu)
                .map_err(|e| what(&e))?;
            Ok((info.name, t))
        })
        .collect()
}

/// Depth-first over a TorchScript module object: tensors become `prefix.name` entries.
fn collect_module_tensors(
    obj: candle_core::pickle::Object,
    prefix: String,
    dir: &Path,
    out: &mut Vec<candle_core::pickle::TensorInfo>,
) {
    use candle_core::pickle::Object;
    let Object::Build { callable, args } = obj else {
        return;
    };
    let is_module = matches!(&*callable, Object::Reduce { callable, .. }
        if matches!(&**callable, Object::Class { module_name, .. } if module_name.starts_with("__torch__")));
    let Object::Dict(attributes) = *args else {
        return;
    };
    if !is_module {
        return;
    }
    for (key, value) in attributes {
        let Object::Unicode(name) = key else { continue };
        let full = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            Object::Build { .. } => collect_module_tensors(value, full, dir, out),
            tensor => {
                if let Ok(Some(info)) = tensor.into_tensor_info(Object::Unicode(full), dir) {
                    out.push(info);
                }
            }
        }
    }
}

/// Turns a missing-tensor or shape error from a `VarBuilder` into one that names the file.
pub(crate) fn build_error(path: &Path, err: candle_core::Error) -> ModelError {
    ModelError::weights(
        path,
        format!("{err}. The file does not match its config: check that config and weights come from the same model."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_pickle_says_which_format_works() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("old.bin");
        // A legacy torch file starts with a raw pickle, not a zip header.
        std::fs::write(&legacy, b"\x80\x02\x8a\x0alegacy").unwrap();
        let err = read_state_dict(&legacy, &|_| true).unwrap_err().to_string();
        assert!(
            err.contains("old.bin") && err.contains("zip format"),
            "{err}"
        );

        let odd = dir.path().join("weights.npz");
        std::fs::write(&odd, b"").unwrap();
        let err = read_state_dict(&odd, &|_| true).unwrap_err().to_string();
        assert!(err.contains("unknown weights format"), "{err}");
    }
}
