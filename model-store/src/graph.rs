//! A network as a tree of named modules, and the one forward pass over it.
//!
//! Every architecture (the manifest-driven `sequential`, the CIFAR ResNets,
//! torchvision's families, MobileNet) is built as this same tree, so one
//! interpreter gives all of them the tap, the per-layer summary and the error
//! context. Node names are PyTorch module paths, which are also the
//! checkpoint key prefixes and the API's layer names.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::layers::{
    Activation, AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Geo, Linear, Pool2d, PoolKind, softmax,
};
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

    fn kind(&self) -> NodeKind {
        match &self.op {
            Op::Conv(_) => NodeKind::Conv2d,
            Op::BatchNorm(_) => NodeKind::BatchNorm2d,
            Op::Relu => NodeKind::Relu,
            Op::Relu6 => NodeKind::Relu6,
            Op::Pool(p) if p.kind == PoolKind::Max => NodeKind::MaxPool2d,
            Op::Pool(_) => NodeKind::AvgPool2d,
            Op::AdaptiveAvgPool(_) => NodeKind::AdaptiveAvgPool2d,
            Op::Dropout {
                channelwise: false, ..
            } => NodeKind::Dropout,
            Op::Dropout { .. } => NodeKind::Dropout2d,
            Op::Flatten => NodeKind::Flatten,
            Op::Linear(_) => NodeKind::Linear,
            Op::Softmax => NodeKind::Softmax,
            Op::Seq(_) => NodeKind::Sequential,
            Op::Residual { .. } => NodeKind::ResidualBlock,
            Op::ShortcutA { .. } => NodeKind::Shortcut,
            Op::Graph(_) => NodeKind::Block,
        }
    }

    /// The forward pass of this subtree, reporting named outputs to `tap`.
    /// `scope` names the nearest named ancestor, for error messages.
    fn forward(&self, x: Tensor, tap: &mut dyn Tap, scope: &str) -> Result<Tensor> {
        let scope = self.name.as_deref().unwrap_or(scope);
        let ctx = |source| Error::Forward {
            layer: scope.to_string(),
            source,
        };
        let y = match &self.op {
            Op::Conv(c) => c.forward(&x).map_err(ctx)?,
            Op::BatchNorm(b) => b.forward(&x).map_err(ctx)?,
            Op::Relu => x.relu().map_err(ctx)?,
            Op::Relu6 => x.clamp(0f32, 6f32).map_err(ctx)?,
            Op::Pool(p) => p.forward(&x).map_err(ctx)?,
            Op::AdaptiveAvgPool(p) => p.forward(&x).map_err(ctx)?,
            Op::Dropout { .. } => x,
            Op::Flatten => x.flatten_from(1).map_err(ctx)?,
            Op::Linear(l) => l.forward(&x).map_err(ctx)?,
            Op::Softmax => softmax(&x).map_err(ctx)?,
            Op::Seq(children) => {
                let (h, stopped) = forward_children(children, x, tap, scope)?;
                if stopped {
                    return Ok(h);
                }
                h
            }
            Op::Residual { body, shortcut } => {
                let (h, stopped) = forward_children(body, x.clone(), tap, scope)?;
                if stopped {
                    return Ok(h);
                }
                let s = match shortcut {
                    Some(s) => s.forward(x, tap, scope)?,
                    None => x,
                };
                if tap.is_done() {
                    return Ok(s);
                }
                crate::kernels::elementwise::add_relu(&h, &s).map_err(ctx)?
            }
            Op::Graph(dag) => return dag.forward(&x, tap),
            Op::ShortcutA { pad } => {
                let (_, _, h, w) = x.dims4().map_err(ctx)?;
                let rows = even_indices(h, &x)?;
                let cols = even_indices(w, &x)?;
                x.index_select(&rows, 2)
                    .and_then(|t| t.index_select(&cols, 3))
                    .and_then(|t| t.pad_with_zeros(1, *pad, *pad))
                    .map_err(ctx)?
            }
        };
        match &self.name {
            Some(name) => tap.on_output(name, y),
            None => Ok(y),
        }
    }

    /// Walks the subtree like `forward` but over shapes: checks that layers
    /// chain, and appends a [`LayerInfo`] per named node (children first,
    /// the order hooks fire in). Returns the output geometry, the subtree's
    /// parameters and multiply-accumulates.
    fn summarise(&self, g: &Geo, out: &mut Vec<LayerInfo>) -> Result<(Geo, u64, u64)> {
        let layer = self.name.as_deref().unwrap_or("<anonymous>");
        let (geo, params, macs) = match &self.op {
            Op::Conv(c) => {
                let geo = c.geometry(layer, g)?;
                let macs = c.macs(&geo);
                (geo, c.params(), macs)
            }
            Op::BatchNorm(b) => (b.geometry(layer, g)?, b.params(), 0),
            Op::Relu | Op::Relu6 | Op::Dropout { .. } | Op::Softmax => (g.clone(), 0, 0),
            Op::Pool(p) => (p.geometry(layer, g)?, 0, 0),
            Op::AdaptiveAvgPool(p) => (p.geometry(layer, g)?, 0, 0),
            Op::Flatten => {
                // Each flat unit sees the whole map: a window over all positions.
                let (rf, jump) = match g.shape[..] {
                    [_, h, w] => (
                        (g.rf.0 + (h - 1) * g.jump.0, g.rf.1 + (w - 1) * g.jump.1),
                        g.jump,
                    ),
                    _ => (g.rf, g.jump),
                };
                let n = g.shape.iter().product();
                (
                    Geo {
                        shape: vec![n],
                        rf,
                        jump,
                    },
                    0,
                    0,
                )
            }
            Op::Linear(l) => (l.geometry(layer, g)?, l.params(), l.macs()),
            Op::Seq(children) => {
                let (mut geo, mut params, mut macs) = (g.clone(), 0, 0);
                for child in children {
                    let (cg, cp, cm) = child.summarise(&geo, out)?;
                    geo = cg;
                    params += cp;
                    macs += cm;
                }
                (geo, params, macs)
            }
            Op::Residual { body, shortcut } => {
                let (mut geo, mut params, mut macs) = (g.clone(), 0, 0);
                for child in body {
                    let (cg, cp, cm) = child.summarise(&geo, out)?;
                    geo = cg;
                    params += cp;
                    macs += cm;
                }
                let sg = match shortcut {
                    Some(s) => {
                        let (sg, sp, sm) = s.summarise(g, out)?;
                        params += sp;
                        macs += sm;
                        sg
                    }
                    None => g.clone(),
                };
                if sg.shape != geo.shape {
                    return Err(Error::Shape {
                        layer: layer.to_string(),
                        reason: format!(
                            "the main path gives {:?} but the shortcut gives {:?}",
                            geo.shape, sg.shape
                        ),
                    });
                }
                geo.rf = (geo.rf.0.max(sg.rf.0), geo.rf.1.max(sg.rf.1));
                (geo, params, macs)
            }
            Op::Graph(dag) => {
                out.extend_from_slice(dag.layers());
                let params = dag
                    .layers()
                    .iter()
                    .filter(|l| l.kind != NodeKind::Block)
                    .map(|l| l.params)
                    .sum();
                let macs = dag
                    .layers()
                    .iter()
                    .filter(|l| l.kind != NodeKind::Block)
                    .map(|l| l.macs)
                    .sum();
                let last = dag
                    .layers()
                    .iter()
                    .rev()
                    .find(|l| l.kind != NodeKind::Block);
                let geo = Geo {
                    shape: dag.output_shape().to_vec(),
                    rf: last.map_or((1, 1), |l| l.receptive_field),
                    jump: last.map_or((1, 1), |l| l.jump),
                };
                return Ok((geo, params, macs));
            }
            Op::ShortcutA { pad } => match g.shape[..] {
                [c, h, w] => (
                    Geo {
                        shape: vec![c + 2 * pad, h.div_ceil(2), w.div_ceil(2)],
                        rf: g.rf,
                        jump: (g.jump.0 * 2, g.jump.1 * 2),
                    },
                    0,
                    0,
                ),
                _ => {
                    return Err(Error::Shape {
                        layer: layer.to_string(),
                        reason: format!("expects [C, H, W], got {:?}", g.shape),
                    });
                }
            },
        };
        if let Some(name) = &self.name {
            out.push(LayerInfo {
                name: name.clone(),
                kind: self.kind(),
                output_shape: geo.shape.clone(),
                params,
                receptive_field: geo.rf,
                jump: geo.jump,
                macs,
            });
        }
        Ok((geo, params, macs))
    }
}

