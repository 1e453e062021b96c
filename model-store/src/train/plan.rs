//! A job checked against the models and datasets it names: every problem
//! listed at once, or the manifest and the initial network it will train.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use serde_json::{Value, json};

use super::data::{self, DatasetFormat, DatasetInfo};
use super::net;
use super::spec::{JobSpec, cnn_a_layers};
use crate::checkpoint::Checkpoint;
use crate::graph::{Network, NodeKind};
use crate::manifest::{InputSpec, Manifest};
use crate::model::LoadedModel;
use crate::store::ModelStore;

/// Where a job reads datasets and source models.
pub struct Env<'a> {
    /// The model store (for `init_from`: the model and its weights file).
    pub models: &'a ModelStore,
    /// The datasets directory.
    pub datasets_dir: &'a Path,
    /// Where training runs.
    pub device: &'a Device,
}

/// A validated job: the manifest it will produce and where its weights start.
pub struct Plan {
    /// The new model's manifest.
    pub manifest: Manifest,
    /// The network, initialised (fresh or from `init_from`).
    pub network: Network,
    /// Tensors initialised rather than read from `init_from` (a new head).
    pub initialised: Vec<String>,
    /// The dataset as listed.
    pub dataset: DatasetInfo,
}

fn dataset_defaults(info: &DatasetInfo) -> Option<InputSpec> {
    let (channels, h, w, mean, std) = match info.format {
        DatasetFormat::Mnist => (1, 28, 28, vec![0.1307], vec![0.3081]),
        DatasetFormat::Cifar10 => (
            3,
            32,
            32,
            vec![0.4914, 0.4822, 0.4465],
            vec![0.2470, 0.2435, 0.2616],
        ),
        DatasetFormat::ImageFolder => return None,
    };
    Some(InputSpec {
        channels,
        height: h,
        width: w,
        mean: Some(mean),
        std: Some(std),
        resize: None,
        center_crop: None,
    })
}

/// Checks a job against the models and datasets it names, listing every
/// problem; on success, the manifest and initial network it will train.
pub fn plan(spec: &JobSpec, env: &Env) -> std::result::Result<Plan, Vec<String>> {
    let mut p = spec.problems();
    let dataset = find_dataset(spec, env, &mut p);
    let source = find_source(spec, env, &mut p);
    architecture_problems(spec, &mut p);
    let Some(dataset) = dataset else {
        return Err(p);
    };
    let Some(manifest) = manifest_for(spec, source.as_deref(), &dataset, &mut p) else {
        return Err(p);
    };
    let from = spec.init_from.as_deref().filter(|_| source.is_some());
    let Some((network, initialised)) = build_network(spec, from, env, &manifest, &mut p) else {
        return Err(p);
    };
    if network.outputs() != dataset.classes.len() {
        p.push(format!(
            "the network outputs {} values but dataset '{}' has {} classes",
            network.outputs(),
            dataset.name,
            dataset.classes.len()
        ));
    }
    if spec.init_from.is_some() {
        head_problems(spec, &network, &initialised, &mut p);
    }
    freeze_problems(spec, &network, &mut p);
    if !p.is_empty() {
        return Err(p);
    }
    Ok(Plan {
        manifest,
        network,
        initialised,
        dataset,
    })
}

/// The architecture names a job body may give besides `cnn_a`.
fn zoo() -> Vec<&'static str> {
    crate::arch::ARCHITECTURES
        .iter()
        .filter(|a| **a != "sequential")
        .copied()
        .collect()
}

