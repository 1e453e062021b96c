//! A network: the built-in architectures describe themselves as a tree of
//! named modules ([`Node`], the way their PyTorch code is written), which is
//! lowered to the one graph IR ([`crate::dag`]) that `graph` manifests are
//! written in; one interpreter then runs every model for inference, for
//! every tap and for training. Node names are PyTorch module paths, which
//! are also the checkpoint key prefixes and the API's layer names.

use candle_core::Tensor;

use crate::dag::ops::Unary;
use crate::dag::{Alias, Dag, DagNode, GraphOp, INPUT};
use crate::error::{Error, Result};
use crate::layers::{AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Linear, Pool2d};
use crate::tap::Tap;

/// What a node computes.
#[derive(Debug, Clone)]
pub enum Op {
    /// Convolution.
    Conv(Conv2d),
    /// Batch normalisation (eval).
    BatchNorm(BatchNorm2d),
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// Max or average pooling.
    Pool(Pool2d),
    /// Adaptive average pooling.
    AdaptiveAvgPool(AdaptiveAvgPool2d),
    /// Dropout: the identity at inference; in training, zeroes elements
    /// (or whole channels, for `Dropout2d`) with probability `p`.
    Dropout {
        /// Probability of zeroing.
        p: f32,
        /// `Dropout2d`: one draw per channel.
        channelwise: bool,
    },
    /// Flattens everything after the batch dimension.
    Flatten,
    /// Fully connected layer.
    Linear(Linear),
    /// Softmax over classes.
    Softmax,
    /// Children applied in order (`nn.Sequential`, or a whole network).
    Seq(Vec<Node>),
    /// `relu(body(x) + shortcut(x))`, the residual block of every ResNet.
    Residual {
        /// The main path.
        body: Vec<Node>,
        /// The shortcut; `None` is the identity.
        shortcut: Option<Box<Node>>,
    },
    /// ResNet-CIFAR "option A": `x[:, :, ::2, ::2]` then `pad` zero
    /// channels on each side. No parameters.
    ShortcutA {
        /// Zero channels added before and after.
        pad: usize,
    },
    /// A whole network given as a DAG of named nodes (`graph` manifests).
    Graph(Box<crate::dag::Dag>),
}

/// A module, named when PyTorch would let a hook see it.
#[derive(Debug, Clone)]
pub struct Node {
    /// Module path (`layer1.0.conv1`); `None` for functional steps nobody can hook.
    pub name: Option<String>,
    /// The computation.
    pub op: Op,
}

impl Node {
    /// A named node.
    pub fn named(name: impl Into<String>, op: Op) -> Self {
        Self {
            name: Some(name.into()),
            op,
        }
    }

    /// An anonymous node (a functional call inside a block).
    pub fn anon(op: Op) -> Self {
        Self { name: None, op }
    }
}

