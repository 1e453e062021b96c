//! Networks given as a DAG of named nodes (`"architecture": "graph"`), as
//! `tools/export/convscope_export.py` writes them from a torch.fx trace.
//!
//! A node names its op, its tensor inputs (earlier nodes, or `input` for
//! the image) and the op's PyTorch arguments; a module call also names the
//! module path its weights live under, and a node may carry `aliases`: the
//! container modules (`layer1.0`, `features`) whose output it is. Node
//! names and aliases are the API's layer names.
//!
//! [`Dag::forward`] is the interpreter: one pass in topological order that
//! reports every named output to the tap, frees each value after its last
//! use, and runs a convolution with the batch norm and ReLU after it (and a
//! residual add with its ReLU) as one kernel whenever the tap wants none of
//! the intermediates (as two, the convolution with its own weights and then
//! the batch norm with the activation, when the tap asks that no batch norm
//! be folded: [`crate::tap::Tap::folds_batch_norm`]).

pub mod ops;
mod parse;
mod windowed;
pub use parse::OPS;

use candle_core::Tensor;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::graph::{LayerInfo, NodeKind};
use crate::kernels::conv::Activation;
use crate::layers::Geo;
use crate::tap::{ReluRule, Tap};
pub use ops::GraphOp;
pub use windowed::BasePass;

/// A container module whose output is a node's output (`layer1.0`,
/// `features`): a layer name of its own, with its summary kind.
#[derive(Debug, Clone)]
pub struct Alias {
    /// The module path.
    pub name: String,
    /// `block` for graph manifests; `sequential` / `residual_block` for the
    /// built-in architectures.
    pub kind: NodeKind,
}

/// One node of the graph.
#[derive(Debug, Clone)]
pub struct DagNode {
    /// Module path or fx name.
    pub name: String,
    /// Container modules whose output this node's output is.
    pub aliases: Vec<Alias>,
    /// A step no forward hook could see (the ReLU after a built-in residual
    /// add): not a layer of the API, not shown to taps.
    pub hidden: bool,
    /// The module path the weights come from (a parameter node: the
    /// tensor's own name); `None` for functional steps.
    pub module: Option<String>,
    /// The computation.
    pub op: GraphOp,
    /// Indices of the input nodes; [`INPUT`] is the image.
    pub inputs: Vec<usize>,
}

/// The most values one node may output per image (1 GiB of float32): a
/// manifest cannot make the first forward pass allocate without bound.
pub const MAX_NODE_VALUES: usize = 1 << 28;

/// The index that stands for the network input in [`DagNode::inputs`].
pub const INPUT: usize = usize::MAX;

/// A chain run as one kernel: conv (+ its batch norm) (+ ReLU/ReLU6), or
/// add + ReLU (a conv + batch norm chain as two kernels for a tap that does
/// not let the batch norm fold). `covers` lists the nodes after the first,
/// in order.
#[derive(Debug, Clone)]
struct Fusion {
    covers: Vec<usize>,
    activation: Activation,
}

/// A validated graph with its summary.
#[derive(Debug, Clone)]
pub struct Dag {
    nodes: Vec<DagNode>,
    output: usize,
    fusions: Vec<Option<Fusion>>,
    /// `frees[t]`: the values no node after `t` reads.
    frees: Vec<Vec<usize>>,
    layers: Vec<LayerInfo>,
    /// Each node's full shape for one image (activations with a batch of 1).
    shapes: Vec<Vec<usize>>,
    out_shape: Vec<usize>,
}

impl Dag {
    /// Builds the graph from a manifest's `nodes`, taking each module's
    /// weights from `ck`, and checks that the shapes chain for `input`.
    pub fn build(
        raw_nodes: &[serde_json::Value],
        output: Option<&str>,
        ck: &mut Checkpoint,
        input: (usize, usize, usize),
    ) -> Result<Self> {
        let nodes = parse::nodes(raw_nodes, ck)?;
        // Missing tensors are placeholders: nothing may compute with them
        // (building prepares every convolution).
        ck.check()?;
        Self::new(nodes, output, input)
    }

