//! safetensors checkpoints with PyTorch `state_dict` names, checked tensor by
//! tensor against what an architecture expects.
//!
//! Architectures ask for each tensor by name and shape ([`Checkpoint::take`]).
//! Nothing fails on the first problem: a missing or mis-shaped tensor is noted
//! and a zero placeholder handed back so that building goes on, and
//! [`Checkpoint::finish`] then reports every missing, mis-shaped and unused
//! tensor at once. One upload, one complete list of what to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The tensors of one checkpoint and the bookkeeping of which were used.
pub struct Checkpoint {
    tensors: BTreeMap<String, Tensor>,
    used: BTreeSet<String>,
    problems: Vec<String>,
    device: Device,
}

impl Checkpoint {
    /// Reads a `.safetensors` file.
    pub fn from_file(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, device)
    }

    /// Parses safetensors bytes. Float tensors become `f32` on `device`; a
    /// leading `module.` (from `DataParallel`) is stripped; BatchNorm's
    /// integer `num_batches_tracked` counters are dropped, as inference
    /// never reads them.
    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let raw = candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| {
            Error::Checkpoint {
                problems: vec![format!("not a readable safetensors file: {e}")],
            }
        })?;
        let mut tensors = BTreeMap::new();
        for (name, t) in raw {
            let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
            if name.ends_with("num_batches_tracked") {
                continue;
            }
            let t = match t.dtype() {
                DType::F32 => t,
                DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
                other => {
                    return Err(Error::Checkpoint {
                        problems: vec![format!(
                            "tensor '{name}' has dtype {other:?}; weights must be floating point"
                        )],
                    });
                }
            };
            tensors.insert(name, t.to_device(device)?);
        }
        Ok(Self {
            tensors,
            used: BTreeSet::new(),
            problems: Vec::new(),
            device: device.clone(),
        })
    }

    /// The shape of a tensor without taking it (to infer class counts).
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }

    /// Takes the tensor `name`, which must have `shape`. A missing or
    /// mis-shaped tensor is recorded as a problem and replaced by zeros so the
    /// caller can go on building and every problem is reported together.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) if t.dims() == shape => {
                self.used.insert(name.to_string());
                Ok(t.clone())
            }
            Some(t) => {
                self.used.insert(name.to_string());
                self.problems.push(format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?}",
                    t.dims()
                ));
                Ok(Tensor::zeros(shape, DType::F32, &self.device)?)
            }
            None => {
                self.problems
                    .push(format!("missing tensor '{name}' (shape {shape:?})"));
                Ok(Tensor::zeros(shape, DType::F32, &self.device)?)
            }
        }
    }

    /// Fails with every problem found, including tensors nobody asked for.
    pub fn finish(mut self) -> Result<()> {
        for name in self.tensors.keys() {
            if !self.used.contains(name) {
                self.problems.push(format!(
                    "unexpected tensor '{name}' (shape {:?}) that the architecture does not use",
                    self.tensors[name].dims()
                ));
            }
        }
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Checkpoint {
                problems: self.problems,
            })
        }
    }

    /// The device tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}
