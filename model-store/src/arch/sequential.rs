//! `sequential`: the manifest's own layer list, PyTorch-constructor style.

use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::graph::{Node, Op};
use crate::layers::{
    AdaptiveAvgPool2d, BatchNorm2d, Conv2d, ConvConfig, Linear, Padding, Pool2d, PoolKind,
};
use crate::manifest::{LayerKind, PaddingSpec, parse_layers};

pub(super) fn build(raw: &[Value], ck: &mut Checkpoint) -> Result<Node> {
    let specs = parse_layers(raw)?;
    if specs.is_empty() {
        return Err(Error::Manifest("`layers` is empty".into()));
    }
    let mut nodes = Vec::with_capacity(specs.len());
    for spec in specs {
        let name = spec.name;
        let bad = |msg: String| Error::Manifest(format!("layer '{name}': {msg}"));
        let op = match spec.kind {
            LayerKind::Conv2d(c) => {
                if let Some(mode) = c.padding_mode.as_deref().filter(|m| *m != "zeros") {
                    return Err(bad(format!(
                        "padding_mode {mode:?} is not supported; use \"zeros\""
                    )));
                }
                let (kh, kw) = c.kernel_size.hw();
                let stride = square(c.stride.hw(), "stride").map_err(&bad)?;
                let dilation = square(c.dilation.hw(), "dilation").map_err(&bad)?;
                let padding = match c.padding {
                    PaddingSpec::Size(p) => {
                        let (ph, pw) = p.hw();
                        Padding::symmetric(ph, pw)
                    }
                    PaddingSpec::Named(n) if n == "valid" => Padding::symmetric(0, 0),
                    PaddingSpec::Named(n) if n == "same" => {
                        if stride != 1 {
                            return Err(bad(
                                "padding \"same\" needs stride 1, as in PyTorch".into()
                            ));
                        }
                        Padding::same((kh, kw), dilation)
                    }
                    PaddingSpec::Named(n) => {
                        return Err(bad(format!(
                            "padding {n:?} is not valid; use a number, [h, w], \"valid\" or \"same\""
                        )));
                    }
                };
                Op::Conv(Conv2d::load(
                    ck,
                    &name,
                    ConvConfig::new(c.in_channels, c.out_channels, kh)
                        .kernel_hw((kh, kw))
                        .stride(stride)
                        .padding(padding)
                        .dilation(dilation)
                        .groups(c.groups)
                        .bias(c.bias),
                )?)
            }
            LayerKind::BatchNorm2d(b) => {
                if b.eps.is_nan() || b.eps <= 0.0 {
                    return Err(bad("eps must be > 0".into()));
                }
                Op::BatchNorm(BatchNorm2d::load(
                    ck,
                    &name,
                    b.num_features,
                    b.eps,
                    b.affine,
                )?)
            }
            LayerKind::Relu {} => Op::Relu,
            LayerKind::Relu6 {} => Op::Relu6,
            LayerKind::MaxPool2d(p) | LayerKind::AvgPool2d(p) if p.dilation.hw() != (1, 1) => {
                return Err(bad("pooling dilation other than 1 is not supported".into()));
            }
            LayerKind::MaxPool2d(p) => Op::Pool(pool(PoolKind::Max, &p, &name)?),
            LayerKind::AvgPool2d(p) => Op::Pool(pool(PoolKind::Avg, &p, &name)?),
            LayerKind::AdaptiveAvgPool2d { output_size } => {
                let (h, w) = output_size.hw();
                if h == 0 || w == 0 {
                    return Err(bad("output_size must be >= 1".into()));
                }
                Op::AdaptiveAvgPool(AdaptiveAvgPool2d { output: (h, w) })
            }
            LayerKind::Dropout { p } | LayerKind::Dropout2d { p } if !(0.0..=1.0).contains(&p) => {
                return Err(bad(format!("p must be in [0, 1], got {p}")));
            }
            LayerKind::Dropout { p } => Op::Dropout {
                p: p as f32,
                channelwise: false,
            },
            LayerKind::Dropout2d { p } => Op::Dropout {
                p: p as f32,
                channelwise: true,
            },
            LayerKind::Flatten { start_dim, end_dim } => {
                if start_dim != 1 || end_dim != -1 {
                    return Err(bad(format!(
                        "only flatten(start_dim=1, end_dim=-1) is supported, got ({start_dim}, {end_dim})"
                    )));
                }
                Op::Flatten
            }
            LayerKind::Linear(l) => Op::Linear(Linear::load(
                ck,
                &name,
                l.in_features,
                l.out_features,
                l.bias,
            )?),
            LayerKind::Softmax { dim } => {
                if !matches!(dim, None | Some(1) | Some(-1)) {
                    return Err(bad(
                        "softmax must be over the class dimension (dim 1 or -1)".into(),
                    ));
                }
                Op::Softmax
            }
        };
        nodes.push(Node::named(name, op));
    }
    Ok(Node::anon(Op::Seq(nodes)))
}

fn square((h, w): (usize, usize), what: &str) -> Result<usize, String> {
    if h == w {
        Ok(h)
    } else {
        Err(format!(
            "{what} [{h}, {w}] is not supported: use the same value for height and width"
        ))
    }
}

fn pool(kind: PoolKind, p: &crate::manifest::PoolSpec, name: &str) -> Result<Pool2d> {
    let kernel = p.kernel_size.hw();
    let stride = p.stride.map_or(kernel, |s| s.hw());
    Pool2d::new(
        kind,
        kernel,
        stride,
        p.padding.hw(),
        p.ceil_mode,
        p.count_include_pad,
        name,
    )
}
