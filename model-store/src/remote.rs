//! Where models are committed when several machines share them.
//!
//! With a [`Remote`] (the server's PostgreSQL catalogue over S3-compatible
//! object storage) the models directory is only this process's cache: a
//! registration is validated here, committed remotely (that is when every
//! replica may see it), then written to the cache and served; a deletion
//! is removed remotely first. [`crate::ModelStore::refresh`] brings the
//! cache up to the catalogue's list, and a model is fetched and loaded on
//! its first use, the least recently used ones dropped beyond the cache's
//! byte bound. This crate knows no database and no HTTP: the trait is all
//! it sees.

use std::collections::BTreeMap;

use crate::error::Result;

/// A model as the catalogue lists it: its version is the SHA-256 of its
/// weights and manifest, so a changed model is a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The version (hex SHA-256).
    pub version: String,
    /// Bytes of the weights (what a download costs, and what it takes of
    /// the cache).
    pub bytes: u64,
    /// The manifest, as committed.
    pub manifest: String,
    /// Outputs of its head (listed without loading it).
    pub num_classes: usize,
}

/// The shared catalogue and object storage of models.
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// Commits `name`: a new model (`job` `None`: refused if the name is
    /// taken or a job holds it), or a job's result or snapshot, replacing
    /// an earlier version (`job` must hold the name). Returns the version.
    fn commit(
        &self,
        name: &str,
        manifest_json: &[u8],
        weights: &[u8],
        num_classes: usize,
        job: Option<&str>,
    ) -> Result<String>;
    /// Removes `name` (a deletion, or a job's snapshot taken back).
    fn remove(&self, name: &str) -> Result<()>;
    /// Every committed model.
    fn catalogue(&self) -> Result<BTreeMap<String, Entry>>;
    /// The manifest and weights of `name` at `version`, checked against it.
    fn fetch(&self, name: &str, version: &str) -> Result<(Vec<u8>, Vec<u8>)>;
    /// The version these files would have (to trust a cached copy).
    fn version(&self, manifest_json: &[u8], weights: &[u8]) -> String;
}
