//! Models on S3-compatible object storage (`--models s3://BUCKET/PREFIX`),
//! catalogued in PostgreSQL: the [`model_store::remote::Remote`] the model
//! store commits to when several machines share models, and the place
//! workers leave each job's per-epoch resume state.
//!
//! Layout under the prefix:
//! - `models/<sha256>.safetensors`: weights, named by their hash (a job's
//!   model and its last epoch snapshot are one object);
//! - `jobs/<id>/epoch-<n>/{resume.json,weights.safetensors,optimizer.safetensors}`:
//!   the state a job resumes from, the epoch recorded in its row once all
//!   three are up (the commit point), the epoch before removed after.
//!
//! A model is committed by one transaction that locks its name and its
//! weights' hash, checks who may write the name, uploads the weights and
//! inserts or updates the row: an upload that fails (S3 unreachable)
//! rolls the row back, so nothing is half-written, and it answers
//! [`model_store::Error::Unavailable`] (503 with `Retry-After`). A removal
//! deletes the row and, under the same hash lock, the object once no row
//! names it. S3 calls time out after `--storage-timeout` seconds.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use model_store::remote::{Entry, Remote};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use sha2::{Digest, Sha256};

use crate::jobs::postgres::{PgStore, lock_key};

/// The work directory files a job resumes from, `resume.json` last.
const WORK_FILES: [&str; 3] = [
    "weights.safetensors",
    "optimizer.safetensors",
    "resume.json",
];

/// Object storage and the catalogue beside the job store.
pub struct SharedStorage {
    pg: Arc<PgStore>,
    objects: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    timeout: Duration,
    url: String,
}

