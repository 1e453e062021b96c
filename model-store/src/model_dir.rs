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

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{LoadFailure, LoadedModel};

const TEMP_PREFIX: &str = ".upload-";
const TEMP_SUFFIX: &str = ".tmp";
const JOURNAL_PREFIX: &str = ".commit-";

/// The directory of `<name>.json` + `<name>.safetensors` pairs.
#[derive(Debug, Clone)]
pub struct ModelDir {
    path: PathBuf,
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
    /// a crash left half-done there.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        std::fs::create_dir_all(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let dir = Self { path };
        dir.recover()?;
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Loads every manifest in the directory. A model that fails is reported
    /// and skipped; the others load.
    pub fn load_all(&self, device: &Device) -> (Vec<LoadedModel>, Vec<LoadFailure>) {
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

    /// Whether either file of `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.file(name, "json").exists() || self.file(name, "safetensors").exists()
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
        self.apply(&steps)?;
        sync_dir(&self.path);
        std::fs::remove_file(self.path.join(&journal)).map_err(self.io(&journal))?;
        sync_dir(&self.path);
        Ok(())
    }

    fn apply(&self, steps: &[Step]) -> Result<()> {
        for step in steps {
            match step {
                Step::Rename { from, to } => {
                    match std::fs::rename(self.path.join(from), self.path.join(to)) {
                        Ok(()) => {}
                        // Replaying a journal: this rename already happened.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(self.io(to)(e)),
                    }
                }
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
    /// temporary files that no journal names.
    fn recover(&self) -> Result<()> {
        let names = self.entries().map_err(self.io(""))?;
        let mut journals: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(JOURNAL_PREFIX) && n.ends_with(TEMP_SUFFIX))
            .collect();
        journals.sort_by_key(|n| journal_order(n));
        for journal in journals {
            let path = self.path.join(journal);
            let text = std::fs::read(&path).map_err(self.io(journal))?;
            // A journal is renamed into place only once complete, so an
            // unreadable one is not ours: leave it for a person to look at.
            let Ok(steps) = serde_json::from_slice::<Vec<Step>>(&text) else {
                continue;
            };
            self.apply(&steps)?;
            sync_dir(&self.path);
            std::fs::remove_file(&path).map_err(self.io(journal))?;
        }
        for name in &names {
            if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
                let _ = std::fs::remove_file(self.path.join(name));
            }
        }
        sync_dir(&self.path);
        Ok(())
    }
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
        dir.apply(&steps[..1]).unwrap();
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
        ModelDir::open(tmp.path()).unwrap();
        assert_eq!(files(tmp.path()), ["m.json", "m.safetensors"]);
        assert_eq!(
            std::fs::read(tmp.path().join("m.json")).unwrap(),
            b"old manifest"
        );
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