/// Runs `children` in order; `true` when the tap asked to stop.
fn forward_children(
    children: &[Node],
    x: Tensor,
    tap: &mut dyn Tap,
    scope: &str,
) -> Result<(Tensor, bool)> {
    let mut h = x;
    let mut i = 0;
    while i < children.len() {
        match forward_fused(&children[i..], &h, tap, scope)? {
            Some((y, used)) => {
                h = y;
                i += used;
            }
            None => {
                h = children[i].forward(h, tap, scope)?;
                i += 1;
            }
        }
        if tap.is_done() {
            return Ok((h, true));
        }
    }
    Ok((h, false))
}

/// A convolution, then its folded batch norm and/or a ReLU(6), as one
/// kernel, when the tap wants none of the outputs but the last. Returns the
/// last one's output (reported to the tap) and how many nodes it covers;
/// `None` when there is nothing to fuse.
fn forward_fused(
    nodes: &[Node],
    x: &Tensor,
    tap: &mut dyn Tap,
    scope: &str,
) -> Result<Option<(Tensor, usize)>> {
    let Some(Op::Conv(conv)) = nodes.first().map(|n| &n.op) else {
        return Ok(None);
    };
    let hidden = |n: &Node| n.name.as_deref().is_none_or(|name| !tap.wants(name));
    if !hidden(&nodes[0]) {
        return Ok(None);
    }
    let Some(prepared) = conv.prepared.as_deref() else {
        return Ok(None);
    };
    let mut used = if prepared.folds_bn { 2 } else { 1 };
    let mut activation = Activation::Identity;
    if hidden(&nodes[used - 1]) {
        match nodes.get(used).map(|n| &n.op) {
            Some(Op::Relu) => (activation, used) = (Activation::Relu, used + 1),
            Some(Op::Relu6) => (activation, used) = (Activation::Relu6, used + 1),
            _ => {}
        }
    }
    if used == 1 {
        return Ok(None);
    }
    let node = &nodes[used - 1];
    let y = conv
        .forward_fused(x, prepared, activation)
        .map_err(|source| Error::Forward {
            layer: node.name.as_deref().unwrap_or(scope).to_string(),
            source,
        })?;
    let y = match &node.name {
        Some(name) => tap.on_output(name, y)?,
        None => y,
    };
    Ok(Some((y, used)))
}

