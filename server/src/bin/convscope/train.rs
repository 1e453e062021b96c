//! `convscope train job.json`: the job `POST /jobs` would run, in the
//! foreground, with a progress bar and the epoch log on stderr.

use std::io::Write;
use std::path::Path;

use model_store::train::{self, Control, Event, Outcome};
use model_store::{ModelStore, parse_device};

/// Errors of the CLI: their text is what the user reads.
pub(crate) type CliResult = Result<(), String>;

/// Plans and runs the job in `job_path`, writing the model (and its epoch
/// snapshots) into `models`.
pub(crate) fn train(job_path: &Path, models: &Path, datasets: &Path, device: &str) -> CliResult {
    let text =
        std::fs::read_to_string(job_path).map_err(|e| format!("{}: {e}", job_path.display()))?;
    let body: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", job_path.display()))?;
    let spec = train::parse(&body).map_err(|p| p.join("\n  "))?;
    let device = parse_device(device).map_err(|e| e.to_string())?;
    // The same store the server uses: the name is held for this run, and
    // the model and its snapshots are written through it (loaded back
    // first, so what is written is a model the server will serve).
    let store = ModelStore::open(models, &device).map_err(|e| e.to_string())?;
    let owner = format!("cli-{}", std::process::id());
    store
        .reserve(&spec.model_name, &owner)
        .map_err(|e| e.to_string())?;
    let save = |manifest: &model_store::Manifest, weights: &[u8]| -> CliResult {
        store
            .replace(&owner, manifest, weights)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let env = train::Env {
        models: &store,
        datasets_dir: datasets,
        device: &device,
    };
    let plan = train::plan(&spec, &env)
        .map_err(|p| format!("the job has problems:\n  {}", p.join("\n  ")))?;
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
            Event::Step(p) => {
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
            Event::Epoch(p, history) => {
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
                if spec.epoch_snapshots {
                    let mut m = manifest.clone();
                    m.name = format!("{}@epoch-{}", spec.model_name, p.epoch);
                    let result = std::fs::read(train::last_snapshot(&work))
                        .map_err(|e| e.to_string())
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
    let outcome = train::run(&spec, plan, &env, &work, &mut on_event, &|| false)
        .map_err(|e| e.to_string())?;
    if let Some(e) = snapshot_error {
        return Err(format!("could not write an epoch snapshot: {e}"));
    }
    match outcome {
        Outcome::Finished {
            weights, manifest, ..
        } => {
            let bytes = train::safetensors_bytes(&weights).map_err(|e| e.to_string())?;
            save(&manifest, &bytes)?;
            let _ = std::fs::remove_dir_all(&work);
            eprintln!(
                "wrote {}/{}.json and .safetensors",
                models.display(),
                spec.model_name
            );
            Ok(())
        }
        Outcome::Cancelled => Err("stopped".into()),
    }
}