fn find_dataset(spec: &JobSpec, env: &Env, p: &mut Vec<String>) -> Option<DatasetInfo> {
    let datasets = data::list(env.datasets_dir);
    let dataset = datasets.iter().find(|d| d.name == spec.dataset).cloned();
    if dataset.is_none() {
        p.push(format!(
            "dataset: no dataset '{}'; available: {}",
            spec.dataset,
            datasets
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    dataset
}

/// The `init_from` model, if the job names one that exists.
fn find_source(spec: &JobSpec, env: &Env, p: &mut Vec<String>) -> Option<Arc<LoadedModel>> {
    let name = spec.init_from.as_ref()?;
    let source = env.models.get(name);
    if source.is_none() {
        p.push(format!(
            "init_from: no model '{name}'; models: {}",
            env.models.names().join(", ")
        ));
    }
    source
}

/// The architecture's form, whether or not the dataset exists.
fn architecture_problems(spec: &JobSpec, p: &mut Vec<String>) {
    if spec.init_from.is_some() && spec.architecture.is_some() {
        p.push(
            "give architecture or init_from, not both (init_from brings its architecture)".into(),
        );
    }
    if spec.init_from.is_none() && spec.architecture.is_none() {
        p.push("architecture is needed (\"cnn_a\", a zoo name such as \"resnet20-cifar\", or {\"layers\": [...]}) unless init_from names a model".into());
    }
    let zoo = zoo();
    match &spec.architecture {
        Some(Value::String(s)) if s != "cnn_a" && !zoo.contains(&s.as_str()) => p.push(format!(
            "architecture: unknown '{s}'; use \"cnn_a\", {{\"layers\": [...]}} or one of {}",
            zoo.join(", ")
        )),
        Some(Value::Object(o)) if !o.contains_key("layers") => {
            p.push("architecture: an object must have `layers`".into())
        }
        Some(v @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::Array(_))) => p.push(
            format!("architecture must be a name or {{\"layers\": [...]}}, got {v}"),
        ),
        _ => {}
    }
}

/// The manifest the job's model will have: the source's, renamed and
/// relabelled, or a new one for the architecture and the dataset's images.
fn manifest_for(
    spec: &JobSpec,
    source: Option<&LoadedModel>,
    dataset: &DatasetInfo,
    p: &mut Vec<String>,
) -> Option<Manifest> {
    let classes = &dataset.classes;
    let manifest_json = if let Some(src) = source {
        let mut m = serde_json::to_value(&src.manifest).expect("manifests serialise");
        m["name"] = json!(spec.model_name);
        m["classes"] = json!(classes);
        // The check is PyTorch's logits for the source's weights; training
        // changes them.
        for k in ["test_accuracy", "training", "description", "check"] {
            if let Some(o) = m.as_object_mut() {
                o.remove(k);
            }
        }
        if let Some(nodes) = m.get_mut("nodes").and_then(Value::as_array_mut) {
            // A graph model's head: the last linear node gets the dataset's
            // class count (its weights are then initialised afresh).
            if let Some(head) = nodes.iter_mut().rev().find(|n| n["op"] == "linear") {
                head["out_features"] = json!(classes.len());
            }
        }
        m
    } else {
        // CNN_A takes MNIST digits whatever the dataset; other new
        // models take the dataset's images.
        let is_cnn_a = spec.architecture == Some(Value::String("cnn_a".into()));
        let input = spec.input.clone().or_else(|| {
            if is_cnn_a {
                dataset_defaults(&DatasetInfo {
                    format: DatasetFormat::Mnist,
                    ..dataset.clone()
                })
            } else {
                dataset_defaults(dataset)
            }
        });
        let Some(input) = input else {
            p.push(format!(
                "input is needed: dataset '{}' is an ImageFolder, so give input {{channels, height, width, mean, std}}",
                dataset.name
            ));
            return None;
        };
        match &spec.architecture {
            Some(Value::String(s)) if s == "cnn_a" => json!({
                "name": spec.model_name, "architecture": "sequential",
                "layers": cnn_a_layers(), "input": input, "classes": classes,
            }),
            Some(Value::String(s)) if zoo().contains(&s.as_str()) => {
                json!({"name": spec.model_name, "architecture": s, "input": input, "classes": classes})
            }
            Some(Value::Object(o)) if o.contains_key("layers") => json!({
                "name": spec.model_name, "architecture": "sequential",
                "layers": o["layers"], "input": input, "classes": classes,
            }),
            // Reported by `architecture_problems`.
            _ => return None,
        }
    };
    let manifest = match Manifest::from_json(manifest_json.to_string().as_bytes()) {
        Ok(m) => m,
        Err(e) => {
            p.push(format!("architecture: {e}"));
            return None;
        }
    };
    if let Some(shape) = dataset.shape {
        let i = &manifest.input;
        if (shape[1], shape[2]) != (i.height, i.width) {
            p.push(format!(
                "dataset '{}' has {}x{} images but the model takes {}x{}",
                dataset.name, shape[1], shape[2], i.height, i.width
            ));
        }
    }
    Some(manifest)
}

/// Builds the network the job will train (so that the layers chain), and
/// lists the tensors initialised rather than read from `init_from`.
fn build_network(
    spec: &JobSpec,
    from: Option<&str>,
    env: &Env,
    manifest: &Manifest,
    p: &mut Vec<String>,
) -> Option<(Network, Vec<String>)> {
    let mut ck = match from {
        Some(name) => {
            let path = env.models.path().join(format!("{name}.safetensors"));
            match Checkpoint::from_file(&path, env.device) {
                Ok(ck) => ck.initialising_missing(spec.seed),
                Err(e) => {
                    p.push(format!("init_from: cannot read its weights: {e}"));
                    return None;
                }
            }
        }
        None => Checkpoint::fresh(env.device, spec.seed),
    };
    let built = crate::arch::build(manifest, &mut ck).and_then(|root| {
        let s = &manifest.input;
        Network::new(root, (s.channels, s.height, s.width))
    });
    match built {
        Ok(n) => Some((n, ck.initialised().to_vec())),
        Err(e) => {
            p.push(format!("architecture: {e}"));
            None
        }
    }
}

/// Fine-tuning: only the head may be new, and a new head cannot be frozen.
fn head_problems(spec: &JobSpec, network: &Network, initialised: &[String], p: &mut Vec<String>) {
    let head = network
        .layers()
        .iter()
        .rev()
        .find(|l| l.kind == NodeKind::Linear)
        .map(|l| l.name.clone())
        .unwrap_or_default();
    let strays: Vec<&String> = initialised
        .iter()
        .filter(|n| !n.starts_with(&format!("{head}.")))
        .collect();
    if !strays.is_empty() {
        p.push(format!(
            "init_from: its checkpoint lacks {strays:?}, which only a new head may lack"
        ));
    }
    if spec
        .freeze
        .iter()
        .any(|f| net::is_frozen(&format!("{head}.weight"), std::slice::from_ref(f)))
        && !initialised.is_empty()
    {
        p.push(format!(
            "freeze: the head '{head}' is new (the classes changed), so it cannot be frozen"
        ));
    }
}

/// `freeze` must name real layers.
fn freeze_problems(spec: &JobSpec, network: &Network, p: &mut Vec<String>) {
    for f in &spec.freeze {
        if network.layer(f).is_none() {
            p.push(format!(
                "freeze: no layer '{f}'; layers: {}",
                network
                    .layers()
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn planned(body: Value, models: &ModelStore) -> std::result::Result<Plan, Vec<String>> {
        let spec = super::super::parse(&body).unwrap();
        let datasets = repo().join("data");
        let env = Env {
            models,
            datasets_dir: &datasets,
            device: &Device::Cpu,
        };
        plan(&spec, &env)
    }

    #[test]
    fn a_cnn_a_job_on_mnist_plans_the_course_network() {
        let tmp = tempfile::tempdir().unwrap();
        let models = ModelStore::open(tmp.path(), &Device::Cpu).unwrap();
        let p = planned(
            json!({"model_name": "m", "architecture": "cnn_a", "dataset": "mnist"}),
            &models,
        )
        .unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(p.manifest.name, "m");
        assert_eq!(p.manifest.input.channels, 1);
        assert_eq!(p.network.outputs(), 10);
        assert_eq!(p.dataset.format, DatasetFormat::Mnist);
        assert!(
            p.initialised.iter().any(|n| n == "conv1.weight"),
            "a fresh network initialises every tensor: {:?}",
            p.initialised
        );
    }

    #[test]
    fn fine_tuning_on_other_classes_gets_a_new_head_that_cannot_be_frozen() {
        let models = ModelStore::open(&repo().join("models"), &Device::Cpu).unwrap();
        let body = json!({"model_name": "ft", "init_from": "resnet20-cifar10",
                          "dataset": "cifar10-sample", "freeze": ["conv1", "layer1"]});
        let p = planned(body, &models).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(p.manifest.name, "ft");
        assert!(
            p.initialised.is_empty(),
            "same classes: every tensor comes from init_from"
        );
        let mut bad = json!({"model_name": "ft2", "init_from": "resnet20-cifar10",
                             "dataset": "mnist", "freeze": ["linear", "nope"], "epochs": 0});
        bad["batch_size"] = json!(0);
        let problems = planned(bad, &models).err().unwrap().join("\n");
        for want in [
            "epochs must be",
            "batch_size must be",
            "freeze: no layer 'nope'",
            "28x28",
        ] {
            assert!(problems.contains(want), "{want:?} not in {problems}");
        }
    }
}