/// Lowers a module tree to the graph IR: every leaf becomes a node (named
/// leaves visible, anonymous ones hidden), a named `Seq` an alias of its
/// last node (kind `sequential`), a residual block an add and a ReLU whose
/// output carries the block's name (kind `residual_block`). Node order is
/// the order PyTorch's hooks fire in, so the summary rows and the tap's
/// calls are the module tree's.
fn lower(root: Node) -> Result<Vec<DagNode>> {
    struct Lowering {
        nodes: Vec<DagNode>,
        hidden: usize,
    }
    impl Lowering {
        fn push(&mut self, name: Option<String>, op: GraphOp, inputs: Vec<usize>) -> usize {
            let hidden = name.is_none();
            let name = name.unwrap_or_else(|| {
                self.hidden += 1;
                format!("#{}", self.hidden)
            });
            let module = matches!(
                op,
                GraphOp::Conv(_) | GraphOp::BatchNorm(_) | GraphOp::Linear { .. }
            )
            .then(|| name.clone());
            self.nodes.push(DagNode {
                name,
                aliases: Vec::new(),
                hidden,
                module,
                op,
                inputs,
            });
            self.nodes.len() - 1
        }

        fn alias(&mut self, at: usize, name: String, kind: NodeKind) {
            self.nodes[at].aliases.push(Alias { name, kind });
        }

        /// Lowers `node` reading `x`; returns the node holding its output.
        fn node(&mut self, node: Node, x: usize) -> Result<usize> {
            let Node { name, op } = node;
            let leaf = |op| Ok::<_, Error>(Some(op));
            let graph_op = match op {
                Op::Conv(c) => leaf(GraphOp::Conv(c))?,
                Op::BatchNorm(b) => leaf(GraphOp::BatchNorm(b))?,
                Op::Relu => leaf(GraphOp::Unary(Unary::Relu))?,
                Op::Relu6 => leaf(GraphOp::Unary(Unary::Relu6))?,
                Op::Pool(p) => leaf(GraphOp::Pool(p))?,
                Op::AdaptiveAvgPool(p) => leaf(GraphOp::AdaptiveAvgPool(p))?,
                Op::Dropout { p, channelwise } => leaf(GraphOp::Identity {
                    kind: if channelwise {
                        NodeKind::Dropout2d
                    } else {
                        NodeKind::Dropout
                    },
                    p,
                })?,
                Op::Flatten => leaf(GraphOp::Flatten { start: 1, end: -1 })?,
                Op::Linear(l) => leaf(GraphOp::Linear {
                    weight: l.weight,
                    bias: l.bias,
                    any_rank: false,
                })?,
                Op::Softmax => leaf(GraphOp::Softmax { dim: -1 })?,
                Op::ShortcutA { pad } => leaf(GraphOp::ShortcutA { pad })?,
                Op::Seq(children) if children.is_empty() => leaf(GraphOp::Identity {
                    kind: NodeKind::Sequential,
                    p: 0.0,
                })?,
                Op::Seq(children) => {
                    let mut h = x;
                    for c in children {
                        h = self.node(c, h)?;
                    }
                    if let Some(name) = name {
                        self.alias(h, name, NodeKind::Sequential);
                    }
                    return Ok(h);
                }
                Op::Residual { body, shortcut } => {
                    let mut h = x;
                    for c in body {
                        h = self.node(c, h)?;
                    }
                    let s = match shortcut {
                        Some(s) => self.node(*s, x)?,
                        None => x,
                    };
                    let add = self.push(
                        None,
                        GraphOp::Binary {
                            op: crate::dag::ops::BinOp::Add,
                            scalar: None,
                        },
                        vec![h, s],
                    );
                    let out = self.push(None, GraphOp::Unary(Unary::Relu), vec![add]);
                    if let Some(name) = name {
                        self.alias(out, name, NodeKind::ResidualBlock);
                    }
                    return Ok(out);
                }
                Op::Graph(_) => {
                    return Err(Error::Manifest(
                        "a graph cannot sit inside a module tree".into(),
                    ));
                }
            };
            let op = graph_op.expect("a leaf");
            Ok(self.push(name, op, vec![x]))
        }
    }
    let mut l = Lowering {
        nodes: Vec::new(),
        hidden: 0,
    };
    l.node(root, INPUT)?;
    Ok(l.nodes)
}

