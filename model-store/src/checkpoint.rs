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
    init: Option<Init>,
}

/// Fresh initialisation for tensors a checkpoint lacks (training a new
/// model, or a new head): PyTorch's defaults, from a seeded generator.
struct Init {
    rng: crate::rng::Rng,
    /// Fan-in of each layer's weight, for its bias's bound.
    fan_in: BTreeMap<String, usize>,
    /// Tensors that were initialised rather than read.
    initialised: Vec<String>,
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

    /// Tensors already in memory (a loaded model's, some replaced), on
    /// `device`; `num_batches_tracked` counters are dropped as in
    /// [`Self::from_bytes`].
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        device: &Device,
    ) -> Result<Self> {
        let mut map = BTreeMap::new();
        for (name, t) in tensors {
            if !name.ends_with("num_batches_tracked") {
                map.insert(name, t.to_device(device)?);
            }
        }
        Ok(Self {
            tensors: map,
            used: BTreeSet::new(),
            problems: Vec::new(),
            device: device.clone(),
            init: None,
        })
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
            init: None,
        })
    }

    /// An empty checkpoint whose every tensor is freshly initialised.
    pub fn fresh(device: &Device, seed: u64) -> Self {
        Self {
            tensors: BTreeMap::new(),
            used: BTreeSet::new(),
            problems: Vec::new(),
            device: device.clone(),
            init: None,
        }
        .initialising_missing(seed)
    }

    /// From now on, a missing or mis-shaped tensor is initialised as
    /// PyTorch would (not a problem): conv and linear weights and biases
    /// `U(-1/√fan_in, 1/√fan_in)` (kaiming-uniform with a = √5), batch-norm
    /// weight 1, bias 0, running mean 0, running variance 1.
    pub fn initialising_missing(mut self, seed: u64) -> Self {
        self.init = Some(Init {
            rng: crate::rng::Rng::new(seed),
            fan_in: BTreeMap::new(),
            initialised: Vec::new(),
        });
        self
    }

    /// Names of the tensors that were initialised instead of read.
    pub fn initialised(&self) -> &[String] {
        self.init.as_ref().map_or(&[], |i| &i.initialised)
    }

    fn initialise(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(init) = self.init.as_mut() else {
            return Ok(None);
        };
        init.initialised.push(name.to_string());
        let (prefix, suffix) = name.rsplit_once('.').unwrap_or(("", name));
        let n: usize = shape.iter().product();
        let constant = |v: f32| Tensor::full(v, shape, &self.device);
        let uniform = |init: &mut Init, bound: f64| -> Vec<f32> {
            (0..n)
                .map(|_| ((init.rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        let t = match (suffix, shape.len()) {
            ("running_mean", _) => constant(0.0)?,
            ("running_var", _) => constant(1.0)?,
            ("weight", 1) => {
                init.fan_in.insert(prefix.to_string(), 0);
                constant(1.0)?
            }
            ("weight", _) => {
                let fan_in: usize = shape[1..].iter().product();
                init.fan_in.insert(prefix.to_string(), fan_in);
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                Tensor::from_vec(uniform(init, bound), shape, &self.device)?
            }
            ("bias", _) => match init.fan_in.get(prefix) {
                // A batch norm's bias (its weight was 1-D).
                Some(0) => constant(0.0)?,
                Some(&fan_in) => {
                    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                    Tensor::from_vec(uniform(init, bound), shape, &self.device)?
                }
                None => constant(0.0)?,
            },
            _ => constant(0.0)?,
        };
        Ok(Some(t))
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
                if let Some(init) = self.init.as_mut()
                    && name.ends_with(".weight")
                {
                    let prefix = name.trim_end_matches(".weight").to_string();
                    let fan_in = if shape.len() > 1 {
                        shape[1..].iter().product()
                    } else {
                        0
                    };
                    init.fan_in.insert(prefix, fan_in);
                }
                Ok(t.clone())
            }
            Some(_) if self.init.is_some() => {
                self.used.insert(name.to_string());
                Ok(self.initialise(name, shape)?.expect("init mode"))
            }
            None if self.init.is_some() => Ok(self.initialise(name, shape)?.expect("init mode")),
            Some(t) => {
                self.used.insert(name.to_string());
                self.problems.push(format!(
                    "tensor '{name}' has shape {:?}, expected {shape:?}",
                    t.dims()
                ));
                Ok(placeholder(shape, &self.device)?)
            }
            None => {
                self.problems
                    .push(format!("missing tensor '{name}' (shape {shape:?})"));
                Ok(placeholder(shape, &self.device)?)
            }
        }
    }

    /// Marks `name` as deliberately unused (a manifest's `unused_weights`):
    /// accepted when present, not required.
    pub fn discard(&mut self, name: &str) {
        if self.tensors.contains_key(name) {
            self.used.insert(name.to_string());
        }
    }

    /// Fails with the problems found so far (missing and mis-shaped tensors),
    /// before anything computes with the placeholders.
    pub fn check(&self) -> Result<()> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Checkpoint {
                problems: self.problems.clone(),
            })
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

/// Zeros of `shape` for a missing tensor, as a broadcast view of one zero:
/// a manifest may declare any size, and nothing is allocated for it.
fn placeholder(shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
    Tensor::zeros(1, DType::F32, device)?
        .reshape(vec![1; shape.len().max(1)])?
        .broadcast_as(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(tensors: &[(&str, Tensor)]) -> Vec<u8> {
        let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        safetensors::tensor::serialize(views, None).unwrap()
    }

    #[test]
    fn a_leading_module_prefix_is_stripped_and_every_problem_is_listed() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 3), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let stray = Tensor::zeros(2, DType::F32, &dev).unwrap();
        let raw = bytes(&[
            ("module.fc.weight", w),
            ("module.fc.bias", b),
            ("module.extra", stray),
        ]);
        let mut ck = Checkpoint::from_bytes(&raw, &dev).unwrap();
        assert_eq!(ck.shape_of("fc.weight"), Some(vec![4, 3]));
        ck.take("fc.weight", &[4, 3]).unwrap();
        ck.take("fc.bias", &[5]).unwrap();
        ck.take("head.weight", &[2, 4]).unwrap();
        let e = ck.finish().unwrap_err().to_string();
        assert!(
            e.contains("tensor 'fc.bias' has shape [4], expected [5]"),
            "{e}"
        );
        assert!(e.contains("missing tensor 'head.weight'"), "{e}");
        assert!(e.contains("unexpected tensor 'extra'"), "{e}");
    }

    #[test]
    fn bytes_that_are_not_safetensors_are_refused() {
        assert!(Checkpoint::from_bytes(b"not a checkpoint", &Device::Cpu).is_err());
    }
}
