//! `convscope train job.json`: the job `POST /jobs` would run, in the
//! foreground, with a progress bar and the epoch log on stderr.

use std::io::Write;
use std::path::{Path, PathBuf};

use model_store::train::{self, Control, EpochRecord, Event, Outcome, Progress};
use model_store::{ModelStore, parse_device};

/// Why `convscope train` stopped; the text is what the user reads.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TrainError {
    /// The job file cannot be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The job file is not JSON.
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The job body, checked whole.
    #[error("the job has problems:\n  {}", .0.join("\n  "))]
    Problems(Vec<String>),
    /// The device, the models directory, the name, training or writing.
    #[error(transparent)]
    Model(#[from] model_store::Error),
    /// An epoch snapshot could not be registered.
    #[error("could not write an epoch snapshot: {0}")]
    Snapshot(model_store::Error),
    /// Training stopped before its last epoch.
    #[error("stopped")]
    Stopped,
}

/// Plans and runs the job in `job_path`, writing the model (and its epoch
/// snapshots) into `models`.
pub(crate) fn train(
    job_path: &Path,
    models: &Path,
    datasets: &Path,
    device: &str,
) -> Result<(), TrainError> {
    let path = job_path.to_path_buf();
    let text = std::fs::read_to_string(job_path).map_err(|source| TrainError::Read {
        path: path.clone(),
        source,
    })?;
    let body: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| TrainError::Json { path, source })?;
    let spec = train::parse(&body).map_err(TrainError::Problems)?;
    let device = parse_device(device)?;
    // The same store the server uses, held alone (a running server's held
    // names are not visible from here): the name is held for this run, and
    // the model and its snapshots are written through it (loaded back
    // first, so what is written is a model the server will serve).
    let store = ModelStore::open_exclusive(models, &device)?;
    let env = train::Env {
        models: &store,
        datasets_dir: datasets,
        device: &device,
    };
    let plan = train::plan(&spec, &env).map_err(TrainError::Problems)?;
    let owner = format!("cli-{}", std::process::id());
    store.reserve(&spec.model_name, &owner)?;
    let save = |manifest: &model_store::Manifest, weights: &[u8]| {
        store.replace(&owner, manifest, weights).map(|_| ())
    };
    let manifest = plan.manifest.clone();
    let work = models
        .join(".jobs")
        .join(format!("cli-{}", spec.model_name));
    eprintln!(
        "training {} on {} ({} epochs, batch {}, {} {}), {} parameters",
        spec.model_name,
        spec.dataset,
        spec.epochs,
        spec.batch_size,
        spec.optimizer.kind,
        spec.optimizer.lr,
        plan.network.total_params()
    );
    let mut snapshot_error = None;
    let mut on_event = |event: Event| -> Control {
        match event {
            Event::Step(p) => print_step(p),
            Event::Epoch(p, history) => {
                print_epoch(p, history);
                if spec.epoch_snapshots {
                    let mut m = manifest.clone();
                    m.name = format!("{}@epoch-{}", spec.model_name, p.epoch);
                    let path = train::last_snapshot(&work);
                    let result = std::fs::read(&path)
                        .map_err(|source| model_store::Error::Io { path, source })
                        .and_then(|w| save(&m, &w));
                    if let Err(e) = result {
                        snapshot_error = Some(e);
                        return Control::Stop;
                    }
                }
            }
        }
        Control::Continue
    };
    let outcome = train::run(&spec, plan, &env, &work, &mut on_event, &|| false)?;
    if let Some(e) = snapshot_error {
        return Err(TrainError::Snapshot(e));
    }
    match outcome {
        Outcome::Finished {
            weights, manifest, ..
        } => {
            let bytes = train::safetensors_bytes(&weights)?;
            save(&manifest, &bytes)?;
            let _ = std::fs::remove_dir_all(&work);
            eprintln!(
                "wrote {}/{}.json and .safetensors",
                models.display(),
                spec.model_name
            );
            Ok(())
        }
        Outcome::Cancelled => Err(TrainError::Stopped),
    }
}

/// The progress bar of the epoch so far.
fn print_step(p: &Progress) {
    let width = 30;
    let filled = (p.step * width / p.steps.max(1)).min(width);
    eprint!(
        "\repoch {}/{} [{}{}] {}/{} loss {:.4}   ",
        p.epoch,
        p.epochs,
        "=".repeat(filled),
        " ".repeat(width - filled),
        p.step,
        p.steps,
        p.loss
    );
    let _ = std::io::stderr().flush();
}

/// The epoch's line of the log, as PyTorch tutorials print it.
fn print_epoch(p: &Progress, history: &[EpochRecord]) {
    if let Some(r) = history.last() {
        eprintln!(
            "\rEpoch {}/{}: loss {:.4}, train accuracy {:.2}%, test accuracy {:.2}%, {:.1} s{}",
            r.epoch,
            p.epochs,
            r.loss,
            r.train_accuracy * 100.0,
            r.test_accuracy * 100.0,
            r.seconds,
            " ".repeat(20)
        );
    }
}
