//! A model ready to run: its manifest, its network and its labels.
//!
//! A model is immutable once loaded; the store hands out `Arc`s, so a
//! request keeps the model it started with even if the name is deleted or
//! replaced meanwhile.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::arch;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::graph::Network;
use crate::manifest::Manifest;

/// A model ready to run.
#[derive(Debug)]
pub struct LoadedModel {
    /// The manifest as loaded.
    pub manifest: Manifest,
    /// The network with its weights on `device`.
    pub network: Network,
    /// One label per output.
    pub classes: Vec<String>,
    /// Where the weights live.
    pub device: Device,
}

impl LoadedModel {
    /// Validates a manifest and its checkpoint together: every tensor's name
    /// and shape, then that the layers chain for the declared input size.
    /// `weights` are safetensors or a PyTorch zip checkpoint ([`crate::pth`]).
    pub fn from_bytes(manifest_json: &[u8], weights: &[u8], device: &Device) -> Result<Self> {
        let manifest = Manifest::from_json(manifest_json)?;
        let ck = Checkpoint::from_bytes(&crate::pth::to_safetensors(weights)?, device)?;
        Self::build(manifest, ck)
    }

    /// Loads `<dir>/<stem>.json` with `<dir>/<stem>.safetensors`, or with
    /// `<dir>/<stem>.pth` when there is no safetensors file.
    pub fn from_files(manifest_path: &Path, device: &Device) -> Result<Self> {
        let json = std::fs::read(manifest_path).map_err(|source| Error::Io {
            path: manifest_path.to_path_buf(),
            source,
        })?;
        let manifest = Manifest::from_json(&json)?;
        let st = manifest_path.with_extension("safetensors");
        let pth = manifest_path.with_extension("pth");
        let ck = if !st.exists() && pth.exists() {
            let bytes = std::fs::read(&pth).map_err(|source| Error::Io {
                path: pth.clone(),
                source,
            })?;
            Checkpoint::from_bytes(&crate::pth::to_safetensors(&bytes)?, device)?
        } else {
            Checkpoint::from_file(&st, device)?
        };
        Self::build(manifest, ck)
    }

    fn build(manifest: Manifest, mut ck: Checkpoint) -> Result<Self> {
        let root = arch::build(&manifest, &mut ck)?;
        let device = ck.device().clone();
        ck.finish()?;
        let s = &manifest.input;
        let network = Network::new(root, (s.channels, s.height, s.width))?;
        let classes = match &manifest.classes {
            Some(c) if c.len() != network.outputs() => {
                return Err(Error::Manifest(format!(
                    "`classes` lists {} labels but the network outputs {} values",
                    c.len(),
                    network.outputs()
                )));
            }
            Some(c) => c.clone(),
            None => (0..network.outputs()).map(|i| i.to_string()).collect(),
        };
        let model = Self {
            manifest,
            network,
            classes,
            device,
        };
        model.run_check()?;
        Ok(model)
    }

    /// Every tensor of the model as PyTorch's `state_dict` names it.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        crate::train::net::TrainNet::new(&self.network, &[])?.state_dict()
    }

    /// The same architecture with these tensors (a [`Self::state_dict`],
    /// some replaced). The manifest's `check` logits are not verified:
    /// the weights are no longer the ones they were recorded with.
    pub fn with_tensors(&self, tensors: Vec<(String, Tensor)>) -> Result<Self> {
        let mut manifest = self.manifest.clone();
        manifest.check = None;
        Self::build(manifest, Checkpoint::from_tensors(tensors, &self.device)?)
    }

    /// Recomputes the manifest's `check` logits, when it has one.
    fn run_check(&self) -> Result<()> {
        let Some(check) = &self.manifest.check else {
            return Ok(());
        };
        let x = check.input_tensor(self.network.input(), &self.device)?;
        let got = self.logits(&x)?.flatten_all()?.to_vec1::<f32>()?;
        check.verify(&got)
    }

    /// A class given by index or by label (exact, then ignoring ASCII case).
    pub fn class_index(&self, token: &str) -> Result<usize> {
        let labels = &self.classes;
        if let Ok(i) = token.parse::<usize>()
            && i < labels.len()
        {
            return Ok(i);
        }
        if let Some(i) = labels.iter().position(|l| l == token) {
            return Ok(i);
        }
        if let Some(i) = labels.iter().position(|l| l.eq_ignore_ascii_case(token)) {
            return Ok(i);
        }
        let shown: Vec<&str> = labels.iter().take(20).map(String::as_str).collect();
        Err(Error::InvalidArgument {
            param: "class".into(),
            reason: format!(
                "unknown class {token:?}: give an index 0-{} or a label ({}{})",
                labels.len().saturating_sub(1),
                shown.join(", "),
                if labels.len() > 20 { ", ..." } else { "" }
            ),
        })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// Logits `[N, classes]` for a preprocessed batch. For a network that
    /// ends in softmax these are the softmax's inputs, so that "logit" means
    /// the same thing for every model.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        if self.network.ends_with_softmax() {
            let layers = self.network.layers();
            let before = &layers[layers.len() - 2].name;
            let mut tap = crate::tap::Record::layers([before.as_str()]);
            self.network.forward(x, &mut tap)?;
            tap.get(before).cloned().ok_or_else(|| Error::Shape {
                layer: before.clone(),
                reason: "produced no output".into(),
            })
        } else {
            self.network.predict(x)
        }
    }

    /// [`Self::logits`] of a batch of images that are `base`'s image
    /// ([`crate::dag::Dag::base_pass`]) but for one window each: rows `at[b].0..` and columns
    /// `at[b].1..` are `crops[b]` ([`crate::dag::Dag::forward_windowed`]:
    /// only what each window reaches is computed).
    pub fn logits_windowed(
        &self,
        base: &crate::dag::BasePass,
        crops: &Tensor,
        at: &[(usize, usize)],
    ) -> Result<Tensor> {
        let layers = self.network.layers();
        let stop = self
            .network
            .ends_with_softmax()
            .then(|| layers[layers.len() - 2].name.as_str());
        self.network.dag().forward_windowed(base, crops, at, stop)
    }
}

/// A model file that could not be loaded, kept so the API can say why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    /// The manifest file.
    pub file: PathBuf,
    /// What went wrong, naming the tensor or layer.
    pub error: String,
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        _ => match spec
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Ok(Device::new_cuda(n)?),
            None => Err(Error::Manifest(format!(
                "unknown device {spec:?}; use cpu, cuda or cuda:N"
            ))),
        },
    }
}
