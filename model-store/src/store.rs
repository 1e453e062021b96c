//! The model store: the one owner of the loaded models, the models directory
//! they persist in, the files that failed to load, and the names that
//! training jobs will produce.
//!
//! Every way a model comes or goes — an upload, a finished job, an epoch
//! snapshot, a deletion, the `train` command — goes through here, under one
//! lock, so that a name has one owner at a time:
//! - [`ModelStore::register`] adds a new name and never overwrites;
//! - [`ModelStore::reserve`] gives a queued or running job its name (and
//!   its `name@epoch-N` snapshots) until [`ModelStore::release`];
//! - only the reserving job may [`ModelStore::replace`] or
//!   [`ModelStore::retract`] those names;
//! - [`ModelStore::delete`] refuses a reserved name.
//!
//! With a [`Remote`] (several machines) a change is committed there first
//! and the directory is this process's cache of it; see [`crate::remote`].
//!
//! Loading a model (seconds for a large one) happens outside the lock: the
//! name is claimed first, so a second registration of it is refused at once
//! instead of waiting.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::Device;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::model::{LoadFailure, LoadedModel};
use crate::model_dir::{ModelDir, Stamp};
use crate::remote::{Entry, Remote};

/// Who holds a name that is not (yet) a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// A queued or running training job, by id: it will register the name.
    Job(String),
    /// A `POST /models` (or other registration) that is loading the model now.
    Registration,
    /// A deletion in progress.
    Deletion,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Job(id) => write!(f, "job {id}"),
            Owner::Registration => f.write_str("a registration in progress"),
            Owner::Deletion => f.write_str("a deletion in progress"),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    models: BTreeMap<String, Arc<LoadedModel>>,
    /// Names held without a model (or, for a job, with its snapshots).
    claims: BTreeMap<String, Owner>,
    failures: Vec<LoadFailure>,
    /// The manifest stamps [`ModelStore::refresh`] last saw, loaded or not.
    seen: BTreeMap<String, Stamp>,
    /// With a remote: the catalogue version of each model here.
    versions: BTreeMap<String, String>,
    /// With a remote: every committed model, loaded here or not.
    catalogue: BTreeMap<String, Entry>,
    /// With a remote: versions that were fetched and did not load.
    broken: BTreeMap<String, String>,
    /// Bumped by every local change of the catalogue view, so a refresh
    /// that read the catalogue before it does not undo it.
    generation: u64,
}

/// What `GET /models` lists of a model, loaded or only catalogued.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Its manifest.
    pub manifest: Manifest,
    /// Outputs of its head.
    pub num_classes: usize,
    /// Where it runs (or will, once loaded).
    pub device: Device,
}

impl From<&LoadedModel> for Summary {
    fn from(m: &LoadedModel) -> Self {
        Summary {
            manifest: m.manifest.clone(),
            num_classes: m.classes.len(),
            device: m.device.clone(),
        }
    }
}

impl State {
    /// Who holds `name`: a claim on it, or a job's claim on the model its
    /// `name@epoch-N` snapshot belongs to.
    fn holder(&self, name: &str) -> Option<&Owner> {
        self.claims.get(name).or_else(|| {
            let (base, _) = snapshot_parts(name)?;
            self.claims.get(base).filter(|o| matches!(o, Owner::Job(_)))
        })
    }
}

/// `("x", 3)` for `x@epoch-3`.
fn snapshot_parts(name: &str) -> Option<(&str, usize)> {
    let (base, epoch) = name.rsplit_once("@epoch-")?;
    Some((base, epoch.parse().ok()?))
}

/// Loaded models by name, their directory and the names jobs hold.
#[derive(Debug)]
pub struct ModelStore {
    dir: ModelDir,
    device: Device,
    state: RwLock<State>,
    remote: Option<Arc<dyn Remote>>,
    /// With a remote: the bytes of weights kept loaded (and cached) at
    /// most; 0 for no bound.
    cache_bytes: u64,
    /// With a remote: when each loaded model was last used (a counter).
    used: std::sync::Mutex<BTreeMap<String, u64>>,
    /// One remote load at a time (two requests for one model fetch once).
    loading: std::sync::Mutex<()>,
}

