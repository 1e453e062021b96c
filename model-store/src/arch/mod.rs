//! The model zoo: one builder per family, each producing a
//! [`crate::graph::Node`] tree with PyTorch module paths as names (lowered
//! to the graph IR by [`crate::Network::new`]), and `graph` manifests,
//! which are that IR already.

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
    "graph",
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

/// An architecture a manifest may name, parsed once from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// A layer list given in the manifest.
    Sequential,
    /// A DAG of nodes given in the manifest ([`crate::dag`]).
    Graph,
    /// He et al.'s CIFAR ResNets: `blocks` per stage (3 for ResNet-20).
    ResNetCifar {
        /// Residual blocks in each of the three stages.
        blocks: usize,
    },
    /// torchvision's ResNets.
    TorchvisionResNet {
        /// Bottleneck blocks (ResNet-50 and deeper) instead of basic ones.
        bottleneck: bool,
        /// Blocks in each of the four stages.
        blocks: [usize; 4],
    },
    /// torchvision's VGGs.
    Vgg {
        /// 11, 13, 16 or 19.
        depth: usize,
        /// The `_bn` variants.
        batch_norm: bool,
    },
    /// torchvision's AlexNet.
    AlexNet,
    /// MobileNet v1 with TensorFlow's SAME padding.
    MobileNetV1,
}

impl Architecture {
    /// The architecture a manifest's `architecture` names.
    pub fn parse(name: &str) -> Result<Self> {
        let resnet = |bottleneck, blocks| Architecture::TorchvisionResNet { bottleneck, blocks };
        Ok(match name {
            "sequential" => Architecture::Sequential,
            "graph" => Architecture::Graph,
            "resnet20-cifar" => Architecture::ResNetCifar { blocks: 3 },
            "resnet32-cifar" => Architecture::ResNetCifar { blocks: 5 },
            "resnet44-cifar" => Architecture::ResNetCifar { blocks: 7 },
            "resnet56-cifar" => Architecture::ResNetCifar { blocks: 9 },
            "resnet110-cifar" => Architecture::ResNetCifar { blocks: 18 },
            "torchvision.resnet18" => resnet(false, [2, 2, 2, 2]),
            "torchvision.resnet34" => resnet(false, [3, 4, 6, 3]),
            "torchvision.resnet50" => resnet(true, [3, 4, 6, 3]),
            "torchvision.resnet101" => resnet(true, [3, 4, 23, 3]),
            "torchvision.resnet152" => resnet(true, [3, 8, 36, 3]),
            "torchvision.alexnet" => Architecture::AlexNet,
            "mobilenet_v1" => Architecture::MobileNetV1,
            _ => {
                let vgg = name.strip_prefix("torchvision.vgg").and_then(|rest| {
                    let (depth, batch_norm) = match rest.strip_suffix("_bn") {
                        Some(d) => (d, true),
                        None => (rest, false),
                    };
                    match depth {
                        "11" | "13" | "16" | "19" => Some(Architecture::Vgg {
                            depth: depth.parse().ok()?,
                            batch_norm,
                        }),
                        _ => None,
                    }
                });
                return vgg.ok_or_else(|| unknown(name));
            }
        })
    }
}

/// Builds the module tree the manifest describes, taking weights from `ck`.
pub fn build(manifest: &Manifest, ck: &mut Checkpoint) -> Result<Node> {
    let classes = manifest.classes.as_ref().map(Vec::len);
    match Architecture::parse(&manifest.architecture)? {
        Architecture::Sequential => {
            let raw = manifest.layers.as_deref().ok_or_else(|| {
                Error::Manifest("architecture 'sequential' needs a `layers` list".into())
            })?;
            sequential::build(raw, ck)
        }
        Architecture::Graph => {
            let raw = manifest.nodes.as_deref().ok_or_else(|| {
                Error::Manifest("architecture 'graph' needs a `nodes` list".into())
            })?;
            for name in &manifest.unused_weights {
                ck.discard(name);
            }
            let s = &manifest.input;
            let dag = crate::dag::Dag::build(
                raw,
                manifest.output.as_deref(),
                ck,
                (s.channels, s.height, s.width),
            )?;
            Ok(Node::anon(crate::graph::Op::Graph(Box::new(dag))))
        }
        Architecture::ResNetCifar { blocks } => resnet_cifar::build(ck, blocks, classes),
        Architecture::TorchvisionResNet { bottleneck, blocks } => {
            torchvision::resnet(ck, bottleneck, blocks, classes)
        }
        Architecture::Vgg { depth, batch_norm } => torchvision::vgg(ck, depth, batch_norm, classes),
        Architecture::AlexNet => torchvision::alexnet(ck, classes),
        Architecture::MobileNetV1 => mobilenet::build(ck, classes),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_architecture_parses_and_others_are_refused_with_the_list() {
        for name in ARCHITECTURES {
            assert!(Architecture::parse(name).is_ok(), "{name}");
        }
        assert_eq!(
            Architecture::parse("torchvision.vgg16_bn").unwrap(),
            Architecture::Vgg {
                depth: 16,
                batch_norm: true
            }
        );
        let e = Architecture::parse("torchvision.vgg12")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown architecture 'torchvision.vgg12'") && e.contains("mobilenet_v1"),
            "{e}"
        );
    }
}
