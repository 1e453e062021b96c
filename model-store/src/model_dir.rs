//! The models directory: `<name>.json` + `<name>.safetensors` pairs, changed
//! only through a commit journal so that a kill -9 at any point leaves every
//! model either wholly old, wholly new, or absent — never a manifest beside
//! weights it was not written with.
//!
//! A change (register, replace, delete) goes in four steps:
//! 1. the new files are written to hidden temporary files and synced;
//! 2. a journal `.commit-*.json` listing the renames and removals is written
//!    to a temporary file, synced and renamed into place: this rename is the
//!    commit point;
//! 3. the renames and removals are carried out, and the directory synced;
//! 4. the journal is removed.
//!
//! At open, every journal left by a crash is carried out again (each step is
//! idempotent: a rename whose source is gone already happened), then every
//! stray temporary file is removed. A crash before step 2 therefore leaves
//! the old state, a crash after it the new one.
//!
//! Every process that opens the directory holds a shared lock on it (on
//! the directory itself, so no lock file appears among the models); recovery runs only when a process can take that lock alone
//! (no other process is using the directory, so no journal or temporary file
//! is live), and [`ModelDir::open_exclusive`] (for `convscope train`) keeps
//! it alone, so two writers that cannot see each other's names never share
//! a directory.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{LoadFailure, LoadedModel};

const TEMP_PREFIX: &str = ".upload-";
const TEMP_SUFFIX: &str = ".tmp";
const JOURNAL_PREFIX: &str = ".commit-";

/// A manifest's modified time and length.
pub type Stamp = (std::time::SystemTime, u64);

/// The directory of `<name>.json` + `<name>.safetensors` pairs.
#[derive(Debug, Clone)]
pub struct ModelDir {
    path: PathBuf,
    /// The directory opened as a file, locked shared (or exclusive) while
    /// any clone of this handle lives.
    _lock: std::sync::Arc<std::fs::File>,
    /// Journals found at open that could not be carried out.
    recovery_failures: Vec<LoadFailure>,
}

/// How a directory is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// With other processes (servers reading and writing through journals).
    Shared,
    /// Alone: no other process may open it meanwhile.
    Exclusive,
}

/// One step of a journal, with file names relative to the directory.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    Rename { from: String, to: String },
    Remove { file: String },
}