    /// A graph from nodes in topological order; `output` names the node
    /// whose output is the network's (default: the last).
    pub fn new(
        nodes: Vec<DagNode>,
        output: Option<&str>,
        input: (usize, usize, usize),
    ) -> Result<Self> {
        let output = match output {
            Some(name) => nodes.iter().position(|n| n.name == name).ok_or_else(|| {
                Error::Manifest(format!("`output` names '{name}', which is not a node"))
            })?,
            None => nodes.len().checked_sub(1).ok_or_else(|| {
                Error::Manifest("a graph manifest needs at least one node".into())
            })?,
        };
        let (layers, shapes) = summarise(&nodes, input)?;
        let out_shape = shapes[output][1..].to_vec();
        let mut dag = Self {
            fusions: vec![None; nodes.len()],
            frees: Vec::new(),
            nodes,
            output,
            layers,
            shapes,
            out_shape,
        };
        dag.plan_frees();
        dag.plan_fusions()?;
        Ok(dag)
    }

    /// The nodes in topological order.
    pub fn nodes(&self) -> &[DagNode] {
        &self.nodes
    }

    /// One summary row per node and per alias, in the order forward hooks fire.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// The output shape without the batch dimension.
    pub fn output_shape(&self) -> &[usize] {
        &self.out_shape
    }