/// Prepares every convolution for the predict path ([`Conv2d::prepared`]),
/// folding in the batch norm that directly follows it.
fn prepare_convs(node: &mut Node) -> Result<()> {
    match &mut node.op {
        Op::Conv(conv) => prepare(conv, None, &node.name),
        Op::Seq(children) => prepare_children(children),
        Op::Residual { body, shortcut } => {
            prepare_children(body)?;
            match shortcut {
                Some(s) => prepare_convs(s),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

fn prepare_children(children: &mut [Node]) -> Result<()> {
    for i in 0..children.len() {
        let (head, rest) = children[i..].split_at_mut(1);
        match (&mut head[0].op, rest.first().map(|n| &n.op)) {
            (Op::Conv(conv), Some(Op::BatchNorm(bn))) => prepare(conv, Some(bn), &head[0].name)?,
            _ => prepare_convs(&mut head[0])?,
        }
    }
    Ok(())
}

fn prepare(conv: &mut Conv2d, bn: Option<&BatchNorm2d>, name: &Option<String>) -> Result<()> {
    let prepared = conv.prepare(bn).map_err(|source| Error::Forward {
        layer: name.clone().unwrap_or_default(),
        source,
    })?;
    conv.prepared = Some(std::sync::Arc::new(prepared));
    Ok(())
}

fn even_indices(n: usize, like: &Tensor) -> Result<Tensor> {
    let idx: Vec<u32> = (0..n as u32).step_by(2).collect();
    Ok(Tensor::new(idx.as_slice(), like.device())?)
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

/// Runs one node (a leaf, in training) without observers.
pub(crate) fn forward_leaf(node: &Node, x: Tensor) -> Result<Tensor> {
    node.forward(x, &mut crate::tap::NoTap, "input")
}

/// A built, validated network.
#[derive(Debug, Clone)]
pub struct Network {
    root: Node,
    input: (usize, usize, usize),
    layers: Vec<LayerInfo>,
    total_params: u64,
    total_macs: u64,
    outputs: usize,
}

impl Network {
    /// Validates that the tree chains for a `[C, H, W]` input and ends in a
    /// flat vector, and computes the summary.
    pub fn new(mut root: Node, input: (usize, usize, usize)) -> Result<Self> {
        let mut layers = Vec::new();
        let (geo, total_params, total_macs) =
            root.summarise(&Geo::input(input.0, input.1, input.2), &mut layers)?;
        let outputs = match geo.shape[..] {
            [n] => n,
            _ => {
                return Err(Error::Shape {
                    layer: layers.last().map_or_else(String::new, |l| l.name.clone()),
                    reason: format!(
                        "the network must end in a flat vector of class scores, but its output shape is {:?}",
                        geo.shape
                    ),
                });
            }
        };
        prepare_convs(&mut root)?;
        Ok(Self {
            root,
            input,
            layers,
            total_params,
            total_macs,
            outputs,
        })
    }

    /// The forward pass on an NCHW batch, observed by `tap`.
    pub fn forward(&self, x: &Tensor, tap: &mut dyn Tap) -> Result<Tensor> {
        self.root.forward(x.clone(), tap, "input")
    }

    /// The module tree (training walks it with its own forward).
    pub fn root(&self) -> &Node {
        &self.root
    }

    /// Whether this is a `graph` model (a DAG rather than a module tree).
    pub fn is_graph(&self) -> bool {
        matches!(self.root.op, Op::Graph(_))
    }

    /// Plain inference: `[N, classes]`.
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x, &mut crate::tap::NoTap)
    }

    /// Every named layer in forward order.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// The layer called `name`.
    pub fn layer(&self, name: &str) -> Option<&LayerInfo> {
        self.layers.iter().find(|l| l.name == name)
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
            .layers
            .iter()
            .filter(|l| l.kind == NodeKind::BatchNorm2d)
            .map(|l| 2 * l.output_shape.first().copied().unwrap_or(0) as u64)
            .sum();
        4 * (self.total_params + buffers)
    }

    /// Bytes of every layer's float32 output for one image, containers
    /// (whose output is a child's) not counted twice.
    pub fn activation_bytes(&self) -> u64 {
        self.layers
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
        self.layers
            .last()
            .is_some_and(|l| l.kind == NodeKind::Softmax)
    }

    /// The kernels of a convolution layer, `[O, I/groups, kh, kw]`.
    pub fn conv_weight(&self, name: &str) -> Option<&Tensor> {
        fn find<'a>(node: &'a Node, name: &str) -> Option<&'a Tensor> {
            match &node.op {
                Op::Conv(c) if node.name.as_deref() == Some(name) => Some(&c.weight),
                Op::Graph(dag) => dag.conv_weight(name),
                Op::Seq(children) => children.iter().find_map(|c| find(c, name)),
                Op::Residual { body, shortcut } => body
                    .iter()
                    .find_map(|c| find(c, name))
                    .or_else(|| shortcut.as_deref().and_then(|s| find(s, name))),
                _ => None,
            }
        }
        find(&self.root, name)
    }
}
