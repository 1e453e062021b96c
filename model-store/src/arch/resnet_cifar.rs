//! ResNet-20/32/44/56/110 for CIFAR (He et al. 2015, §4.2) as in
//! akamaster/pytorch_resnet_cifar10: three stages of `n` basic blocks with
//! 16/32/64 channels and parameter-free "option A" shortcuts.

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::graph::{Node, Op};
use crate::layers::{AdaptiveAvgPool2d, BatchNorm2d, Conv2d, ConvConfig, Linear};

pub(super) fn build(ck: &mut Checkpoint, n: usize, classes: Option<usize>) -> Result<Node> {
    let num_classes = super::head_size(ck, classes, "linear.weight", 10);
    let mut nodes = vec![
        conv3x3(ck, "conv1", 3, 16, 1)?,
        Node::named(
            "bn1",
            Op::BatchNorm(BatchNorm2d::load(ck, "bn1", 16, 1e-5, true)?),
        ),
        // F.relu in the source: no module, but worth observing.
        Node::named("relu", Op::Relu),
    ];
    let mut in_planes = 16;
    for (stage, (planes, stride)) in [(16, 1), (32, 2), (64, 2)].into_iter().enumerate() {
        let stage_name = format!("layer{}", stage + 1);
        let mut blocks = Vec::with_capacity(n);
        for b in 0..n {
            let s = if b == 0 { stride } else { 1 };
            blocks.push(block(
                ck,
                &format!("{stage_name}.{b}"),
                in_planes,
                planes,
                s,
            )?);
            in_planes = planes;
        }
        nodes.push(Node::named(stage_name, Op::Seq(blocks)));
    }
    nodes.push(Node::named(
        "avgpool",
        Op::AdaptiveAvgPool(AdaptiveAvgPool2d { output: (1, 1) }),
    ));
    nodes.push(Node::named("flatten", Op::Flatten));
    nodes.push(Node::named(
        "linear",
        Op::Linear(Linear::load(ck, "linear", 64, num_classes, true)?),
    ));
    Ok(Node::anon(Op::Seq(nodes)))
}

fn conv3x3(
    ck: &mut Checkpoint,
    name: &str,
    cin: usize,
    cout: usize,
    stride: usize,
) -> Result<Node> {
    Ok(Node::named(
        name,
        Op::Conv(Conv2d::load(
            ck,
            name,
            ConvConfig::new(cin, cout, 3)
                .stride(stride)
                .pad(1)
                .bias(false),
        )?),
    ))
}

fn block(
    ck: &mut Checkpoint,
    p: &str,
    in_planes: usize,
    planes: usize,
    stride: usize,
) -> Result<Node> {
    let body = vec![
        conv3x3(ck, &format!("{p}.conv1"), in_planes, planes, stride)?,
        Node::named(
            format!("{p}.bn1"),
            Op::BatchNorm(BatchNorm2d::load(
                ck,
                &format!("{p}.bn1"),
                planes,
                1e-5,
                true,
            )?),
        ),
        Node::anon(Op::Relu),
        conv3x3(ck, &format!("{p}.conv2"), planes, planes, 1)?,
        Node::named(
            format!("{p}.bn2"),
            Op::BatchNorm(BatchNorm2d::load(
                ck,
                &format!("{p}.bn2"),
                planes,
                1e-5,
                true,
            )?),
        ),
    ];
    // The source always has a `shortcut` module: an empty nn.Sequential
    // (identity) or the option-A LambdaLayer.
    let shortcut = if stride != 1 || in_planes != planes {
        Op::ShortcutA { pad: planes / 4 }
    } else {
        Op::Seq(Vec::new())
    };
    Ok(Node::named(
        p,
        Op::Residual {
            body,
            shortcut: Some(Box::new(Node::named(format!("{p}.shortcut"), shortcut))),
        },
    ))
}