/// What a named layer is, by its PyTorch name (`GET /models/{model}`'s
/// `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// `nn.Conv2d`.
    Conv2d,
    /// `nn.BatchNorm2d`.
    BatchNorm2d,
    /// `nn.ReLU`.
    Relu,
    /// `nn.ReLU6`.
    Relu6,
    /// `nn.MaxPool2d`.
    MaxPool2d,
    /// `nn.AvgPool2d`.
    AvgPool2d,
    /// `nn.AdaptiveAvgPool2d`.
    AdaptiveAvgPool2d,
    /// `nn.Dropout`.
    Dropout,
    /// `nn.Dropout2d`.
    Dropout2d,
    /// `nn.Flatten`.
    Flatten,
    /// `nn.Linear`.
    Linear,
    /// `nn.Softmax`.
    Softmax,
    /// `nn.Sequential`.
    Sequential,
    /// A residual block (`BasicBlock`, `Bottleneck`).
    ResidualBlock,
    /// The CIFAR ResNets' option-A shortcut (subsample and zero-pad).
    Shortcut,
    /// A container module of a graph model (`layer1.0`, `features`): the
    /// output of the node that ends it.
    Block,
    /// `nn.LayerNorm` (and ConvNeXt's `LayerNorm2d`).
    LayerNorm,
    /// `nn.LeakyReLU`.
    LeakyRelu,
    /// `nn.Hardswish`.
    Hardswish,
    /// `nn.Hardsigmoid`.
    Hardsigmoid,
    /// `nn.SiLU`.
    Silu,
    /// `nn.Sigmoid`.
    Sigmoid,
    /// `nn.GELU`.
    Gelu,
    /// `nn.Tanh`.
    Tanh,
    /// `nn.AdaptiveMaxPool2d`.
    AdaptiveMaxPool2d,
    /// `nn.Identity`, `contiguous`, stochastic depth.
    Identity,
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
    /// `torch.cat`.
    Cat,
    /// `view` / `reshape`.
    Reshape,
    /// `permute`.
    Permute,
    /// `transpose`.
    Transpose,
    /// One piece of `chunk` / `split`.
    Narrow,
    /// `mean` over dimensions.
    Mean,
    /// `x[..., a:b:c]` along one dimension.
    Slice,
    /// `F.pad` with zeros.
    Pad,
    /// A learned tensor used as a value.
    Parameter,
}

impl NodeKind {
    /// The name the API shows.
    pub fn name(self) -> &'static str {
        match self {
            NodeKind::Conv2d => "conv2d",
            NodeKind::BatchNorm2d => "batch_norm2d",
            NodeKind::Relu => "relu",
            NodeKind::Relu6 => "relu6",
            NodeKind::MaxPool2d => "max_pool2d",
            NodeKind::AvgPool2d => "avg_pool2d",
            NodeKind::AdaptiveAvgPool2d => "adaptive_avg_pool2d",
            NodeKind::Dropout => "dropout",
            NodeKind::Dropout2d => "dropout2d",
            NodeKind::Flatten => "flatten",
            NodeKind::Linear => "linear",
            NodeKind::Softmax => "softmax",
            NodeKind::Sequential => "sequential",
            NodeKind::ResidualBlock => "residual_block",
            NodeKind::Shortcut => "shortcut",
            NodeKind::Block => "block",
            NodeKind::LayerNorm => "layer_norm",
            NodeKind::LeakyRelu => "leaky_relu",
            NodeKind::Hardswish => "hardswish",
            NodeKind::Hardsigmoid => "hardsigmoid",
            NodeKind::Silu => "silu",
            NodeKind::Sigmoid => "sigmoid",
            NodeKind::Gelu => "gelu",
            NodeKind::Tanh => "tanh",
            NodeKind::AdaptiveMaxPool2d => "adaptive_max_pool2d",
            NodeKind::Identity => "identity",
            NodeKind::Add => "add",
            NodeKind::Sub => "sub",
            NodeKind::Mul => "mul",
            NodeKind::Div => "div",
            NodeKind::Cat => "cat",
            NodeKind::Reshape => "reshape",
            NodeKind::Permute => "permute",
            NodeKind::Transpose => "transpose",
            NodeKind::Narrow => "narrow",
            NodeKind::Mean => "mean",
            NodeKind::Slice => "slice",
            NodeKind::Pad => "pad",
            NodeKind::Parameter => "parameter",
        }
    }
}

impl std::fmt::Display for NodeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One row of the model summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Module path.
    pub name: String,
    /// `conv2d`, `residual_block`, ...
    pub kind: NodeKind,
    /// Output shape for one image of the manifest's input size, no batch dim.
    pub output_shape: Vec<usize>,
    /// Learned parameters in this layer and everything inside it.
    pub params: u64,
    /// Input pixels one output unit sees, `(h, w)`.
    pub receptive_field: (usize, usize),
    /// Input pixels between neighbouring output units, `(h, w)`.
    pub jump: (usize, usize),
    /// Multiply-accumulates of this layer and everything inside it, per image.
    pub macs: u64,
}

/// A built, validated network: one graph, one interpreter ([`Dag`]).
#[derive(Debug, Clone)]
pub struct Network {
    dag: Dag,
    input: (usize, usize, usize),
    total_params: u64,
    total_macs: u64,
    outputs: usize,
    from_graph_manifest: bool,
}