impl std::fmt::Debug for SharedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedStorage({})", self.url)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unavailable(e: impl std::fmt::Display) -> model_store::Error {
    model_store::Error::Unavailable(e.to_string())
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl SharedStorage {
    /// Opens `url` (`s3://bucket/prefix`, with the usual `AWS_*`
    /// variables, `AWS_ENDPOINT_URL` included; or `file:///dir` for tests
    /// and shared mounts) beside `pg`.
    pub fn open(url: &str, pg: Arc<PgStore>, timeout: Duration) -> Result<Self, String> {
        let (objects, prefix): (Arc<dyn ObjectStore>, ObjectPath) =
            if let Some(rest) = url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(format!("'{url}' names no bucket: s3://BUCKET/PREFIX"));
                }
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_timeout(timeout)
                            .with_connect_timeout(timeout)
                            .with_allow_http(true),
                    )
                    .with_retry(object_store::RetryConfig {
                        max_retries: 2,
                        retry_timeout: timeout,
                        ..Default::default()
                    });
                if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                    builder = builder.with_endpoint(endpoint);
                }
                let s3 = builder.build().map_err(|e| e.to_string())?;
                (Arc::new(s3), ObjectPath::from(prefix))
            } else if let Some(dir) = url.strip_prefix("file://") {
                std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| e.to_string())?;
                (Arc::new(fs), ObjectPath::from(""))
            } else {
                return Err(format!("'{url}' is not an s3:// or file:// URL"));
            };
        Ok(Self {
            pg,
            objects,
            prefix,
            timeout,
            url: url.to_string(),
        })
    }

    fn key(&self, rest: &str) -> ObjectPath {
        if self.prefix.as_ref().is_empty() {
            ObjectPath::from(rest)
        } else {
            ObjectPath::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// Runs an object-store call on the store's runtime and waits for it.
    fn s3<T: Send + 'static>(
        &self,
        call: impl Future<Output = object_store::Result<T>> + Send + 'static,
    ) -> model_store::Result<T> {
        match self.pg.run(call, self.timeout * 3) {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(unavailable(format!("object storage: {e}"))),
            None => Err(unavailable(format!(
                "object storage: no answer within {} s",
                (self.timeout * 3).as_secs()
            ))),
        }
    }

    fn put(&self, key: ObjectPath, bytes: Vec<u8>) -> model_store::Result<()> {
        let store = self.objects.clone();
        self.s3(async move { store.put(&key, PutPayload::from(bytes)).await.map(|_| ()) })
    }

    fn get(&self, key: ObjectPath) -> model_store::Result<Vec<u8>> {
        let store = self.objects.clone();
        self.s3(async move { Ok(store.get(&key).await?.bytes().await?.to_vec()) })
    }

    fn delete(&self, key: ObjectPath) -> model_store::Result<()> {
        let store = self.objects.clone();
        self.s3(async move {
            match store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// Every object key under the prefix (for the tests' orphan check and
    /// the job clean-up).
    pub fn list(&self, under: &str) -> model_store::Result<Vec<String>> {
        let store = self.objects.clone();
        let prefix = self.key(under);
        self.s3(async move {
            let metas: Vec<_> = store.list(Some(&prefix)).try_collect().await?;
            Ok(metas.into_iter().map(|m| m.location.to_string()).collect())
        })
    }

    /// Seeds an empty catalogue with the model pairs in `dir` (the bundled
    /// ones), once however many processes start.
    pub fn seed(&self, dir: &std::path::Path) {
        // Seeded once: the marker is written when every bundled model is
        // in (a failed start tries again; processes seeding together meet
        // in the commits, NameTaken); a catalogue emptied later stays so.
        let seeded = self.pg.with_pg(|c| {
            Box::pin(async move {
                let row = c
                    .query_opt("SELECT 1 FROM catalogue_seeded WHERE id = 1", &[])
                    .await?;
                Ok(row.is_some())
            })
        });
        if !matches!(seeded, Ok(false)) {
            return;
        }
        let mut complete = true;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_suffix(".json").map(str::to_string)
            })
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for name in names {
            let manifest = std::fs::read(dir.join(format!("{name}.json")));
            let weights = std::fs::read(dir.join(format!("{name}.safetensors")));
            let (Ok(manifest), Ok(weights)) = (manifest, weights) else {
                continue;
            };
            // Validated as any registration is, and its classes counted.
            let cpu = candle_core::Device::Cpu;
            let classes = match model_store::LoadedModel::from_bytes(&manifest, &weights, &cpu) {
                Ok(m) => m.classes.len(),
                Err(e) => {
                    tracing::warn!(model = %name, error = %e, "not seeded: it does not load");
                    continue;
                }
            };
            match self.commit(&name, &manifest, &weights, classes, None) {
                Ok(_) => tracing::info!(model = %name, "seeded the catalogue"),
                // Another process seeded it meanwhile.
                Err(model_store::Error::NameTaken { .. }) => {}
                Err(e) => {
                    complete = false;
                    tracing::warn!(model = %name, error = %e, "cannot seed the catalogue; the next start tries again");
                }
            }
        }
        if complete {
            let _ = self.pg.with_pg(|c| {
                Box::pin(async move {
                    c.execute(
                        "INSERT INTO catalogue_seeded (id, at) VALUES (1, now()) ON CONFLICT (id) DO NOTHING",
                        &[],
                    )
                    .await
                })
            });
        }
    }

    /// Deletes the weights object `key` (hash `sha`) if no row names it,
    /// under the hash's lock, so a commit of the same weights waits for it
    /// (and then uploads them again) or is seen and keeps it. A failure
    /// leaves an unreferenced object, logged.
    fn release_object(&self, sha: &str, key: &str) {
        let (sha_s, key_s) = (sha.to_string(), key.to_string());
        let done = self.pg.with_pg_for(self.timeout * 4, |c| {
            let (sha, key) = (sha_s.clone(), key_s.clone());
            let objects = self.objects.clone();
            let (handle, timeout) = (self.pg.handle(), self.timeout);
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1)",
                    &[&lock_key("object", &sha)],
                )
                .await?;
                let others: i64 = tx
                    .query_one("SELECT COUNT(*) FROM models WHERE sha256 = $1", &[&sha])
                    .await?
                    .get(0);
                let mut outcome = Ok(());
                if others == 0 {
                    let deleted = handle.spawn(async move {
                        match tokio::time::timeout(
                            timeout * 3,
                            objects.delete(&ObjectPath::from(key)),
                        )
                        .await
                        {
                            Ok(Ok(()) | Err(object_store::Error::NotFound { .. })) => Ok(()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => {
                                Err(format!("no answer within {} s", (timeout * 3).as_secs()))
                            }
                        }
                    });
                    outcome = deleted.await.map_err(|e| e.to_string()).and_then(|r| r);
                }
                tx.commit().await?;
                Ok(outcome)
            })
        });
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(object = %key, error = %e, "cannot delete an unreferenced object")
            }
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "cannot delete an unreferenced object")
            }
        }
    }

    /// Uploads `work`'s state after `epoch`, then records it in the job's
    /// row (the commit point), then removes the epoch before.
    pub fn save_work(&self, job: &str, epoch: usize, work: &std::path::Path) -> Result<(), String> {
        for file in WORK_FILES {
            let bytes = std::fs::read(work.join(file)).map_err(|e| format!("{file}: {e}"))?;
            self.put(self.key(&format!("jobs/{job}/epoch-{epoch}/{file}")), bytes)
                .map_err(|e| e.to_string())?;
        }
        let (id, n, me) = (
            job.to_string(),
            epoch as i32,
            self.pg.instance().to_string(),
        );
        let recorded = self
            .pg
            .with_pg(|c| {
                let (id, me) = (id.clone(), me.clone());
                Box::pin(async move {
                    c.execute(
                        "UPDATE jobs SET resume_epoch = $2 WHERE id = $1 AND worker = $3 AND status = 'running'",
                        &[&id, &n, &me],
                    )
                    .await
                })
            })
            .map_err(|e| e.to_string())?;
        if recorded == 0 {
            // Another worker has the job: its state is not ours to prune.
            return Err("the job's lease is gone".into());
        }
        if epoch > 1 {
            for file in WORK_FILES {
                let _ = self.delete(self.key(&format!("jobs/{job}/epoch-{}/{file}", epoch - 1)));
            }
        }
        Ok(())
    }

    /// Fills `work` with the state of `epoch` (another worker's), unless
    /// it already holds that epoch or a later one.
    pub fn load_work(&self, job: &str, epoch: u32, work: &std::path::Path) -> Result<(), String> {
        if epoch == 0 {
            return Ok(());
        }
        let local = std::fs::read(work.join("resume.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["epoch"].as_u64());
        if local.is_some_and(|e| e >= u64::from(epoch)) {
            return Ok(());
        }
        let stored = self
            .list(&format!("jobs/{job}/epoch-{epoch}"))
            .map_err(|e| e.to_string())?;
        if stored.len() < WORK_FILES.len() {
            tracing::warn!(job = %job, epoch, "the job's resume state is gone; it starts over");
            return Ok(());
        }
        std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
        for file in WORK_FILES {
            let bytes = self
                .get(self.key(&format!("jobs/{job}/epoch-{epoch}/{file}")))
                .map_err(|e| e.to_string())?;
            let tmp = work.join(format!(".{file}.download"));
            std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, work.join(file)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Removes a job's resume state (it ended).
    pub fn drop_work(&self, job: &str) {
        match self.list(&format!("jobs/{job}")) {
            Ok(keys) => {
                for key in keys {
                    let _ = self.delete(ObjectPath::from(key));
                }
            }
            Err(e) => {
                tracing::warn!(job = %job, error = %e, "cannot remove the job's resume state")
            }
        }
    }
}

impl Remote for SharedStorage {
    fn commit(
        &self,
        name: &str,
        manifest_json: &[u8],
        weights: &[u8],
        num_classes: usize,
        job: Option<&str>,
    ) -> model_store::Result<String> {
        let sha = hex(&Sha256::digest(weights));
        let version = self.version(manifest_json, weights);
        let classes = num_classes as i32;
        let manifest = String::from_utf8(manifest_json.to_vec())
            .map_err(|_| model_store::Error::Manifest("the manifest is not UTF-8".into()))?;
        let object_key = self.key(&format!("models/{sha}.safetensors"));
        let (name_s, job_s) = (name.to_string(), job.map(str::to_string));
        // The transaction: locks, the check, the upload, the row. The upload
        // runs inside it, so a failed upload leaves no row and a removal of
        // the same hash waits for it.
        let outcome = self.pg.with_pg_for(self.timeout * 4, |c| {
            let (name, job, manifest, version, sha) = (
                name_s.clone(),
                job_s.clone(),
                manifest.clone(),
                version.clone(),
                sha.clone(),
            );
            let key = object_key.to_string();
            let weights = weights.to_vec();
            let objects = self.objects.clone();
            let path = object_key.clone();
            let (handle, timeout) = (self.pg.handle(), self.timeout);
            Box::pin(async move {
                let tx = c.transaction().await?;
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1), pg_advisory_xact_lock($2)",
                    &[&lock_key("name", &name), &lock_key("object", &sha)],
                )
                .await?;
                let existing = tx
                    .query_opt(
                        "SELECT job_id, version, sha256, object_key FROM models WHERE name = $1",
                        &[&name],
                    )
                    .await?;
                let row_job: Option<String> = existing.as_ref().and_then(|r| r.get(0));
                // This very commit, retried after its answer was lost.
                if existing
                    .as_ref()
                    .is_some_and(|r| r.get::<_, String>(1) == version && row_job == job)
                {
                    return Ok(Ok(None));
                }
                let previous: Option<(String, String)> = existing
                    .as_ref()
                    .map(|r| (r.get(2), r.get(3)))
                    .filter(|(old, _): &(String, String)| *old != sha);
                let base = name.rsplit_once("@epoch-").map_or(name.as_str(), |(b, _)| b);
                let holder: Option<String> = tx
                    .query_opt(
                        "SELECT id FROM jobs WHERE status IN ('queued', 'running') AND spec->>'model_name' = $1",
                        &[&base],
                    )
                    .await?
                    .map(|r| r.get(0));
                let refused = match (&job, &holder) {
                    (None, Some(h)) => Some(Refusal::Held(h.clone())),
                    (None, None) if existing.is_some() => Some(Refusal::Taken),
                    (Some(j), h) if h.as_deref() != Some(j.as_str()) => {
                        Some(Refusal::NotHolder(h.clone()))
                    }
                    // A job replaces only what it registered itself.
                    (Some(j), _) if existing.is_some() && row_job.as_deref() != Some(j.as_str()) => {
                        Some(Refusal::Taken)
                    }
                    _ => None,
                };
                if let Some(r) = refused {
                    return Ok(Err(r));
                }
                let bytes = weights.len() as i64;
                // On the runtime (the object store needs its reactor; this
                // future is polled on the caller's thread).
                let put = handle.spawn(async move {
                    tokio::time::timeout(timeout * 3, objects.put(&path, PutPayload::from(weights)))
                        .await
                        .map_err(|_| format!("no answer within {} s", (timeout * 3).as_secs()))?
                        .map_err(|e| e.to_string())
                });
                match put.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Ok(Err(Refusal::Storage(e))),
                    Err(e) => return Ok(Err(Refusal::Storage(e.to_string()))),
                }
                tx.execute(
                    "INSERT INTO models (name, version, manifest, object_key, sha256, bytes, num_classes, job_id, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (name) DO UPDATE SET version = $2, manifest = $3, object_key = $4, sha256 = $5, bytes = $6, num_classes = $7, job_id = $8",
                    &[&name, &version, &manifest, &key, &sha, &bytes, &classes, &job, &now()],
                )
                .await?;
                tx.commit().await?;
                Ok(Ok(previous))
            })
        });
        match outcome {
            Ok(Ok(previous)) => {
                // The weights this name had before, if no row names them now.
                if let Some((sha, key)) = previous {
                    self.release_object(&sha, &key);
                }
                Ok(version)
            }
            Ok(Err(Refusal::Held(job))) => Err(model_store::Error::NameHeld {
                name: name.to_string(),
                owner: model_store::Owner::Job(job),
            }),
            Ok(Err(Refusal::Taken)) => Err(model_store::Error::NameTaken {
                name: name.to_string(),
            }),
            Ok(Err(Refusal::NotHolder(holder))) => Err(model_store::Error::NotReserved {
                name: name.to_string(),
                job: job.unwrap_or_default().to_string(),
                holder: holder.map(|h| format!("job {h}")),
            }),
            Ok(Err(Refusal::Storage(e))) => Err(unavailable(format!("object storage: {e}"))),
            Err(e) => Err(unavailable(e)),
        }
    }

    fn remove(&self, name: &str) -> model_store::Result<()> {
        let name_s = name.to_string();
        // The row first (the commit point): a failure after it leaves at
        // worst an unreferenced object, never a row without its weights.
        let removed = self
            .pg
            .with_pg(|c| {
                let name = name_s.clone();
                Box::pin(async move {
                    c.query_opt(
                        "DELETE FROM models WHERE name = $1 RETURNING sha256, object_key",
                        &[&name],
                    )
                    .await
                })
            })
            .map_err(unavailable)?;
        if let Some(row) = removed {
            let (sha, key): (String, String) = (row.get(0), row.get(1));
            self.release_object(&sha, &key);
        }
        Ok(())
    }

    fn catalogue(&self) -> model_store::Result<BTreeMap<String, Entry>> {
        let rows = self
            .pg
            .with_pg(|c| {
                Box::pin(async move {
                    c.query(
                        "SELECT name, version, bytes, manifest, num_classes FROM models",
                        &[],
                    )
                    .await
                })
            })
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, String>(0),
                    Entry {
                        version: r.get(1),
                        bytes: r.get::<_, i64>(2).max(0) as u64,
                        manifest: r.get(3),
                        num_classes: r.get::<_, i32>(4).max(0) as usize,
                    },
                )
            })
            .collect())
    }

    fn fetch(&self, name: &str, version: &str) -> model_store::Result<(Vec<u8>, Vec<u8>)> {
        let (n, v) = (name.to_string(), version.to_string());
        let row = self
            .pg
            .with_pg(|c| {
                let (n, v) = (n.clone(), v.clone());
                Box::pin(async move {
                    c.query_opt(
                        "SELECT manifest, object_key FROM models WHERE name = $1 AND version = $2",
                        &[&n, &v],
                    )
                    .await
                })
            })
            .map_err(unavailable)?
            .ok_or_else(|| unavailable(format!("{name} changed while being fetched")))?;
        let (manifest, key): (String, String) = (row.get(0), row.get(1));
        let weights = self.get(ObjectPath::from(key))?;
        if self.version(manifest.as_bytes(), &weights) != version {
            return Err(unavailable(format!(
                "{name}: the stored weights do not match the catalogue's version"
            )));
        }
        Ok((manifest.into_bytes(), weights))
    }

    fn version(&self, manifest_json: &[u8], weights: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(manifest_json);
        h.update(weights);
        hex(&h.finalize())
    }
}

/// Why a commit was not made.
enum Refusal {
    Held(String),
    Taken,
    NotHolder(Option<String>),
    Storage(String),
}
