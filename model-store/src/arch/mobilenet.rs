//! MobileNet v1 (Howard et al. 2017) as the TF-slim / TFLite models are laid
//! out: batch norm folded into conv biases, ReLU6, TensorFlow "SAME" padding
//! (a stride-2 3×3 on an even input pads 0 top/left and 1 bottom/right —
//! not PyTorch's `padding=1`). Names follow the TF-slim scopes.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::graph::{Node, Op};
use crate::layers::{AdaptiveAvgPool2d, Conv2d, ConvConfig, Linear, Padding};

/// TF-slim's channel counts at width 1.0 and the depthwise strides.
const CHANNELS: [usize; 14] = [
    32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024,
];
const STRIDES: [usize; 14] = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1];

pub(super) fn build(ck: &mut Checkpoint, classes: Option<usize>) -> Result<Node> {
    // The width multiplier is read off the first conv: 32·α output channels.
    let first = ck
        .shape_of("Conv2d_0.weight")
        .ok_or_else(|| Error::Checkpoint {
            problems: vec!["missing tensor 'Conv2d_0.weight'".into()],
        })?;
    let alpha = first[0] as f64 / 32.0;
    // TF-slim: depth(d) = max(int(d · α), 8).
    let depth = |d: usize| ((d as f64 * alpha) as usize).max(8);
    let num_classes = super::head_size(ck, classes, "Logits.weight", 1001);
    let conv = |ck: &mut Checkpoint,
                name: &str,
                cin: usize,
                cout: usize,
                k: usize,
                s: usize,
                groups: usize|
     -> Result<Node> {
        Ok(Node::named(
            name,
            Op::Conv(Conv2d::load(
                ck,
                name,
                ConvConfig::new(cin, cout, k)
                    .stride(s)
                    .padding(Padding::TfSame)
                    .groups(groups),
            )?),
        ))
    };
    let mut nodes = vec![
        conv(ck, "Conv2d_0", 3, depth(CHANNELS[0]), 3, STRIDES[0], 1)?,
        Node::named("Conv2d_0_relu6", Op::Relu6),
    ];
    let mut cin = depth(CHANNELS[0]);
    for i in 1..14 {
        let cout = depth(CHANNELS[i]);
        let dw = format!("Conv2d_{i}_depthwise");
        let pw = format!("Conv2d_{i}_pointwise");
        nodes.push(conv(ck, &dw, cin, cin, 3, STRIDES[i], cin)?);
        nodes.push(Node::named(format!("{dw}_relu6"), Op::Relu6));
        nodes.push(conv(ck, &pw, cin, cout, 1, 1, 1)?);
        nodes.push(Node::named(format!("{pw}_relu6"), Op::Relu6));
        cin = cout;
    }
    nodes.push(Node::named(
        "avgpool",
        Op::AdaptiveAvgPool(AdaptiveAvgPool2d { output: (1, 1) }),
    ));
    nodes.push(Node::named("flatten", Op::Flatten));
    nodes.push(Node::named(
        "Logits",
        Op::Linear(Linear::load(ck, "Logits", cin, num_classes, true)?),
    ));
    Ok(Node::anon(Op::Seq(nodes)))
}
