//! The model zoo: one builder per family, each producing the same
//! [`crate::graph::Node`] tree with PyTorch module paths as names.

mod mobilenet;
mod resnet_cifar;
mod sequential;
mod torchvision;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::manifest::Manifest;

/// Every architecture name a manifest may give.
pub const ARCHITECTURES: &[&str] = &[
    "sequential",
    "resnet20-cifar",
    "resnet32-cifar",
    "resnet44-cifar",
    "resnet56-cifar",
    "resnet110-cifar",
    "torchvision.resnet18",
    "torchvision.resnet34",
    "torchvision.resnet50",
    "torchvision.resnet101",
    "torchvision.resnet152",
    "torchvision.vgg11",
    "torchvision.vgg13",
    "torchvision.vgg16",
    "torchvision.vgg19",
    "torchvision.vgg11_bn",
    "torchvision.vgg13_bn",
    "torchvision.vgg16_bn",
    "torchvision.vgg19_bn",
    "torchvision.alexnet",
    "mobilenet_v1",
];

/// Builds the module tree the manifest describes, taking weights from `ck`.
pub fn build(manifest: &Manifest, ck: &mut Checkpoint) -> Result<Node> {
    let arch = manifest.architecture.as_str();
    let classes = manifest.classes.as_ref().map(Vec::len);
    match arch {
        "sequential" => {
            let raw = manifest.layers.as_deref().ok_or_else(|| {
                Error::Manifest("architecture 'sequential' needs a `layers` list".into())
            })?;
            sequential::build(raw, ck)
        }
        "resnet20-cifar" => resnet_cifar::build(ck, 3, classes),
        "resnet32-cifar" => resnet_cifar::build(ck, 5, classes),
        "resnet44-cifar" => resnet_cifar::build(ck, 7, classes),
        "resnet56-cifar" => resnet_cifar::build(ck, 9, classes),
        "resnet110-cifar" => resnet_cifar::build(ck, 18, classes),
        "torchvision.resnet18" => torchvision::resnet(ck, false, [2, 2, 2, 2], classes),
        "torchvision.resnet34" => torchvision::resnet(ck, false, [3, 4, 6, 3], classes),
        "torchvision.resnet50" => torchvision::resnet(ck, true, [3, 4, 6, 3], classes),
        "torchvision.resnet101" => torchvision::resnet(ck, true, [3, 4, 23, 3], classes),
        "torchvision.resnet152" => torchvision::resnet(ck, true, [3, 8, 36, 3], classes),
        "torchvision.alexnet" => torchvision::alexnet(ck, classes),
        "mobilenet_v1" => mobilenet::build(ck, classes),
        _ => match arch.strip_prefix("torchvision.vgg") {
            Some(rest) => {
                let (depth, bn) = match rest.strip_suffix("_bn") {
                    Some(d) => (d, true),
                    None => (rest, false),
                };
                match depth {
                    "11" | "13" | "16" | "19" => {
                        torchvision::vgg(ck, depth.parse().unwrap_or(11), bn, classes)
                    }
                    _ => Err(unknown(arch)),
                }
            }
            None => Err(unknown(arch)),
        },
    }
}

fn unknown(arch: &str) -> Error {
    Error::UnknownArchitecture {
        name: arch.to_string(),
        known: ARCHITECTURES.iter().map(|s| s.to_string()).collect(),
    }
}

/// The number of outputs of the head: the manifest's class list if it has
/// one, else the head weight's first dimension, else `fallback`.
fn head_size(ck: &Checkpoint, classes: Option<usize>, head_weight: &str, fallback: usize) -> usize {
    classes
        .or_else(|| ck.shape_of(head_weight).and_then(|s| s.first().copied()))
        .unwrap_or(fallback)
}
