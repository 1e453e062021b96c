//! PyTorch checkpoints (`torch.save(model.state_dict(), "m.pth")`) turned
//! into safetensors, which is what the store keeps.
//!
//! The reading is candle's restricted unpickler (`candle_core::pickle`): it
//! interprets the pickle opcodes that describe a `state_dict` and builds
//! plain values; a `GLOBAL` names a class but never imports or calls one,
//! so nothing in the file can run code. Weights are found at the top of
//! the pickle or under a `state_dict` or `model` key (a training
//! checkpoint); entries that are not tensors (epoch counters, optimiser
//! settings) are skipped. What cannot be read this way (a legacy non-zip
//! pickle, a TorchScript archive) is refused with how to re-save it.

use std::io::Write;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// What an uploaded weights file is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// safetensors (or anything else: its own parser then says what is wrong).
    Safetensors,
    /// A zip archive: `torch.save`'s format since PyTorch 1.6, or TorchScript.
    Zip,
    /// A bare pickle: `torch.save(..., _use_new_zipfile_serialization=False)`
    /// or PyTorch before 1.6.
    LegacyPickle,
}

/// Tells the formats apart by their magic bytes.
pub fn sniff(bytes: &[u8]) -> WeightsFormat {
    match bytes {
        [b'P', b'K', 3, 4, ..] => WeightsFormat::Zip,
        [0x80, 2..=5, ..] => WeightsFormat::LegacyPickle,
        _ => WeightsFormat::Safetensors,
    }
}

fn refuse(reason: String) -> Error {
    Error::Checkpoint {
        problems: vec![reason],
    }
}

/// The weights as safetensors bytes: safetensors as they are, a PyTorch zip
/// checkpoint converted, anything else refused with how to fix it.
pub fn to_safetensors(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>> {
    match sniff(bytes) {
        WeightsFormat::Safetensors => Ok(std::borrow::Cow::Borrowed(bytes)),
        WeightsFormat::LegacyPickle => Err(refuse(
            "this is a legacy (non-zip) PyTorch pickle, which convscope does not unpickle; re-save it with PyTorch >= 1.6 as `torch.save(model.state_dict(), \"model.pth\")` (without `_use_new_zipfile_serialization=False`), or upload a .safetensors file".into(),
        )),
        WeightsFormat::Zip => {
            let tensors = read_zip(bytes)?;
            crate::train::safetensors_bytes(&tensors).map(std::borrow::Cow::Owned)
        }
    }
}

/// The tensors of a `torch.save` zip archive.
fn read_zip(bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    if is_torchscript(bytes) {
        return Err(refuse(
            "this is a TorchScript archive (torch.jit.save), which holds code; save the weights instead: `torch.save(model.state_dict(), \"model.pth\")`".into(),
        ));
    }
    // candle's reader opens a path; the upload goes to a private temp file.
    let file = TempFile::write(bytes)?;
    let mut last_err = None;
    for key in [None, Some("state_dict"), Some("model")] {
        match candle_core::pickle::PthTensors::new(&file.0, key) {
            Ok(pth) if !pth.tensor_infos().is_empty() => return tensors_of(&pth, bytes.len()),
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    Err(refuse(match last_err {
        Some(e) => format!("not a readable PyTorch checkpoint: {e}"),
        None => "the checkpoint holds no tensors at its top level nor under `state_dict` or `model`; save `model.state_dict()`".into(),
    }))
}

fn tensors_of(
    pth: &candle_core::pickle::PthTensors,
    file_len: usize,
) -> Result<Vec<(String, Tensor)>> {
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    let mut problems = Vec::new();
    for name in names {
        // A pickle can declare any shape: refuse one whose data could not
        // be in the file before anything is allocated for it.
        let info = &pth.tensor_infos()[name];
        let declared =
            info.layout.shape().elem_count() as u128 * info.dtype.size_in_bytes() as u128;
        if declared > file_len as u128 {
            problems.push(format!(
                "tensor '{name}' declares {declared} bytes of data but the file has {file_len}"
            ));
            continue;
        }
        match pth.get(name) {
            Ok(Some(t)) => out.push((name.clone(), t)),
            Ok(None) => problems.push(format!("tensor '{name}' is listed but absent")),
            Err(e) => problems.push(format!("tensor '{name}' cannot be read: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(Error::Checkpoint { problems })
    }
}

/// TorchScript archives carry their code (`code/`) and `constants.pkl`.
fn is_torchscript(bytes: &[u8]) -> bool {
    // Zip local headers store each entry's name in the clear.
    let window = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    window(b"/constants.pkl") || window(b"/code/__torch__")
}

/// A file under the system temp directory, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn write(bytes: &[u8]) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("convscope-upload-{}-{n}.pth", std::process::id()));
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::create(&path).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        Ok(Self(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_magic() {
        assert_eq!(sniff(b"PK\x03\x04rest"), WeightsFormat::Zip);
        assert_eq!(sniff(&[0x80, 2, 0x8a, 0x0a]), WeightsFormat::LegacyPickle);
        assert_eq!(
            sniff(&[8, 0, 0, 0, 0, 0, 0, 0, b'{']),
            WeightsFormat::Safetensors
        );
    }

    #[test]
    fn a_legacy_pickle_is_refused_with_how_to_resave() {
        let e = to_safetensors(&[0x80, 2, 0x8a, 0x0a, 0x6c])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("legacy") && e.contains("torch.save(model.state_dict()"),
            "{e}"
        );
    }
}
