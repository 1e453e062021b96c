//! Loaded models by name, and the models directory they persist in.
//!
//! A model is immutable once loaded; the registry hands out `Arc`s, so a
//! request keeps the model it started with even if the name is deleted or
//! replaced meanwhile. The directory holds `<name>.json` + `<name>.safetensors`
//! pairs; a new pair is written to temporary files, synced and renamed, the
//! weights before the manifest, so a crash never leaves a manifest whose
//! weights are half-written.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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
    pub fn from_bytes(manifest_json: &[u8], weights: &[u8], device: &Device) -> Result<Self> {
        let manifest = Manifest::from_json(manifest_json)?;
        let ck = Checkpoint::from_bytes(weights, device)?;
        Self::build(manifest, ck)
    }

    /// Loads `<dir>/<stem>.json` and `<dir>/<stem>.safetensors`.
    pub fn from_files(manifest_path: &Path, device: &Device) -> Result<Self> {
        let json = std::fs::read(manifest_path).map_err(|source| Error::Io {
            path: manifest_path.to_path_buf(),
            source,
        })?;
        let manifest = Manifest::from_json(&json)?;
        let ck = Checkpoint::from_file(&manifest_path.with_extension("safetensors"), device)?;
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
        Ok(Self {
            manifest,
            network,
            classes,
            device,
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
}

/// A model file that could not be loaded, kept so the API can say why.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    /// The manifest file.
    pub file: PathBuf,
    /// What went wrong, naming the tensor or layer.
    pub error: String,
}

/// Name → model, shared by every request.
#[derive(Debug, Default)]
pub struct Registry {
    models: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.read().get(name).cloned()
    }

    /// All models, sorted by name.
    pub fn list(&self) -> Vec<Arc<LoadedModel>> {
        self.read().values().cloned().collect()
    }

    /// All names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Adds a model; fails with the name if it is taken.
    pub fn insert(&self, model: LoadedModel) -> std::result::Result<Arc<LoadedModel>, String> {
        let mut map = self.models.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(model.name()) {
            return Err(model.name().to_string());
        }
        let model = Arc::new(model);
        map.insert(model.name().to_string(), model.clone());
        Ok(model)
    }

    /// Removes a model, returning it if it was there.
    pub fn remove(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.models
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<LoadedModel>>> {
        // A panic while holding the lock cannot leave the map half-updated
        // (every write is one insert or remove), so poisoning is ignored.
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The directory of `<name>.json` + `<name>.safetensors` pairs.
#[derive(Debug, Clone)]
pub struct ModelDir {
    path: PathBuf,
}

impl ModelDir {
    /// Uses `path`, creating it if needed.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        std::fs::create_dir_all(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        // A crash mid-write leaves a hidden temp file, never a half model:
        // clear them.
        if let Ok(entries) = std::fs::read_dir(&path) {
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".upload-") && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads every manifest in the directory. A model that fails is reported
    /// and skipped; the others load.
    pub fn load_all(&self, device: &Device) -> (Vec<LoadedModel>, Vec<LoadFailure>) {
        let mut manifests: Vec<PathBuf> = match std::fs::read_dir(&self.path) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect(),
            Err(e) => {
                return (
                    Vec::new(),
                    vec![LoadFailure {
                        file: self.path.clone(),
                        error: e.to_string(),
                    }],
                );
            }
        };
        manifests.sort();
        let mut loaded: Vec<LoadedModel> = Vec::new();
        let mut failed = Vec::new();
        for path in manifests {
            let result = LoadedModel::from_files(&path, device).and_then(|m| {
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                if stem.as_deref() != Some(m.name()) {
                    return Err(Error::Manifest(format!(
                        "the manifest's name '{}' differs from its file name; rename the file to {}.json",
                        m.name(),
                        m.name()
                    )));
                }
                Ok(m)
            });
            match result {
                Ok(m) => loaded.push(m),
                Err(e) => failed.push(LoadFailure {
                    file: path,
                    error: e.to_string(),
                }),
            }
        }
        (loaded, failed)
    }

    /// Whether either file of `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.file(name, "json").exists() || self.file(name, "safetensors").exists()
    }

    /// Writes a model's two files atomically (temp file, fsync, rename),
    /// weights first: the manifest is what makes a model exist at start-up.
    pub fn save(&self, name: &str, manifest_json: &[u8], weights: &[u8]) -> Result<()> {
        self.write_atomic(&self.file(name, "safetensors"), weights)?;
        self.write_atomic(&self.file(name, "json"), manifest_json)?;
        sync_dir(&self.path);
        Ok(())
    }

    /// Deletes a model's files, manifest first so a crash in between leaves
    /// only an orphaned weights file, never a manifest without weights.
    pub fn delete(&self, name: &str) -> Result<()> {
        for ext in ["json", "safetensors"] {
            let path = self.file(name, ext);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::Io { path, source }),
            }
        }
        sync_dir(&self.path);
        Ok(())
    }

    fn file(&self, name: &str, ext: &str) -> PathBuf {
        self.path.join(format!("{name}.{ext}"))
    }

    fn write_atomic(&self, target: &Path, bytes: &[u8]) -> Result<()> {
        let io = |source| Error::Io {
            path: target.to_path_buf(),
            source,
        };
        let mut tmp = tempfile_in(&self.path).map_err(io)?;
        tmp.1.write_all(bytes).map_err(io)?;
        tmp.1.sync_all().map_err(io)?;
        std::fs::rename(&tmp.0, target).map_err(|source| {
            let _ = std::fs::remove_file(&tmp.0);
            Error::Io {
                path: target.to_path_buf(),
                source,
            }
        })
    }
}

/// A uniquely named hidden file in `dir` (hidden files are never loaded).
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".upload-{}-{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Makes renames durable; best effort (not every platform can open a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
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
