//! torchvision's ResNet, VGG and AlexNet with torchvision's `state_dict`
//! keys and module paths (`layer4.1.conv2`, `features.28`, `classifier.6`).

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::graph::{Node, Op};
use crate::layers::{AdaptiveAvgPool2d, BatchNorm2d, Conv2d, ConvConfig, Linear, Pool2d, PoolKind};

fn conv(ck: &mut Checkpoint, name: &str, config: ConvConfig) -> Result<Node> {
    Ok(Node::named(name, Op::Conv(Conv2d::load(ck, name, config)?)))
}

/// torchvision's convs: no bias in ResNets, bias in VGG/AlexNet.
fn cfg(cin: usize, cout: usize, k: usize, stride: usize, pad: usize) -> ConvConfig {
    ConvConfig::new(cin, cout, k).stride(stride).pad(pad)
}

fn bn(ck: &mut Checkpoint, name: &str, c: usize) -> Result<Node> {
    Ok(Node::named(
        name,
        Op::BatchNorm(BatchNorm2d::load(ck, name, c, 1e-5, true)?),
    ))
}

fn max_pool(name: &str, k: usize, s: usize, p: usize) -> Result<Node> {
    Ok(Node::named(
        name,
        Op::Pool(Pool2d::new(
            PoolKind::Max,
            (k, k),
            (s, s),
            (p, p),
            false,
            true,
            name,
        )?),
    ))
}

fn linear(ck: &mut Checkpoint, name: &str, i: usize, o: usize) -> Result<Node> {
    Ok(Node::named(
        name,
        Op::Linear(Linear::load(ck, name, i, o, true)?),
    ))
}

/// ResNet-18/34 (basic blocks) and -50/101/152 (bottlenecks, stride on the
/// 3×3 conv as torchvision's "v1.5").
pub(super) fn resnet(
    ck: &mut Checkpoint,
    bottleneck: bool,
    depths: [usize; 4],
    classes: Option<usize>,
) -> Result<Node> {
    let num_classes = super::head_size(ck, classes, "fc.weight", 1000);
    let expansion = if bottleneck { 4 } else { 1 };
    let mut nodes = vec![
        conv(ck, "conv1", cfg(3, 64, 7, 2, 3).bias(false))?,
        bn(ck, "bn1", 64)?,
        Node::named("relu", Op::Relu),
        max_pool("maxpool", 3, 2, 1)?,
    ];
    let mut inplanes = 64;
    for (i, (&blocks, planes)) in depths.iter().zip([64, 128, 256, 512]).enumerate() {
        let stage = format!("layer{}", i + 1);
        let mut children = Vec::with_capacity(blocks);
        for b in 0..blocks {
            let stride = if b == 0 && i > 0 { 2 } else { 1 };
            let p = format!("{stage}.{b}");
            let out = planes * expansion;
            let body = if bottleneck {
                vec![
                    conv(
                        ck,
                        &format!("{p}.conv1"),
                        cfg(inplanes, planes, 1, 1, 0).bias(false),
                    )?,
                    bn(ck, &format!("{p}.bn1"), planes)?,
                    // One `relu` module, called three times; a hook sees the first call here.
                    Node::named(format!("{p}.relu"), Op::Relu),
                    conv(
                        ck,
                        &format!("{p}.conv2"),
                        cfg(planes, planes, 3, stride, 1).bias(false),
                    )?,
                    bn(ck, &format!("{p}.bn2"), planes)?,
                    Node::anon(Op::Relu),
                    conv(
                        ck,
                        &format!("{p}.conv3"),
                        cfg(planes, out, 1, 1, 0).bias(false),
                    )?,
                    bn(ck, &format!("{p}.bn3"), out)?,
                ]
            } else {
                vec![
                    conv(
                        ck,
                        &format!("{p}.conv1"),
                        cfg(inplanes, planes, 3, stride, 1).bias(false),
                    )?,
                    bn(ck, &format!("{p}.bn1"), planes)?,
                    Node::named(format!("{p}.relu"), Op::Relu),
                    conv(
                        ck,
                        &format!("{p}.conv2"),
                        cfg(planes, planes, 3, 1, 1).bias(false),
                    )?,
                    bn(ck, &format!("{p}.bn2"), planes)?,
                ]
            };
            let shortcut = if stride != 1 || inplanes != out {
                let d = format!("{p}.downsample");
                Some(Box::new(Node::named(
                    d.clone(),
                    Op::Seq(vec![
                        conv(
                            ck,
                            &format!("{d}.0"),
                            cfg(inplanes, out, 1, stride, 0).bias(false),
                        )?,
                        bn(ck, &format!("{d}.1"), out)?,
                    ]),
                )))
            } else {
                None
            };
            children.push(Node::named(p, Op::Residual { body, shortcut }));
            inplanes = out;
        }
        nodes.push(Node::named(stage, Op::Seq(children)));
    }
    nodes.push(Node::named(
        "avgpool",
        Op::AdaptiveAvgPool(AdaptiveAvgPool2d { output: (1, 1) }),
    ));
    // torch.flatten in forward(): functional, named for the API.
    nodes.push(Node::named("flatten", Op::Flatten));
    nodes.push(linear(ck, "fc", 512 * expansion, num_classes)?);
    Ok(Node::anon(Op::Seq(nodes)))
}