impl ModelDir {
    /// Uses `path`, creating it if needed, and finishes or discards whatever
    /// a crash left half-done there (when no other process has it open).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::open_as(path.into(), Hold::Shared)
    }

    /// Uses `path` alone: fails with [`Error::DirectoryInUse`] while another
    /// process (a server) has it open, and keeps others out until dropped.
    pub fn open_exclusive(path: impl Into<PathBuf>) -> Result<Self> {
        Self::open_as(path.into(), Hold::Exclusive)
    }

    fn open_as(path: PathBuf, hold: Hold) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(&path).map_err(io(&path))?;
        let lock_path = path.clone();
        let lock = lock_handle(&path).map_err(io(&lock_path))?;
        let in_use = || Error::DirectoryInUse { path: path.clone() };
        let alone = match lock.try_lock() {
            Ok(()) => true,
            Err(std::fs::TryLockError::WouldBlock) if hold == Hold::Shared => false,
            Err(std::fs::TryLockError::WouldBlock) => return Err(in_use()),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        };
        let mut dir = Self {
            path: path.clone(),
            _lock: std::sync::Arc::new(lock),
            recovery_failures: Vec::new(),
        };
        if alone {
            dir.recovery_failures = dir.recover()?;
            if hold == Hold::Shared {
                // From alone to shared: other servers may open it now.
                dir._lock.unlock().map_err(io(&lock_path))?;
                match dir._lock.try_lock_shared() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => return Err(in_use()),
                    Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
                }
            }
        } else {
            // Another process holds it: a server (shared), one recovering
            // it at its start (exclusive for a moment: wait, so replicas
            // started together all come up), or `convscope train`
            // (exclusive for its whole run: refused).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            loop {
                match dir._lock.try_lock_shared() {
                    Ok(()) => break,
                    Err(std::fs::TryLockError::WouldBlock)
                        if std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    Err(std::fs::TryLockError::WouldBlock) => return Err(in_use()),
                    Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
                }
            }
        }
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads every manifest in the directory. A model that fails is reported
    /// and skipped; the others load.
    pub fn load_all(&self, device: &Device) -> (Vec<LoadedModel>, Vec<LoadFailure>) {
        let (loaded, mut failed) = self.load_manifests(device);
        failed.extend(self.recovery_failures.iter().cloned());
        (loaded, failed)
    }

    fn load_manifests(&self, device: &Device) -> (Vec<LoadedModel>, Vec<LoadFailure>) {
        let mut manifests: Vec<PathBuf> = match self.entries() {
            Ok(names) => names
                .into_iter()
                .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
                .map(|n| self.path.join(n))
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

    /// The model names in the directory (from either file) that start with
    /// `prefix`.
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .entries()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .filter_map(|n| {
                n.strip_suffix(".json")
                    .or_else(|| n.strip_suffix(".safetensors"))
                    .map(str::to_string)
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Each committed model's name with its manifest's stamp (modified
    /// time and length: a save renames a new manifest into place last, so
    /// a new stamp means a new commit). `None` while a commit is in flight
    /// (a journal is present): a reader looks again later rather than see
    /// half of it.
    pub fn stamps(&self) -> Option<BTreeMap<String, Stamp>> {
        let names = self.entries().ok()?;
        // A live commit's journal lasts as long as a few renames; one much
        // older was left by a process killed mid-commit (finished at the
        // next start that has the directory alone) and blocks nobody.
        let live = names
            .iter()
            .filter(|n| n.starts_with(JOURNAL_PREFIX))
            .any(|n| {
                std::fs::metadata(self.path.join(n))
                    .and_then(|m| m.modified())
                    // Within 30 s either way (another machine's clock may
                    // run ahead of ours); further off, it is stale.
                    .is_ok_and(|t| match t.elapsed() {
                        Ok(age) => age.as_secs() < 30,
                        Err(ahead) => ahead.duration().as_secs() < 30,
                    })
            });
        if live {
            return None;
        }
        Some(
            names
                .into_iter()
                .filter(|n| !n.starts_with('.'))
                .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
                .filter_map(|name| Some((name.clone(), self.stamp(&name)?)))
                .collect(),
        )
    }

    /// The stamp of `name`'s manifest, if it is there.
    pub fn stamp(&self, name: &str) -> Option<Stamp> {
        let meta = std::fs::metadata(self.file(name, "json")).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    }

    /// The manifest file of `name`.
    pub fn manifest_path(&self, name: &str) -> PathBuf {
        self.file(name, "json")
    }

    /// Whether either file of `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        ["json", "safetensors", "pth"]
            .iter()
            .any(|ext| self.file(name, ext).exists())
    }

    /// Writes (or overwrites) a model's two files as one commit.
    pub fn save(&self, name: &str, manifest_json: &[u8], weights: &[u8]) -> Result<()> {
        let weights_tmp = self.write_temp(weights)?;
        let manifest_tmp = match self.write_temp(manifest_json) {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(self.path.join(&weights_tmp));
                return Err(e);
            }
        };
        self.commit(vec![
            Step::Rename {
                from: weights_tmp,
                to: format!("{name}.safetensors"),
            },
            Step::Rename {
                from: manifest_tmp,
                to: format!("{name}.json"),
            },
        ])
    }

    /// Deletes a model's files as one commit (the manifest first, so that
    /// even without the journal no manifest outlives its weights).
    pub fn delete(&self, name: &str) -> Result<()> {
        self.commit(vec![
            Step::Remove {
                file: format!("{name}.json"),
            },
            Step::Remove {
                file: format!("{name}.safetensors"),
            },
            // A model placed on disk as `.pth` (read and converted at load).
            Step::Remove {
                file: format!("{name}.pth"),
            },
        ])
    }

    fn file(&self, name: &str, ext: &str) -> PathBuf {
        self.path.join(format!("{name}.{ext}"))
    }

    fn io(&self, file: &str) -> impl Fn(std::io::Error) -> Error + '_ {
        let path = self.path.join(file);
        move |source| Error::Io {
            path: path.clone(),
            source,
        }
    }

    fn entries(&self) -> std::io::Result<Vec<String>> {
        Ok(std::fs::read_dir(&self.path)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }

    /// Writes `bytes` to a new hidden temporary file, synced; its name.
    fn write_temp(&self, bytes: &[u8]) -> Result<String> {
        let (name, mut file) = self.create_temp()?;
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        if let Err(source) = written {
            let _ = std::fs::remove_file(self.path.join(&name));
            return Err(self.io(&name)(source));
        }
        Ok(name)
    }

    /// A uniquely named hidden file (hidden files are never loaded).
    fn create_temp(&self) -> Result<(String, std::fs::File)> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{TEMP_PREFIX}{}-{n}{TEMP_SUFFIX}", std::process::id());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(self.path.join(&name))
            {
                Ok(f) => return Ok((name, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.io(&name)(e)),
            }
        }
    }

    /// Makes `steps` durable as a journal, carries them out, then drops the
    /// journal.
    fn commit(&self, steps: Vec<Step>) -> Result<()> {
        let text = serde_json::to_vec(&steps).map_err(|e| Error::Manifest(e.to_string()))?;
        let tmp = self.write_temp(&text)?;
        let journal = tmp.replacen(TEMP_PREFIX, JOURNAL_PREFIX, 1);
        std::fs::rename(self.path.join(&tmp), self.path.join(&journal)).map_err(|e| {
            let _ = std::fs::remove_file(self.path.join(&tmp));
            self.io(&journal)(e)
        })?;
        sync_dir(&self.path);
        // Committed: the change happens, now or (if a step fails here) when
        // the journal, left in place, is carried out at the next open.
        let done = self
            .apply(&steps, Replay::No)
            .or_else(|_| self.apply(&steps, Replay::Yes));
        sync_dir(&self.path);
        if done.is_ok() {
            let _ = std::fs::remove_file(self.path.join(&journal));
            sync_dir(&self.path);
        }
        Ok(())
    }

    /// Carries out `steps`. Replaying a journal after a crash, a file already
    /// gone means its step already happened; in a live commit it is an error.
    fn apply(&self, steps: &[Step], replay: Replay) -> Result<()> {
        let gone =
            |e: &std::io::Error| replay == Replay::Yes && e.kind() == std::io::ErrorKind::NotFound;
        for step in steps {
            match step {
                Step::Rename { from, to } => {
                    match std::fs::rename(self.path.join(from), self.path.join(to)) {
                        Ok(()) => {}
                        Err(e) if gone(&e) => {}
                        Err(e) => return Err(self.io(to)(e)),
                    }
                }
                // Removing what is not there is done, replayed or not.
                Step::Remove { file } => match std::fs::remove_file(self.path.join(file)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.io(file)(e)),
                },
            }
        }
        Ok(())
    }

    /// Carries out the journals a crash left (oldest first), then removes
    /// temporary files that no journal names; returns the journals that
    /// could not be carried out, for `load_errors`.
    fn recover(&self) -> Result<Vec<LoadFailure>> {
        let mut failures = Vec::new();
        let names = self.entries().map_err(self.io(""))?;
        let mut journals: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(JOURNAL_PREFIX) && n.ends_with(TEMP_SUFFIX))
            .collect();
        journals.sort_by_key(|n| journal_order(n));
        for journal in journals {
            let path = self.path.join(journal);
            // A journal is renamed into place only once complete, so one that
            // does not read or parse is not ours: it stays, for a person to
            // look at, and is reported.
            let steps = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    serde_json::from_slice::<Vec<Step>>(&text).map_err(|e| e.to_string())
                });
            let done =
                steps.and_then(|steps| self.apply(&steps, Replay::Yes).map_err(|e| e.to_string()));
            match done {
                Ok(()) => {
                    sync_dir(&self.path);
                    std::fs::remove_file(&path).map_err(self.io(journal))?;
                }
                Err(error) => failures.push(LoadFailure {
                    file: path,
                    error: format!("an unfinished change that cannot be carried out: {error}"),
                }),
            }
        }
        for name in &names {
            if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
                let _ = std::fs::remove_file(self.path.join(name));
            }
        }
        sync_dir(&self.path);
        Ok(failures)
    }
}

