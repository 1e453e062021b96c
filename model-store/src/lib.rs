//! Trained CNNs from safetensors checkpoints, run in candle, observed layer by layer.
//!
//! A code tour:
//! - [`manifest`]: the JSON manifest beside each checkpoint, typed and validated.
//! - [`checkpoint`]: safetensors with PyTorch `state_dict` names; every
//!   missing, extra or mis-shaped tensor reported at once.
//! - [`arch`]: the zoo (`sequential`, `graph`, CIFAR ResNets, torchvision
//!   ResNet/VGG/AlexNet, MobileNet v1), each described as a module tree and
//!   lowered to the one graph IR.
//! - [`layers`]: the leaf operations with their geometry.
//! - [`kernels`]: CPU custom ops (convolution, pooling, elementwise) with
//!   their own backward, at the instruction-set tier `kernels::tier` picks.
//! - [`graph`]: [`Network`]: the module tree the built-ins are written as,
//!   lowered to the graph IR, and the summary.
//! - [`dag`]: the graph IR (a DAG of named nodes, what `graph` manifests
//!   hold) and its one interpreter: inference with fused kernels, every
//!   tap, and training ([`train::net`]).
//! - [`check`]: a manifest's `check` entry (an input and PyTorch's logits),
//!   recomputed on registration.
//! - [`tap`]: observers of that forward pass: every inspection is a tap.
//! - [`inspect`]: activations and statistics, filters, embeddings and distances.
//! - [`preprocess`]: image bytes → input tensor, as torchvision would.
//! - [`pth`]: PyTorch zip checkpoints (`.pth`) read without running code,
//!   kept as safetensors.
//! - [`rng`]: the seeded generator every random draw comes from.
//! - [`model`]: a loaded model: manifest, network, labels.
//! - [`model_dir`]: the models directory, changed through a commit journal.
//! - [`store`]: the one owner of loaded models, their files and the names
//!   jobs hold.
//! - [`train`]: training jobs: datasets, optimisers, the training loop, evaluation.
//!
//! No HTTP here: the server crate turns these into endpoints.

#![warn(missing_docs)]

pub mod arch;
pub mod check;
pub mod checkpoint;
pub mod dag;
pub mod error;
pub mod graph;
pub mod inspect;
pub mod kernels;
pub mod layers;
pub mod manifest;
pub mod model;
pub mod model_dir;
pub mod preprocess;
pub mod pth;
pub mod remote;
pub mod rng;
pub mod store;
pub mod tap;
pub mod train;

pub use error::{Error, Result};
pub use graph::{LayerInfo, Network, NodeKind};
pub use manifest::Manifest;
pub use model::{LoadFailure, LoadedModel, parse_device};
pub use model_dir::ModelDir;
pub use store::{ModelStore, Owner, Summary};
pub use tap::{NoTap, Record, Tap};