/// VGG-11/13/16/19, with or without batch norm (configurations A, B, D, E).
pub(super) fn vgg(
    ck: &mut Checkpoint,
    depth: usize,
    batch_norm: bool,
    classes: Option<usize>,
) -> Result<Node> {
    let num_classes = super::head_size(ck, classes, "classifier.6.weight", 1000);
    const M: usize = 0;
    let layout: &[usize] = match depth {
        11 => &[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M],
        13 => &[
            64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M,
        ],
        16 => &[
            64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M,
        ],
        _ => &[
            64, 64, M, 128, 128, M, 256, 256, 256, 256, M, 512, 512, 512, 512, M, 512, 512, 512,
            512, M,
        ],
    };
    let mut features = Vec::new();
    let mut cin = 3;
    for &v in layout {
        let i = features.len();
        if v == M {
            features.push(max_pool(&format!("features.{i}"), 2, 2, 0)?);
        } else {
            features.push(conv(
                ck,
                &format!("features.{i}"),
                cfg(cin, v, 3, 1, 1).bias(true),
            )?);
            if batch_norm {
                features.push(bn(ck, &format!("features.{}", i + 1), v)?);
            }
            let j = features.len();
            features.push(Node::named(format!("features.{j}"), Op::Relu));
            cin = v;
        }
    }
    Ok(Node::anon(Op::Seq(vec![
        Node::named("features", Op::Seq(features)),
        Node::named(
            "avgpool",
            Op::AdaptiveAvgPool(AdaptiveAvgPool2d { output: (7, 7) }),
        ),
        Node::named("flatten", Op::Flatten),
        Node::named(
            "classifier",
            Op::Seq(vec![
                linear(ck, "classifier.0", 512 * 7 * 7, 4096)?,
                Node::named("classifier.1", Op::Relu),
                Node::named(
                    "classifier.2",
                    Op::Dropout {
                        p: 0.5,
                        channelwise: false,
                    },
                ),
                linear(ck, "classifier.3", 4096, 4096)?,
                Node::named("classifier.4", Op::Relu),
                Node::named(
                    "classifier.5",
                    Op::Dropout {
                        p: 0.5,
                        channelwise: false,
                    },
                ),
                linear(ck, "classifier.6", 4096, num_classes)?,
            ]),
        ),
    ])))
}

/// torchvision's AlexNet (the one-GPU variant: 64-192-384-256-256 kernels).
pub(super) fn alexnet(ck: &mut Checkpoint, classes: Option<usize>) -> Result<Node> {
    let num_classes = super::head_size(ck, classes, "classifier.6.weight", 1000);
    let features = vec![
        conv(ck, "features.0", cfg(3, 64, 11, 4, 2).bias(true))?,
        Node::named("features.1", Op::Relu),
        max_pool("features.2", 3, 2, 0)?,
        conv(ck, "features.3", cfg(64, 192, 5, 1, 2).bias(true))?,
        Node::named("features.4", Op::Relu),
        max_pool("features.5", 3, 2, 0)?,
        conv(ck, "features.6", cfg(192, 384, 3, 1, 1).bias(true))?,
        Node::named("features.7", Op::Relu),
        conv(ck, "features.8", cfg(384, 256, 3, 1, 1).bias(true))?,
        Node::named("features.9", Op::Relu),
        conv(ck, "features.10", cfg(256, 256, 3, 1, 1).bias(true))?,
        Node::named("features.11", Op::Relu),
        max_pool("features.12", 3, 2, 0)?,
    ];
    Ok(Node::anon(Op::Seq(vec![
        Node::named("features", Op::Seq(features)),
        Node::named(
            "avgpool",
            Op::AdaptiveAvgPool(AdaptiveAvgPool2d { output: (6, 6) }),
        ),
        Node::named("flatten", Op::Flatten),
        Node::named(
            "classifier",
            Op::Seq(vec![
                Node::named(
                    "classifier.0",
                    Op::Dropout {
                        p: 0.5,
                        channelwise: false,
                    },
                ),
                linear(ck, "classifier.1", 256 * 6 * 6, 4096)?,
                Node::named("classifier.2", Op::Relu),
                Node::named(
                    "classifier.3",
                    Op::Dropout {
                        p: 0.5,
                        channelwise: false,
                    },
                ),
                linear(ck, "classifier.4", 4096, 4096)?,
                Node::named("classifier.5", Op::Relu),
                linear(ck, "classifier.6", 4096, num_classes)?,
            ]),
        ),
    ])))
}