impl Network {
    /// Lowers the module tree (or takes the graph of a `graph` manifest),
    /// validates that it chains for a `[C, H, W]` input and ends in a flat
    /// vector, and computes the summary.
    pub fn new(root: Node, input: (usize, usize, usize)) -> Result<Self> {
        match root {
            Node {
                op: Op::Graph(dag), ..
            } => Self::from_dag(*dag, input, true),
            tree => Self::from_dag(Dag::new(lower(tree)?, None, input)?, input, false),
        }
    }

    fn from_dag(dag: Dag, input: (usize, usize, usize), from_graph_manifest: bool) -> Result<Self> {
        let outputs = match dag.output_shape()[..] {
            [n] => n,
            _ => {
                return Err(Error::Shape {
                    layer: dag
                        .layers()
                        .last()
                        .map_or_else(String::new, |l| l.name.clone()),
                    reason: format!(
                        "the network must end in a flat vector of class scores, but its output shape is {:?}",
                        dag.output_shape()
                    ),
                });
            }
        };
        let own = |l: &&LayerInfo| {
            !matches!(
                l.kind,
                NodeKind::Block | NodeKind::Sequential | NodeKind::ResidualBlock
            )
        };
        let total_params = dag.layers().iter().filter(own).map(|l| l.params).sum();
        let total_macs = dag.layers().iter().filter(own).map(|l| l.macs).sum();
        Ok(Self {
            dag,
            input,
            total_params,
            total_macs,
            outputs,
            from_graph_manifest,
        })
    }

    /// The forward pass on an NCHW batch, observed by `tap`.
    pub fn forward(&self, x: &Tensor, tap: &mut dyn Tap) -> Result<Tensor> {
        self.dag.forward(x, tap)
    }

    /// The graph (training swaps its parameters for `Var`s).
    pub fn dag(&self) -> &Dag {
        &self.dag
    }

    /// Whether this came from a `graph` manifest (rather than a built-in
    /// architecture lowered to the same graph).
    pub fn is_graph(&self) -> bool {
        self.from_graph_manifest
    }

    /// Plain inference: `[N, classes]`.
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x, &mut crate::tap::NoTap)
    }

    /// Every named layer in forward order.
    pub fn layers(&self) -> &[LayerInfo] {
        self.dag.layers()
    }

    /// The layer called `name`.
    pub fn layer(&self, name: &str) -> Option<&LayerInfo> {
        self.layers().iter().find(|l| l.name == name)
    }

    /// `(C, H, W)` the network was validated for.
    pub fn input(&self) -> (usize, usize, usize) {
        self.input
    }

    /// Learned parameters in total.
    pub fn total_params(&self) -> u64 {
        self.total_params
    }

    /// Multiply-accumulates per image in total.
    pub fn total_macs(&self) -> u64 {
        self.total_macs
    }

    /// Bytes of the weights: float32 parameters and batch-norm running
    /// statistics (two per channel).
    pub fn param_bytes(&self) -> u64 {
        let buffers: u64 = self
            .layers()
            .iter()
            .filter(|l| l.kind == NodeKind::BatchNorm2d)
            .map(|l| 2 * l.output_shape.first().copied().unwrap_or(0) as u64)
            .sum();
        4 * (self.total_params + buffers)
    }

    /// Bytes of every layer's float32 output for one image, containers
    /// (whose output is a child's) not counted twice.
    pub fn activation_bytes(&self) -> u64 {
        self.layers()
            .iter()
            .filter(|l| {
                !matches!(
                    l.kind,
                    NodeKind::Sequential | NodeKind::ResidualBlock | NodeKind::Block
                )
            })
            .map(|l| 4 * l.output_shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// Size of the output vector.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Whether the last layer is a softmax (its output is then probabilities).
    pub fn ends_with_softmax(&self) -> bool {
        self.layers()
            .last()
            .is_some_and(|l| l.kind == NodeKind::Softmax)
    }

    /// The kernels of a convolution layer, `[O, I/groups, kh, kw]`.
    pub fn conv_weight(&self, name: &str) -> Option<&Tensor> {
        self.dag.conv_weight(name)
    }
}