/// What the directory's lock is taken on: the directory itself where the
/// OS can lock one (Unix), else a hidden `.lock` file in it.
fn lock_handle(dir: &Path) -> std::io::Result<std::fs::File> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
    }
    #[cfg(not(unix))]
    {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
    }
}

/// Whether steps are a journal being replayed after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    Yes,
    No,
}

/// `(pid, counter)` of a journal's name, so journals replay in the order
/// one process wrote them.
fn journal_order(name: &str) -> (u64, u64) {
    let digits = name
        .trim_start_matches(JOURNAL_PREFIX)
        .trim_end_matches(TEMP_SUFFIX);
    let mut parts = digits.split('-').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Makes renames durable; best effort (not every platform can open a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_committed_journal_is_carried_out_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ModelDir::open(tmp.path()).unwrap();
        dir.save("m", b"old manifest", b"old weights").unwrap();
        // A crash right after the commit point: new temp files and the
        // journal exist, nothing is renamed yet.
        let w = dir.write_temp(b"new weights").unwrap();
        let m = dir.write_temp(b"new manifest").unwrap();
        let steps = vec![
            Step::Rename {
                from: w,
                to: "m.safetensors".into(),
            },
            Step::Rename {
                from: m,
                to: "m.json".into(),
            },
        ];
        std::fs::write(
            tmp.path().join(".commit-1-1.tmp"),
            serde_json::to_vec(&steps).unwrap(),
        )
        .unwrap();
        // ... and halfway through the renames.
        dir.apply(&steps[..1], Replay::No).unwrap();
        drop(dir); // the process dies: its lock goes with it
        ModelDir::open(tmp.path()).unwrap();
        assert_eq!(files(tmp.path()), ["m.json", "m.safetensors"]);
        assert_eq!(
            std::fs::read(tmp.path().join("m.json")).unwrap(),
            b"new manifest"
        );
        assert_eq!(
            std::fs::read(tmp.path().join("m.safetensors")).unwrap(),
            b"new weights"
        );
    }

    #[test]
    fn temp_files_without_a_journal_are_discarded_and_the_old_model_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ModelDir::open(tmp.path()).unwrap();
        dir.save("m", b"old manifest", b"old weights").unwrap();
        dir.write_temp(b"half a new upload").unwrap();
        drop(dir);
        ModelDir::open(tmp.path()).unwrap();
        assert_eq!(files(tmp.path()), ["m.json", "m.safetensors"]);
        assert_eq!(
            std::fs::read(tmp.path().join("m.json")).unwrap(),
            b"old manifest"
        );
    }

    #[test]
    fn an_exclusive_holder_keeps_others_out_and_a_shared_one_keeps_it_out() {
        let tmp = tempfile::tempdir().unwrap();
        let a = ModelDir::open(tmp.path()).unwrap();
        let b = ModelDir::open(tmp.path()).unwrap();
        assert!(matches!(
            ModelDir::open_exclusive(tmp.path()),
            Err(Error::DirectoryInUse { .. })
        ));
        drop((a, b));
        let alone = ModelDir::open_exclusive(tmp.path()).unwrap();
        assert!(ModelDir::open(tmp.path()).is_err());
        drop(alone);
        ModelDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn a_journal_that_cannot_be_read_is_kept_and_reported() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(".commit-1-1.tmp"), b"{not json").unwrap();
        let dir = ModelDir::open(tmp.path()).unwrap();
        let (_, failures) = dir.load_all(&Device::Cpu);
        assert_eq!(failures.len(), 1);
        assert!(
            failures[0].error.contains("unfinished change"),
            "{:?}",
            failures[0]
        );
        assert!(tmp.path().join(".commit-1-1.tmp").exists());
    }

    #[test]
    fn delete_removes_both_files_and_leaves_no_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ModelDir::open(tmp.path()).unwrap();
        dir.save("a", b"{}", b"w").unwrap();
        dir.save("b", b"{}", b"w").unwrap();
        dir.delete("a").unwrap();
        assert_eq!(files(tmp.path()), ["b.json", "b.safetensors"]);
        assert!(!dir.contains("a") && dir.contains("b"));
    }
}