    fn consumers(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for &j in &n.inputs {
                if j != INPUT && !out[j].contains(&i) {
                    out[j].push(i);
                }
            }
        }
        out
    }

    fn plan_frees(&mut self) {
        let consumers = self.consumers();
        let mut frees = vec![Vec::new(); self.nodes.len()];
        for (j, cs) in consumers.iter().enumerate() {
            if j == self.output {
                continue;
            }
            if let Some(&last) = cs.iter().max() {
                frees[last].push(j);
            }
        }
        self.frees = frees;
    }

    /// Finds the chains to fuse and prepares every convolution's weights
    /// (folding the batch norm that is its only consumer).
    fn plan_fusions(&mut self) -> Result<()> {
        let consumers = self.consumers();
        let sole: Vec<Option<usize>> = (0..self.nodes.len())
            .map(|i| match consumers[i][..] {
                [j] if i != self.output && self.nodes[j].inputs.len() == 1 => Some(j),
                _ => None,
            })
            .collect();
        let only = |i: usize| sole[i];
        let mut absorbed = vec![false; self.nodes.len()];
        for i in 0..self.nodes.len() {
            let mut covers = Vec::new();
            let mut activation = Activation::Identity;
            match &self.nodes[i].op {
                // A batch norm no convolution absorbed (DenseNet's
                // pre-activation), with the activation after it.
                GraphOp::BatchNorm(_) if !absorbed[i] => {
                    if let Some(k) = only(i)
                        && let Some(a) = activation_of(&self.nodes[k].op)
                    {
                        covers.push(k);
                        activation = a;
                    }
                }
                GraphOp::Conv(conv) => {
                    let mut last = i;
                    let bn = only(i).and_then(|j| match &self.nodes[j].op {
                        GraphOp::BatchNorm(bn) => Some((j, bn)),
                        _ => None,
                    });
                    let prepared =
                        conv.prepare(bn.map(|(_, b)| b))
                            .map_err(|source| Error::Forward {
                                layer: self.nodes[i].name.clone(),
                                source,
                            })?;
                    if let Some((j, _)) = bn {
                        covers.push(j);
                        last = j;
                    }
                    if let Some(k) = only(last)
                        && let Some(a) = activation_of(&self.nodes[k].op)
                    {
                        covers.push(k);
                        activation = a;
                    }
                    if let GraphOp::Conv(conv) = &mut self.nodes[i].op {
                        conv.prepared = Some(std::sync::Arc::new(prepared));
                    }
                }
                GraphOp::Binary {
                    op: ops::BinOp::Add,
                    scalar: None,
                } => {
                    let [a, b] = self.nodes[i].inputs[..] else {
                        continue;
                    };
                    let same = self.shape_of(a) == self.shape_of(b);
                    if let Some(k) = only(i)
                        && same
                        && activation_of(&self.nodes[k].op) == Some(Activation::Relu)
                    {
                        covers.push(k);
                        activation = Activation::Relu;
                    }
                }
                _ => {}
            }
            if !covers.is_empty() {
                for &j in &covers {
                    absorbed[j] = true;
                }
                self.fusions[i] = Some(Fusion { covers, activation });
            }
        }
        Ok(())
    }

    fn shape_of(&self, i: usize) -> Option<&[usize]> {
        (i != INPUT).then(|| self.shapes[i].as_slice())
    }

    /// The forward pass on an NCHW batch, observed by `tap`.
    pub fn forward(&self, x: &Tensor, tap: &mut dyn Tap) -> Result<Tensor> {
        let n = self.nodes.len();
        let mut vals: Vec<Option<Tensor>> = vec![None; n];
        let mut covered = vec![false; n];
        let hidden = |tap: &dyn Tap, node: &DagNode| {
            node.hidden
                || (!tap.wants(&node.name) && node.aliases.iter().all(|a| !tap.wants(&a.name)))
        };
        let rule = tap.relu_rule();
        let folds_bn = tap.folds_batch_norm();
        let mut latest = x.clone();
        for i in 0..n {
            if !covered[i] {
                let node = &self.nodes[i];
                let ctx = |source| Error::Forward {
                    layer: node.name.clone(),
                    source,
                };
                let fused = self.fusions[i].as_ref().filter(|f| {
                    (rule == ReluRule::Autograd || f.activation != Activation::Relu)
                        && std::iter::once(i)
                            .chain(f.covers[..f.covers.len() - 1].iter().copied())
                            .all(|j| hidden(tap, &self.nodes[j]))
                });
                let get = |j: usize| -> Result<&Tensor> {
                    if j == INPUT {
                        return Ok(x);
                    }
                    vals[j].as_ref().ok_or_else(|| Error::Shape {
                        layer: node.name.clone(),
                        reason: format!("input '{}' was not computed", self.nodes[j].name),
                    })
                };
                let inputs = node
                    .inputs
                    .iter()
                    .map(|&j| get(j))
                    .collect::<Result<Vec<_>>>()?;
                let (last, y) = match fused {
                    Some(f) => {
                        let last = *f.covers.last().expect("non-empty");
                        let y = if folds_bn || !self.is_conv_bn(i, f) {
                            fused_kernel(node, &inputs, f.activation)
                        } else {
                            self.conv_then_bn(node, &inputs, f)
                        };
                        let y = y.map_err(|source| Error::Forward {
                            layer: self.nodes[last].name.clone(),
                            source,
                        })?;
                        for &j in &f.covers {
                            covered[j] = true;
                        }
                        (last, y)
                    }
                    None => (i, self.unfused(node, &inputs, rule).map_err(ctx)?),
                };
                let out = &self.nodes[last];
                let mut y = y;
                if !out.hidden {
                    y = tap.on_output(&out.name, y)?;
                }
                for alias in &out.aliases {
                    y = tap.on_output(&alias.name, y)?;
                }
                if tap.is_done() {
                    return Ok(y);
                }
                latest = y.clone();
                vals[last] = Some(y);
            }
            for &j in &self.frees[i] {
                vals[j] = None;
            }
        }
        Ok(vals[self.output].take().unwrap_or(latest))
    }

    /// Whether the fused chain `f` starting at node `i` is a convolution
    /// whose batch norm is folded into its prepared weights.
    fn is_conv_bn(&self, i: usize, f: &Fusion) -> bool {
        matches!(self.nodes[i].op, GraphOp::Conv(_))
            && matches!(self.nodes[f.covers[0]].op, GraphOp::BatchNorm(_))
    }

    /// A conv + batch norm (+ activation) chain without folding: the
    /// convolution with its own weights, then the batch norm and the
    /// activation as one kernel, rounding as PyTorch's two modules do.
    fn conv_then_bn(
        &self,
        node: &DagNode,
        inputs: &[&Tensor],
        f: &Fusion,
    ) -> candle_core::Result<Tensor> {
        let (GraphOp::Conv(conv), GraphOp::BatchNorm(bn)) = (&node.op, &self.nodes[f.covers[0]].op)
        else {
            unreachable!("checked by is_conv_bn");
        };
        bn.forward_with(&conv.forward(inputs[0])?, f.activation)
    }

    /// One node alone. A convolution runs with its prepared weights unless
    /// they fold a batch norm (which then runs as its own node).
    fn unfused(
        &self,
        node: &DagNode,
        inputs: &[&Tensor],
        rule: ReluRule,
    ) -> candle_core::Result<Tensor> {
        match &node.op {
            GraphOp::Unary(ops::Unary::Relu) => crate::kernels::relu_rule::relu(inputs[0], rule),
            GraphOp::Conv(conv) => match conv.prepared.as_deref() {
                Some(p) if !p.folds_bn => conv.forward_fused(inputs[0], p, Activation::Identity),
                _ => conv.forward(inputs[0]),
            },
            op => op.forward(inputs),
        }
    }

    /// The nodes, to swap parameters for `Var`s (training).
    pub(crate) fn nodes_mut(&mut self) -> &mut [DagNode] {
        &mut self.nodes
    }

    /// The pass without taps or fused kernels, each node computed by
    /// `eval` (training: batch statistics, dropout draws, `Var` weights).
    pub fn run_with(
        &self,
        x: &Tensor,
        mut eval: impl FnMut(&DagNode, &[&Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut vals: Vec<Option<Tensor>> = vec![None; self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            let inputs = node
                .inputs
                .iter()
                .map(|&j| {
                    if j == INPUT {
                        Some(x)
                    } else {
                        vals[j].as_ref()
                    }
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Error::Shape {
                    layer: node.name.clone(),
                    reason: "an input was not computed".into(),
                })?;
            vals[i] = Some(eval(node, &inputs)?);
            for &j in &self.frees[i] {
                vals[j] = None;
            }
        }
        vals[self.output].take().ok_or_else(|| Error::Shape {
            layer: self.nodes[self.output].name.clone(),
            reason: "produced no output".into(),
        })
    }

    /// The convolution that alone reads the network input, if there is one
    /// (`conv1` of a ResNet). Its output is affine in the input, so the
    /// input gradient of a sum of its output gradients is one backward
    /// through it ([`Self::convolution_input_gradient`]): integrated
    /// gradients sums its steps' gradients there and goes back through the
    /// stem once per image, not once per step.
    pub fn input_convolution(&self) -> Option<&str> {
        let mut readers = self.nodes.iter().filter(|n| n.inputs.contains(&INPUT));
        match (readers.next(), readers.next()) {
            (Some(n), None)
                if n.inputs.len() == 1 && !n.hidden && matches!(n.op, GraphOp::Conv(_)) =>
            {
                Some(&n.name)
            }
            _ => None,
        }
    }

    /// `Wᵀ·g`: the gradient with respect to an input of shape `input`
    /// (`[N, C, H, W]`) of `Σ conv(x) ⊙ g` for the convolution node `name`.
    /// It does not depend on `x` (the bias only shifts the output), and it
    /// runs the same backward kernels as a whole network's pass.
    pub fn convolution_input_gradient(
        &self,
        name: &str,
        g: &Tensor,
        input: &[usize],
    ) -> Result<Tensor> {
        let Some(GraphOp::Conv(conv)) = self.nodes.iter().find(|n| n.name == name).map(|n| &n.op)
        else {
            return Err(Error::Shape {
                layer: name.into(),
                reason: "is not a convolution".into(),
            });
        };
        let ctx = |source| Error::Forward {
            layer: name.into(),
            source,
        };
        let x = candle_core::Var::zeros(input, candle_core::DType::F32, g.device()).map_err(ctx)?;
        let grads =
            (|| conv.forward(x.as_tensor())?.mul(g)?.sum_all()?.backward())().map_err(ctx)?;
        match grads.get(x.as_tensor()) {
            Some(dx) => Ok(dx.clone()),
            None => x.as_tensor().zeros_like().map_err(ctx),
        }
    }

    /// The kernels of the convolution node (or alias) `name`.
    pub fn conv_weight(&self, name: &str) -> Option<&Tensor> {
        self.nodes.iter().find_map(|n| match &n.op {
            GraphOp::Conv(c) if n.name == name => Some(&c.weight),
            _ => None,
        })
    }
}

/// A fused chain starting at `node` as its one kernel: conv (+ batch norm,
/// folded into the prepared weights only when the chain covers one) +
/// `activation`, batch norm + `activation`, or add + ReLU.
fn fused_kernel(
    node: &DagNode,
    inputs: &[&Tensor],
    activation: Activation,
) -> candle_core::Result<Tensor> {
    match &node.op {
        GraphOp::Conv(conv) => {
            let p = conv.prepared.as_deref().expect("prepared at build");
            conv.forward_fused(inputs[0], p, activation)
        }
        GraphOp::BatchNorm(bn) => bn.forward_with(inputs[0], activation),
        _ => crate::kernels::elementwise::add_relu(inputs[0], inputs[1]),
    }
}

/// The activation a convolution can apply in its own pass, if `op` is one.
fn activation_of(op: &GraphOp) -> Option<Activation> {
    match op {
        GraphOp::Unary(u) => u.activation(),
        _ => None,
    }
}

/// Shapes, parameters and MACs of every node, and the summary rows (an
/// alias row sums the parameters and MACs of the modules under it).
fn summarise(
    nodes: &[DagNode],
    input: (usize, usize, usize),
) -> Result<(Vec<LayerInfo>, Vec<Vec<usize>>)> {
    let input_shape = vec![1, input.0, input.1, input.2];
    let input_geo = Geo::input(input.0, input.1, input.2);
    let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(nodes.len());
    let mut geos: Vec<Geo> = Vec::with_capacity(nodes.len());
    let mut rows = Vec::new();
    let mut per_node = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let ins: Vec<(&[usize], &Geo)> = node
            .inputs
            .iter()
            .map(|&j| {
                if j == INPUT {
                    (input_shape.as_slice(), &input_geo)
                } else {
                    (shapes[j].as_slice(), &geos[j])
                }
            })
            .collect();
        let inferred = node
            .op
            .infer(&node.name, &ins)
            .map_err(|reason| Error::Shape {
                layer: node.name.clone(),
                reason,
            })?;
        let values: usize = inferred.shape.iter().product();
        if values > MAX_NODE_VALUES {
            return Err(Error::Shape {
                layer: node.name.clone(),
                reason: format!(
                    "its output {:?} holds {values} values per image, more than the {MAX_NODE_VALUES} (1 GiB of float32) convscope allows; check its padding, stride and sizes",
                    inferred.shape
                ),
            });
        }
        let batched = !matches!(node.op, GraphOp::Parameter(_));
        let shown = if batched {
            inferred.shape[1..].to_vec()
        } else {
            inferred.shape.clone()
        };
        per_node.push((node.op.params(), inferred.macs));
        if !node.hidden {
            rows.push((i, None, shown.clone()));
        }
        for alias in &node.aliases {
            rows.push((i, Some(alias.clone()), shown.clone()));
        }
        shapes.push(inferred.shape);
        geos.push(inferred.geo);
    }
    // Parameters belong to modules, which a second call does not repeat.
    let mut counted = std::collections::HashSet::new();
    let owned: Vec<(Option<&str>, u64, u64)> = nodes
        .iter()
        .zip(&per_node)
        .map(|(n, &(p, m))| {
            let owner = n.module.as_deref();
            let p = if owner.is_some_and(|o| !counted.insert(o.to_string())) {
                0
            } else {
                p
            };
            (owner, p, m)
        })
        .collect();
    let layers = rows
        .into_iter()
        .map(|(i, alias, shape)| {
            let (params, macs) = match &alias {
                None => (owned[i].1, owned[i].2),
                Some(a) => {
                    let prefix = format!("{}.", a.name);
                    nodes.iter().zip(&owned).fold((0, 0), |(p, m), (n, o)| {
                        let inside = n.module.as_ref().is_some_and(|t| t.starts_with(&prefix));
                        if inside { (p + o.1, m + o.2) } else { (p, m) }
                    })
                }
            };
            LayerInfo {
                name: alias
                    .as_ref()
                    .map_or_else(|| nodes[i].name.clone(), |a| a.name.clone()),
                kind: alias
                    .as_ref()
                    .map_or_else(|| nodes[i].op.kind(), |a| a.kind),
                output_shape: shape,
                params,
                receptive_field: geos[i].rf,
                jump: geos[i].jump,
                macs,
            }
        })
        .collect();
    Ok((layers, shapes))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use crate::model::LoadedModel;
    use crate::tap::Record;

    const EMPTY: &[u8] = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ";

    fn corpus(name: &str) -> Vec<u8> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/graph_build");
        std::fs::read(dir.join(name)).unwrap()
    }

    #[test]
    fn weightless_graphs_build_and_run_and_report_every_node_once() {
        for seed in ["residual.json", "shuffle.json"] {
            let model = LoadedModel::from_bytes(&corpus(seed), EMPTY, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{seed}: {e}"));
            let (c, h, w) = model.network.input();
            let x = Tensor::ones((2, c, h, w), candle_core::DType::F32, &Device::Cpu).unwrap();
            let mut all = Record::all();
            let y = model.network.forward(&x, &mut all).unwrap();
            assert_eq!(y.dim(0).unwrap(), 2, "{seed}: the batch stays first");
            assert_eq!(all.outputs.len(), model.network.layers().len(), "{seed}");
        }
    }

    #[test]
    fn node_errors_name_the_node_and_what_to_fix() {
        let manifest = |nodes: &str| {
            format!(
                r#"{{"name": "g", "architecture": "graph", "input": {{"channels": 1, "height": 4, "width": 4}}, "nodes": {nodes}}}"#
            )
        };
        for (nodes, says) in [
            (
                r#"[{"name": "x", "op": "fft"}]"#,
                "node 'x': unknown op \"fft\"; known: conv2d",
            ),
            (
                r#"[{"name": "x", "op": "relu", "inputs": ["y"]}]"#,
                "input 'y' is not an earlier node",
            ),
            (
                r#"[{"name": "input", "op": "relu", "inputs": ["input"]}]"#,
                "reserved name `input`",
            ),
            (
                r#"[{"name": "x", "op": "cat", "inputs": []}]"#,
                "needs at least one input",
            ),
            (
                r#"[{"name": "x", "op": "reshape", "inputs": ["input"], "shape": [-1]}]"#,
                "must not hold -1",
            ),
            (
                r#"[{"name": "x", "op": "reshape", "inputs": ["input"], "shape": [15]}]"#,
                "cannot view [1, 4, 4] (16 values per sample) as [15]",
            ),
            (
                r#"[{"name": "x", "op": "flatten", "inputs": ["input"], "start_dim": 0}]"#,
                "flattening the batch dimension",
            ),
            (
                r#"[{"name": "x", "op": "relu", "inputs": ["input"], "aliases": ["x"]}]"#,
                "alias 'x' is already the name",
            ),
        ] {
            let e = LoadedModel::from_bytes(manifest(nodes).as_bytes(), EMPTY, &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{nodes}: {e}");
        }
    }

    /// A tap that lets nothing fold its batch norm runs the fused kernels
    /// but PyTorch's rounding: the same logits, bit for bit, as the pass
    /// that materialises every layer (a convolution, then its batch norm,
    /// then its ReLU), and the same input gradient.
    #[test]
    fn unfolded_fusion_rounds_as_the_unfused_pass() {
        struct Unfolded;
        impl crate::tap::Tap for Unfolded {
            fn on_output(&mut self, _: &str, y: Tensor) -> crate::error::Result<Tensor> {
                Ok(y)
            }
            fn wants(&self, _: &str) -> bool {
                false
            }
            fn folds_batch_norm(&self) -> bool {
                false
            }
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let model =
            LoadedModel::from_files(&dir.join("resnet20-cifar10.json"), &Device::Cpu).unwrap();
        let mut rng = crate::rng::Rng::new(5);
        let x: Vec<f32> = (0..2 * 3 * 32 * 32).map(|_| rng.normal()).collect();
        let x = Tensor::from_vec(x, (2, 3, 32, 32), &Device::Cpu).unwrap();
        let run = |tap: &mut dyn crate::tap::Tap| {
            let v = candle_core::Var::from_tensor(&x).unwrap();
            let y = model.network.forward(v.as_tensor(), tap).unwrap();
            let g = (y.narrow(1, 3, 1).unwrap().sum_all().unwrap())
                .backward()
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(g.get(v.as_tensor()).unwrap()))
        };
        let (y_all, g_all) = run(&mut Record::all());
        let (y, g) = run(&mut Unfolded);
        assert_eq!(y, y_all, "logits");
        let scale = g_all.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in g.iter().zip(&g_all) {
            assert!((a - b).abs() <= 1e-6 * scale, "input gradient {a} vs {b}");
        }
        // And folding does change the rounding (so the test can tell).
        let (y_folded, _) = run(&mut crate::tap::NoTap);
        assert_ne!(y_folded, y_all, "folded logits");
    }
}