/// Releases a registration's or deletion's claim however it ends.
struct Claim<'a> {
    store: &'a ModelStore,
    name: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.store.write().claims.remove(&self.name);
    }
}

impl ModelStore {
    /// Opens the directory (finishing whatever a crash left half-done) and
    /// loads every model in it; a model that fails is kept in
    /// [`ModelStore::failures`] and skipped.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        Self::over(ModelDir::open(path)?, device)
    }

    /// The same, with the directory held alone (for `convscope train`,
    /// which cannot see a running server's held names): fails while another
    /// process has it open.
    pub fn open_exclusive(path: &Path, device: &Device) -> Result<Self> {
        Self::over(ModelDir::open_exclusive(path)?, device)
    }

    fn over(dir: ModelDir, device: &Device) -> Result<Self> {
        // Stamps first: a model committed while loading is seen as new.
        let seen = dir.stamps().unwrap_or_default();
        let (loaded, failures) = dir.load_all(device);
        let models = loaded
            .into_iter()
            .map(|m| (m.name().to_string(), Arc::new(m)))
            .collect();
        Ok(Self {
            dir,
            device: device.clone(),
            state: RwLock::new(State {
                models,
                claims: BTreeMap::new(),
                failures,
                seen,
                versions: BTreeMap::new(),
                catalogue: BTreeMap::new(),
                broken: BTreeMap::new(),
                generation: 0,
            }),
            remote: None,
            cache_bytes: 0,
            used: std::sync::Mutex::new(BTreeMap::new()),
            loading: std::sync::Mutex::new(()),
        })
    }

    /// Commits every change to `remote` from now on, the directory becoming
    /// a cache of it: the models loaded so far that it lacks are dropped at
    /// the next [`ModelStore::refresh`], which also fetches what it has.
    /// Models are then loaded on first use and the least recently used
    /// dropped (from memory and the cache directory) beyond `cache_bytes`
    /// of weights (0: no bound).
    pub fn with_remote(mut self, remote: Arc<dyn Remote>, cache_bytes: u64) -> Self {
        self.remote = Some(remote);
        self.cache_bytes = cache_bytes;
        self
    }

    /// The remote changes are committed to, if any.
    pub fn remote(&self) -> Option<&Arc<dyn Remote>> {
        self.remote.as_ref()
    }

    /// The models directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The device models are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.lookup(name).ok()
    }

    /// The model called `name`, or an error listing the models there are.
    /// With a remote, a catalogued model not loaded here is fetched (from
    /// the cache directory when its copy is that version) and loaded now.
    pub fn lookup(&self, name: &str) -> Result<Arc<LoadedModel>> {
        let unknown = |state: &State| Error::UnknownModel {
            name: name.to_string(),
            known: state
                .models
                .keys()
                .chain(state.catalogue.keys())
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        {
            let state = self.read();
            if let Some(m) = state.models.get(name) {
                let m = m.clone();
                drop(state);
                self.touch(name);
                return Ok(m);
            }
            if self.remote.is_none() || !state.catalogue.contains_key(name) {
                return Err(unknown(&state));
            }
        }
        self.load_remote(name)
    }

    /// Notes a use, for the least-recently-used order (remote only).
    fn touch(&self, name: &str) {
        if self.remote.is_none() {
            return;
        }
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        let tick = used.values().copied().max().unwrap_or(0) + 1;
        used.insert(name.to_string(), tick);
    }

    /// Fetches (or finds in the cache) and loads catalogued `name`, then
    /// makes room within the byte bound.
    fn load_remote(&self, name: &str) -> Result<Arc<LoadedModel>> {
        let remote = self.remote.as_ref().expect("called with a remote");
        let _one = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        let entry = {
            let state = self.read();
            if let Some(m) = state.models.get(name) {
                return Ok(m.clone());
            }
            state
                .catalogue
                .get(name)
                .cloned()
                .ok_or_else(|| Error::UnknownModel {
                    name: name.to_string(),
                    known: state.catalogue.keys().cloned().collect(),
                })?
        };
        let cached = std::fs::read(self.dir.manifest_path(name))
            .ok()
            .zip(std::fs::read(self.dir.path().join(format!("{name}.safetensors"))).ok())
            .filter(|(m, w)| remote.version(m, w) == entry.version);
        if self.read().broken.get(name) == Some(&entry.version) {
            return Err(Error::Manifest(format!(
                "'{name}' in the catalogue does not load here; register it again"
            )));
        }
        let (manifest, weights, fetched) = match cached {
            Some((m, w)) => (m, w, false),
            None => {
                let (m, w) = remote.fetch(name, &entry.version)?;
                (m, w, true)
            }
        };
        let model = match LoadedModel::from_bytes(&manifest, &weights, &self.device) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                // Not fetched again for every request: only a new version.
                self.write()
                    .broken
                    .insert(name.to_string(), entry.version.clone());
                return Err(e);
            }
        };
        if fetched {
            let _ = self.dir.save(name, &manifest, &weights);
        }
        self.touch(name);
        {
            let mut state = self.write();
            // Changed or gone meanwhile: served this once, not kept.
            if state.catalogue.get(name).map(|e| &e.version) != Some(&entry.version) {
                return Ok(model);
            }
            state
                .versions
                .insert(name.to_string(), entry.version.clone());
            state.models.insert(name.to_string(), model.clone());
        }
        self.evict(name);
        Ok(model)
    }

    /// Drops the least recently used models (never `keep`, never a held
    /// name) until the loaded weights fit the byte bound.
    fn evict(&self, keep: &str) {
        if self.remote.is_none() || self.cache_bytes == 0 {
            return;
        }
        loop {
            let victim = {
                let state = self.read();
                let size = |n: &String| state.catalogue.get(n).map_or(0, |e| e.bytes);
                let total: u64 = state.models.keys().map(size).sum();
                if total <= self.cache_bytes {
                    return;
                }
                let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
                // The one used last stays, even alone over the bound.
                let newest = used.iter().max_by_key(|(_, t)| **t).map(|(n, _)| n.clone());
                state
                    .models
                    .keys()
                    .filter(|n| n.as_str() != keep && state.holder(n).is_none())
                    .filter(|n| Some(*n) != newest.as_ref())
                    .min_by_key(|n| used.get(*n).copied().unwrap_or(0))
                    .cloned()
            };
            let Some(name) = victim else {
                return;
            };
            let mut state = self.write();
            state.models.remove(&name);
            state.versions.remove(&name);
            drop(state);
            self.used
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            let _ = self.dir.delete(&name);
        }
    }

    /// The loaded models, sorted by name (with a remote, those used
    /// lately; [`ModelStore::summaries`] lists them all).
    pub fn list(&self) -> Vec<Arc<LoadedModel>> {
        self.read().models.values().cloned().collect()
    }

    /// Every model, loaded or (with a remote) only catalogued, by name.
    pub fn summaries(&self) -> Vec<Summary> {
        let state = self.read();
        let mut out: BTreeMap<String, Summary> = state
            .models
            .values()
            .map(|m| (m.name().to_string(), Summary::from(m.as_ref())))
            .collect();
        for (name, entry) in &state.catalogue {
            if out.contains_key(name) {
                continue;
            }
            if let Ok(manifest) = Manifest::from_json(entry.manifest.as_bytes()) {
                let s = Summary {
                    manifest,
                    num_classes: entry.num_classes,
                    device: self.device.clone(),
                };
                out.insert(name.clone(), s);
            }
        }
        out.into_values().collect()
    }

    /// All names, sorted (with a remote, the catalogue's too).
    pub fn names(&self) -> Vec<String> {
        let state = self.read();
        let mut names: std::collections::BTreeSet<String> = state.models.keys().cloned().collect();
        names.extend(state.catalogue.keys().cloned());
        names.into_iter().collect()
    }

    /// Files in the directory that did not load at start-up, and why.
    pub fn failures(&self) -> Vec<LoadFailure> {
        self.read().failures.clone()
    }

    /// Who holds `name` without it being a model yet, if anyone.
    pub fn holder(&self, name: &str) -> Option<Owner> {
        self.read().holder(name).cloned()
    }

    /// Whether `name` could be taken now: not a model, not a file in the
    /// directory, not held.
    pub fn check_free(&self, name: &str) -> Result<()> {
        Self::free(&self.read(), &self.dir, name)
    }

    fn free(state: &State, dir: &ModelDir, name: &str) -> Result<()> {
        // Before any file is looked at: a name is never a path.
        crate::manifest::validate_model_name(name)?;
        if let Some(owner) = state.holder(name) {
            return Err(Error::NameHeld {
                name: name.to_string(),
                owner: owner.clone(),
            });
        }
        if state.models.contains_key(name)
            || state.catalogue.contains_key(name)
            || dir.contains(name)
        {
            return Err(Error::NameTaken {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Registers a new model from its manifest and weights: validated by
    /// loading, written as one commit, served at once. Never overwrites.
    pub fn register(&self, manifest_json: &[u8], weights: &[u8]) -> Result<Arc<LoadedModel>> {
        let name = Manifest::from_json(manifest_json)?.name;
        let _claim = self.claim(&name, Owner::Registration)?;
        // A `.pth` upload is kept as the safetensors it converts to.
        let weights = crate::pth::to_safetensors(weights)?;
        let model = LoadedModel::from_bytes(manifest_json, &weights, &self.device)?;
        let version = self.commit(&name, manifest_json, &weights, model.classes.len(), None)?;
        let model = Arc::new(model);
        self.loaded(&name, model.clone(), version, manifest_json, weights.len());
        Ok(model)
    }

    /// Holds `name` for `job` until [`ModelStore::release`]: nothing else
    /// may register or delete it (or its `name@epoch-N` snapshots) meanwhile.
    pub fn reserve(&self, name: &str, job: &str) -> Result<()> {
        let mut state = self.write();
        Self::free(&state, &self.dir, name)?;
        // The job will write `name@epoch-N`: none of those may be someone
        // else's already (an upload, a finished job's snapshot).
        let prefix = format!("{name}@epoch-");
        let taken = state
            .models
            .keys()
            .chain(state.claims.keys())
            .chain(state.catalogue.keys())
            .find(|n| n.starts_with(&prefix))
            .cloned()
            .or_else(|| self.dir.names_with_prefix(&prefix).into_iter().next());
        if let Some(snapshot) = taken {
            return Err(Error::NameTaken { name: snapshot });
        }
        state
            .claims
            .insert(name.to_string(), Owner::Job(job.to_string()));
        Ok(())
    }

    /// Holds `name` for `job` as it was held before a restart, whether or not
    /// the model already exists (a job may have registered it and died
    /// before recording its success).
    pub fn restore_reservation(&self, name: &str, job: &str) {
        let mut state = self.write();
        // A registration or deletion in progress here keeps its claim (its
        // end would otherwise drop the job's).
        if matches!(
            state.claims.get(name),
            Some(Owner::Registration | Owner::Deletion)
        ) {
            return;
        }
        state
            .claims
            .insert(name.to_string(), Owner::Job(job.to_string()));
    }

    /// Whether `name` is stored: in the remote's catalogue, or in the
    /// directory (loaded here or not).
    pub fn is_committed(&self, name: &str) -> bool {
        match &self.remote {
            Some(remote) => remote.catalogue().is_ok_and(|c| c.contains_key(name)),
            None => self.read().models.contains_key(name) || self.dir.contains(name),
        }
    }

    /// Writes a validated model: to the remote (the commit) and then the
    /// directory (its cache), or to the directory alone. Returns the remote
    /// version. A cache that cannot be written costs nothing but a fetch.
    fn commit(
        &self,
        name: &str,
        manifest_json: &[u8],
        weights: &[u8],
        num_classes: usize,
        job: Option<&str>,
    ) -> Result<Option<String>> {
        let Some(remote) = &self.remote else {
            self.dir.save(name, manifest_json, weights)?;
            return Ok(None);
        };
        let version = remote.commit(name, manifest_json, weights, num_classes, job)?;
        let _ = self.dir.save(name, manifest_json, weights);
        Ok(Some(version))
    }

    /// Removes a model: from the remote first, then the directory.
    fn uncommit(&self, name: &str) -> Result<()> {
        if let Some(remote) = &self.remote {
            remote.remove(name)?;
            let _ = self.dir.delete(name);
            return Ok(());
        }
        self.dir.delete(name)
    }

    /// Serves a model just saved here, with its files' stamp (and remote
    /// version), so that [`ModelStore::refresh`] does not load it again.
    fn loaded(
        &self,
        name: &str,
        model: Arc<LoadedModel>,
        version: Option<String>,
        manifest_json: &[u8],
        bytes: usize,
    ) {
        let stamp = self.dir.stamp(name);
        let mut state = self.write();
        if let Some(stamp) = stamp {
            state.seen.insert(name.to_string(), stamp);
        }
        if let Some(v) = version {
            let entry = Entry {
                version: v.clone(),
                bytes: bytes as u64,
                manifest: String::from_utf8_lossy(manifest_json).into_owned(),
                num_classes: model.classes.len(),
            };
            state.catalogue.insert(name.to_string(), entry);
            state.versions.insert(name.to_string(), v);
            state.generation += 1;
        }
        state.models.insert(name.to_string(), model);
        drop(state);
        self.touch(name);
        self.evict(name);
    }

    /// `(job, name)` for every name a job holds here.
    pub fn job_holds(&self) -> Vec<(String, String)> {
        self.read()
            .claims
            .iter()
            .filter_map(|(name, owner)| match owner {
                Owner::Job(job) => Some((job.clone(), name.clone())),
                _ => None,
            })
            .collect()
    }

    /// Catches up with other processes sharing the directory: loads the
    /// models they committed, reloads those they replaced and drops those
    /// they deleted. Names held here (a job's, a registration or deletion
    /// in progress) are left alone, and nothing is read while a commit is
    /// in flight; a model that does not load is tried again only once its
    /// files change. Returns the names that changed.
    pub fn refresh(&self) -> Vec<String> {
        if let Some(remote) = &self.remote {
            return self.refresh_from(remote.as_ref());
        }
        let Some(on_disk) = self.dir.stamps() else {
            return Vec::new();
        };
        let (changed, gone): (Vec<(String, Stamp)>, Vec<String>) = {
            let state = self.read();
            let changed = on_disk
                .iter()
                .filter(|(name, stamp)| {
                    state.holder(name).is_none() && state.seen.get(*name) != Some(*stamp)
                })
                .map(|(n, s)| (n.clone(), *s))
                .collect();
            let gone = state
                .models
                .keys()
                .filter(|n| !on_disk.contains_key(*n) && state.holder(n).is_none())
                .cloned()
                .collect();
            (changed, gone)
        };
        let mut names = Vec::new();
        for (name, stamp) in changed {
            let loaded = LoadedModel::from_files(&self.dir.manifest_path(&name), &self.device)
                .ok()
                .filter(|m| m.name() == name);
            let mut state = self.write();
            if state.holder(&name).is_some() {
                continue;
            }
            state.seen.insert(name.clone(), stamp);
            if let Some(m) = loaded {
                state.models.insert(name.clone(), Arc::new(m));
                names.push(name);
            }
        }
        let mut state = self.write();
        for name in gone {
            if state.holder(&name).is_none() {
                state.models.remove(&name);
                state.seen.remove(&name);
                names.push(name);
            }
        }
        names
    }

    /// [`ModelStore::refresh`] with a remote: the catalogue says what there
    /// is; a loaded model whose version changed or that is gone is dropped
    /// (with its cached copy), and the next use loads the new one.
    fn refresh_from(&self, remote: &dyn Remote) -> Vec<String> {
        let generation = self.read().generation;
        let Ok(catalogue) = remote.catalogue() else {
            return Vec::new();
        };
        // Models loaded from the cache directory at the start: their
        // version is that of their files.
        let unversioned: Vec<String> = {
            let state = self.read();
            state
                .models
                .keys()
                .filter(|n| !state.versions.contains_key(*n))
                .cloned()
                .collect()
        };
        for name in unversioned {
            let files = std::fs::read(self.dir.manifest_path(&name))
                .ok()
                .zip(std::fs::read(self.dir.path().join(format!("{name}.safetensors"))).ok());
            if let Some((m, w)) = files {
                let v = remote.version(&m, &w);
                self.write().versions.insert(name, v);
            }
        }
        let mut state = self.write();
        if state.generation != generation {
            // Registered or deleted here meanwhile: the catalogue read is
            // older than this view; the next refresh reads it again.
            return Vec::new();
        }
        let stale: Vec<String> = state
            .models
            .keys()
            .filter(|n| {
                state.holder(n).is_none()
                    && catalogue.get(*n).map(|e| &e.version) != state.versions.get(*n)
            })
            .cloned()
            .collect();
        let mut changed: Vec<String> = catalogue
            .iter()
            .filter(|(n, e)| state.catalogue.get(*n).map(|o| &o.version) != Some(&e.version))
            .map(|(n, _)| n.clone())
            .chain(
                state
                    .catalogue
                    .keys()
                    .filter(|n| !catalogue.contains_key(*n))
                    .cloned(),
            )
            .collect();
        for name in &stale {
            state.models.remove(name);
            state.versions.remove(name);
        }
        state.catalogue = catalogue;
        drop(state);
        for name in &stale {
            self.used
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
            let _ = self.dir.delete(name);
        }
        self.evict("");
        changed.sort();
        changed.dedup();
        changed
    }

    /// Ends every hold of `job`.
    pub fn release(&self, job: &str) {
        self.write()
            .claims
            .retain(|_, owner| *owner != Owner::Job(job.to_string()));
    }

    /// Writes and serves `manifest.name` for the job that reserved it (its
    /// result, or an epoch snapshot), replacing an earlier version.
    pub fn replace(
        &self,
        job: &str,
        manifest: &Manifest,
        weights: &[u8],
    ) -> Result<Arc<LoadedModel>> {
        self.check_holder(&manifest.name, job)?;
        let json =
            serde_json::to_vec_pretty(manifest).map_err(|e| Error::Manifest(e.to_string()))?;
        let model = LoadedModel::from_bytes(&json, weights, &self.device)?;
        let version = self.commit(
            &manifest.name,
            &json,
            weights,
            model.classes.len(),
            Some(job),
        )?;
        let model = Arc::new(model);
        self.loaded(&manifest.name, model.clone(), version, &json, weights.len());
        Ok(model)
    }

    /// Takes back a name `job` registered (a snapshot of a job that then
    /// failed or was cancelled).
    pub fn retract(&self, job: &str, name: &str) -> Result<()> {
        self.check_holder(name, job)?;
        self.uncommit(name)?;
        let mut state = self.write();
        state.models.remove(name);
        state.versions.remove(name);
        state.catalogue.remove(name);
        state.generation += 1;
        Ok(())
    }

    /// Unregisters `name` and deletes its files; refused while a job holds it.
    pub fn delete(&self, name: &str) -> Result<()> {
        // The claim keeps a registration of the same name from writing
        // while the files go.
        let _claim = {
            let mut state = self.write();
            if let Some(owner) = state.holder(name) {
                return Err(Error::NameHeld {
                    name: name.to_string(),
                    owner: owner.clone(),
                });
            }
            if !state.models.contains_key(name) && !state.catalogue.contains_key(name) {
                return Err(Error::UnknownModel {
                    name: name.to_string(),
                    known: state.models.keys().cloned().collect(),
                });
            }
            state.claims.insert(name.to_string(), Owner::Deletion);
            Claim {
                store: self,
                name: name.to_string(),
            }
        };
        self.uncommit(name)?;
        let mut state = self.write();
        state.models.remove(name);
        state.versions.remove(name);
        state.catalogue.remove(name);
        state.generation += 1;
        Ok(())
    }

    fn check_holder(&self, name: &str, job: &str) -> Result<()> {
        match self.read().holder(name) {
            Some(Owner::Job(id)) if id == job => Ok(()),
            other => Err(Error::NotReserved {
                name: name.to_string(),
                job: job.to_string(),
                holder: other.map(|o| o.to_string()),
            }),
        }
    }

    /// Claims a free name for the duration of a registration.
    fn claim(&self, name: &str, owner: Owner) -> Result<Claim<'_>> {
        let mut state = self.write();
        Self::free(&state, &self.dir, name)?;
        state.claims.insert(name.to_string(), owner);
        Ok(Claim {
            store: self,
            name: name.to_string(),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Every write is a single map operation, so a panic elsewhere while
        // the lock was held cannot leave the state half-updated.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    /// A store on a temporary directory holding the bundled CNN_A.
    fn store() -> (tempfile::TempDir, ModelStore, Vec<u8>, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let models = repo().join("models");
        let manifest = std::fs::read(models.join("cnn-a-mnist.json")).unwrap();
        let weights = std::fs::read(models.join("cnn-a-mnist.safetensors")).unwrap();
        let store = ModelStore::open(tmp.path(), &Device::Cpu).unwrap();
        (tmp, store, manifest, weights)
    }

    fn renamed(manifest: &[u8], name: &str) -> Manifest {
        let mut m = Manifest::from_json(manifest).unwrap();
        m.name = name.into();
        m
    }

    #[test]
    fn a_reserved_name_cannot_be_registered_or_deleted_by_anyone_else() {
        let (_tmp, store, manifest, weights) = store();
        store.reserve("cnn-a-mnist", "job-1").unwrap();
        let err = store.register(&manifest, &weights).unwrap_err();
        assert!(
            matches!(&err, Error::NameHeld { owner: Owner::Job(j), .. } if j == "job-1"),
            "{err}"
        );
        assert!(store.reserve("cnn-a-mnist", "job-2").is_err());
        // The job's snapshot is the job's too.
        let snap = renamed(&manifest, "cnn-a-mnist@epoch-1");
        store.replace("job-1", &snap, &weights).unwrap();
        assert!(store.delete("cnn-a-mnist@epoch-1").is_err());
        assert!(store.replace("job-2", &snap, &weights).is_err());
        // Once released, the job's result stays and is an ordinary model.
        let done = Manifest::from_json(&manifest).unwrap();
        store.replace("job-1", &done, &weights).unwrap();
        store.release("job-1");
        assert!(matches!(
            store.register(&manifest, &weights),
            Err(Error::NameTaken { .. })
        ));
        store.delete("cnn-a-mnist").unwrap();
        store.delete("cnn-a-mnist@epoch-1").unwrap();
        assert!(store.names().is_empty());
    }

    #[test]
    fn a_registered_name_cannot_be_reserved_and_survives_reopening() {
        let (tmp, store, manifest, weights) = store();
        store.register(&manifest, &weights).unwrap();
        assert!(matches!(
            store.reserve("cnn-a-mnist", "job-1"),
            Err(Error::NameTaken { .. })
        ));
        drop(store);
        let again = ModelStore::open(tmp.path(), &Device::Cpu).unwrap();
        assert_eq!(again.names(), ["cnn-a-mnist"]);
        assert!(again.failures().is_empty());
    }

    #[test]
    fn a_job_cannot_take_a_name_whose_snapshots_are_someone_elses() {
        let (_tmp, store, manifest, weights) = store();
        let mut m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        m["name"] = serde_json::json!("x@epoch-1");
        store.register(m.to_string().as_bytes(), &weights).unwrap();
        let err = store.reserve("x", "job-1").unwrap_err();
        assert!(
            matches!(&err, Error::NameTaken { name } if name == "x@epoch-1"),
            "{err}"
        );
        // A name that is no name is refused before any file is looked at.
        assert!(store.check_free("../../etc/passwd").is_err());
    }

    #[test]
    fn only_one_of_many_simultaneous_reservations_wins() {
        let (_tmp, store, _, _) = store();
        let wins = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = &store;
                    s.spawn(move || store.reserve("x", &format!("job-{i}")).is_ok())
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|&won| won)
                .count()
        });
        assert_eq!(wins, 1);
    }
}
