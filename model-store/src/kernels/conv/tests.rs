//! Randomized equivalence tests against candle's convolution, at every
//! kernel tier the CPU has, and finite differences where candle cannot.

use std::sync::Arc;

use candle_core::{Device, Var};

use super::*;
use crate::kernels::testing::Cases as Rng;
use crate::kernels::tier;

/// Every activation a convolution can fuse.
const ACTIVATIONS: [Activation; 7] = Activation::ALL;

/// A random case: the op, input, weight and bias (maybe empty).
fn case(rng: &mut Rng) -> (ConvOp, Tensor, Tensor, Tensor) {
    let groups = [1, 1, 2, 3][rng.below(4)];
    let depthwise = rng.below(4) == 0;
    let (cg, og) = if depthwise {
        (1, 1)
    } else {
        (1 + rng.below(4), 1 + rng.below(5))
    };
    let groups = if depthwise { 1 + rng.below(5) } else { groups };
    // Depthwise kernels up to 5×5 (MobileNet, EfficientNet, MnasNet).
    let most = if depthwise { 5 } else { 4 };
    let (kh, kw) = (1 + rng.below(most), 1 + rng.below(most));
    let op = ConvOp {
        stride: (1 + rng.below(3), 1 + rng.below(3)),
        dilation: (1 + rng.below(2), 1 + rng.below(2)),
        padding: (rng.below(3), rng.below(3), rng.below(3), rng.below(3)),
        groups,
        activation: ACTIVATIONS[rng.below(ACTIVATIONS.len())],
    };
    let (eh, ew) = (op.dilation.0 * (kh - 1) + 1, op.dilation.1 * (kw - 1) + 1);
    let (h, w) = (eh + rng.below(9), ew + rng.below(9));
    let n = 1 + rng.below(3);
    let x = rng.tensor(&[n, cg * groups, h, w]);
    let wt = rng.tensor(&[og * groups, cg, kh, kw]);
    let b = if rng.below(2) == 0 {
        rng.tensor(&[og * groups])
    } else {
        Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).unwrap()
    };
    (op, x, wt, b)
}

/// candle's own ops: pad, conv2d (equal strides/dilations only), bias, activation.
fn reference(op: &ConvOp, x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let (t, bo, l, r) = op.padding;
    let x = x
        .pad_with_zeros(2, t, bo)
        .unwrap()
        .pad_with_zeros(3, l, r)
        .unwrap();
    let mut y = x
        .conv2d(w, 0, op.stride.0, op.dilation.0, op.groups)
        .unwrap();
    if b.elem_count() > 0 {
        y = y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap();
    }
    op.activation.tensor(&y).unwrap()
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    let (a, b) = (to_vec(a).unwrap(), to_vec(b).unwrap());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-4 * y.abs().max(1.0),
            "{what}, element {i}: {x} vs {y}"
        );
    }
}

/// candle's conv2d takes one stride and one dilation; the cases where
/// both directions agree compare against it directly.
fn symmetric(op: &ConvOp) -> bool {
    op.stride.0 == op.stride.1 && op.dilation.0 == op.dilation.1
}

/// candle 0.11's conv backward (`conv_transpose2d` without output
/// padding) returns a wrongly sized input gradient when the stride does
/// not divide the padded input minus the kernel extent.
fn candle_differentiates(op: &ConvOp, x: &Tensor, w: &Tensor) -> bool {
    let (_, _, h, wd) = x.dims4().unwrap();
    let (_, _, kh, kw) = w.dims4().unwrap();
    let (t, b, l, r) = op.padding;
    let eh = op.dilation.0 * (kh - 1) + 1;
    let ew = op.dilation.1 * (kw - 1) + 1;
    symmetric(op)
        && (h + t + b - eh).is_multiple_of(op.stride.0)
        && (wd + l + r - ew).is_multiple_of(op.stride.1)
}

#[test]
fn forward_matches_candle_on_random_shapes() {
    // Groups, depthwise planes (a quarter of the cases) and every
    // activation, at each tier (the depthwise kernel and the activations
    // have a variant per tier).
    let tiers = tier::tested_tiers("convolution (groups, depthwise, activations) vs candle");
    let mut rng = Rng::new(3);
    let (mut checked, mut depthwise) = (0, 0);
    while checked < 400 {
        let (op, x, w, b) = case(&mut rng);
        if !symmetric(&op) {
            continue;
        }
        let what = format!("{op:?} x{:?} w{:?}", x.dims(), w.dims());
        let expected = reference(&op, &x, &w, &b);
        close(&x.apply_op3(&w, &b, op).unwrap(), &expected, &what);
        let d = op.dims(x.layout(), w.layout()).unwrap();
        depthwise += usize::from(op.depthwise(&d));
        let (xs, ws, bs) = (
            to_vec(&x).unwrap(),
            to_vec(&w).unwrap(),
            to_vec(&b).unwrap(),
        );
        for &t in &tiers {
            let y = op.forward_by(&d, &xs, &ws, &bs, t, None);
            let y = Tensor::from_vec(y, expected.dims(), &Device::Cpu).unwrap();
            close(&y, &expected, &format!("{what}, {t} tier"));
        }
        checked += 1;
    }
    assert!(depthwise >= 60, "only {depthwise} depthwise cases");
}

#[test]
fn the_direct_kernel_and_im2col_gemm_both_match_candle() {
    // One group, on channel counts on both sides of the kernel's
    // 8-channel blocks. Stride 1 takes the padded path, with output
    // widths that are whole vectors (16, 32: written straight out), 8
    // (two rows per vector, straight out when the rows pair up) and
    // others (cropped); other strides and 1×1 kernels take the
    // general path, which runs the kernel when the positions per image
    // are whole vectors (at AVX2, on fewer than 64 rows). A quarter of the
    // cases are grouped with 8 or 16 output channels a group (blocks that
    // each read one group's rows).
    let ways = tier::tested_tiers("direct convolution vs im2col + gemm");
    let mut rng = Rng::new(17);
    let (mut straight, mut split, mut cropped, mut general) = (0, 0, 0, 0);
    let mut grouped = 0;
    for case in 0..320 {
        let groups = if case % 4 == 1 { 2 + rng.below(2) } else { 1 };
        let pointwise = case % 8 == 7;
        let (kh, kw) = if pointwise {
            (1, 1)
        } else {
            (1 + rng.below(4), 1 + rng.below(4))
        };
        let s = if pointwise {
            1
        } else {
            [1, 1, 2, 3][rng.below(4)]
        };
        let dil = 1 + rng.below(2);
        let pad = if pointwise {
            (0, 0, 0, 0)
        } else {
            (rng.below(3), rng.below(3), rng.below(3), rng.below(3))
        };
        let op = ConvOp {
            stride: (s, s),
            dilation: (dil, dil),
            padding: pad,
            groups,
            activation: ACTIVATIONS[rng.below(ACTIVATIONS.len())],
        };
        let (eh, ew) = (dil * (kh - 1) + 1, dil * (kw - 1) + 1);
        // An output width of 8, 16 or 32 half the time, any other else.
        let ow = if case % 2 == 0 {
            [8, 16, 32][rng.below(3)]
        } else {
            1 + rng.below(40)
        };
        let oh = 1 + rng.below(12);
        // The input that gives that output (at least 1 wide).
        let w = ((ow - 1) * s + ew).saturating_sub(pad.2 + pad.3).max(1);
        let h = ((oh - 1) * s + eh).saturating_sub(pad.0 + pad.1).max(1);
        if h + pad.0 + pad.1 < eh || w + pad.2 + pad.3 < ew {
            continue;
        }
        // Two or more outputs: one input and one output is depthwise.
        let (n, c, o) = if groups > 1 {
            let (cg, og) = (1 + rng.below(4), [8, 16][rng.below(2)]);
            (1 + rng.below(3), cg * groups, og * groups)
        } else {
            (1 + rng.below(3), 1 + rng.below(6), 2 + rng.below(19))
        };
        let x = rng.tensor(&[n, c, h, w]);
        let wt = rng.tensor(&[o, c / groups, kh, kw]);
        let b = if rng.below(2) == 0 {
            rng.tensor(&[o])
        } else {
            Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).unwrap()
        };
        let what = format!("{op:?} x{:?} w{:?}", x.dims(), wt.dims());
        let expected = reference(&op, &x, &wt, &b);
        let d = op.dims(x.layout(), wt.layout()).unwrap();
        grouped += usize::from(groups > 1 && op.direct_groups(&d));
        if op.padded_path(&d, true) {
            if d.ow.is_multiple_of(direct::LANES) {
                straight += 1;
            } else if d.ow == 8 && d.oh.is_multiple_of(2) {
                split += 1;
            } else {
                cropped += 1;
            }
        } else if d.p().is_multiple_of(direct::LANES)
            && forward::direct_takes_rows(tier::Tier::Avx2, d.k())
        {
            // The kernel runs here at both tiers (at AVX2 on fewer than
            // 64 rows; gemm takes more).
            general += 1;
        }
        let (xs, ws, bs) = (
            to_vec(&x).unwrap(),
            to_vec(&wt).unwrap(),
            to_vec(&b).unwrap(),
        );
        for &t in &ways {
            let y = op.forward_by(&d, &xs, &ws, &bs, t, None);
            let y = Tensor::from_vec(y, expected.dims(), &Device::Cpu).unwrap();
            close(&y, &expected, &format!("{what}, {t} tier"));
        }
    }
    assert!(
        straight >= 30 && split >= 10 && cropped >= 40 && general >= 20 && grouped >= 60,
        "too few cases of a path: {straight} straight, {split} split, {cropped} cropped, \
         {general} general, {grouped} grouped"
    );
}

#[test]
fn weights_are_packed_at_load_wherever_the_direct_kernel_reads_them() {
    // `packs` decides at load from the layer alone; the plan decides per
    // call. A layer the kernel runs on must have packed weights, or every
    // call would pack them again.
    let mut rng = Rng::new(29);
    let mut direct = 0;
    for _ in 0..2000 {
        let groups = [1, 1, 2, 4][rng.below(4)];
        let (cg, og) = (1 + rng.below(80), [1, 3, 8, 16][rng.below(4)]);
        let (kh, kw) = [(1, 1), (1, 1), (3, 3), (7, 7), (1, 3)][rng.below(5)];
        let s = 1 + rng.below(2);
        let pad = [(0, 0, 0, 0), (0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 1)][rng.below(4)];
        let op = ConvOp {
            stride: (s, s),
            dilation: (1, 1),
            padding: pad,
            groups,
            activation: Activation::Identity,
        };
        let (h, w) = (
            kh + rng.below(40),
            kw + [0, 16, 32][rng.below(3)] + rng.below(2),
        );
        let x = Tensor::zeros(
            (1, cg * groups, h, w),
            candle_core::DType::F32,
            &Device::Cpu,
        );
        let wt = Tensor::zeros(
            (og * groups, cg, kh, kw),
            candle_core::DType::F32,
            &Device::Cpu,
        );
        let d = op.dims(x.unwrap().layout(), wt.unwrap().layout()).unwrap();
        let padded = pad != (0, 0, 0, 0);
        let packed = packs(og * groups, groups, s, (cg, kh, kw), padded);
        if op.runs_direct(&d, tier::active()) {
            direct += 1;
            assert!(
                packed,
                "{op:?} {d:?}: the kernel runs, its weights are not packed"
            );
        }
    }
    // On a CPU without the kernel (or capped to portable) nothing runs it.
    assert!(
        direct > 100 || crate::kernels::direct::kernel().is_none(),
        "{direct}"
    );
}

#[test]
fn weights_packed_once_give_the_same_outputs() {
    let tiers = tier::tested_tiers("weights packed once for the direct convolution");
    if !tiers.into_iter().any(|t| direct::kernel_at(t).is_some()) {
        return; // said above: no tier here runs the direct kernel
    }
    let mut rng = Rng::new(23);
    let mut checked = 0;
    while checked < 60 {
        let (op, x, w, b) = case(&mut rng);
        let (o, cg, kh, kw) = w.dims4().unwrap();
        if op.groups != 1 {
            continue;
        }
        // Packed directly, so a CONVSCOPE_KERNELS cap does not skip it.
        let packed: Arc<[f32]> = Arc::from(direct::pack(&to_vec(&w).unwrap(), o, cg * kh * kw));
        let what = format!("{op:?} x{:?} w{:?}", x.dims(), w.dims());
        let ours = x
            .apply_op3(
                &w,
                &b,
                PackedConvOp {
                    base: op,
                    packed: packed.clone(),
                    transposed: None,
                },
            )
            .unwrap();
        close(&ours, &x.apply_op3(&w, &b, op).unwrap(), &what);
        // Packed for another shape: refused, not misread.
        let short: Arc<[f32]> = Arc::from(&packed[..packed.len() - 1]);
        assert!(
            x.apply_op3(
                &w,
                &b,
                PackedConvOp {
                    base: op,
                    packed: short,
                    transposed: None,
                }
            )
            .is_err(),
            "{what}"
        );
        checked += 1;
    }
}

#[test]
fn no_input_channels_give_the_bias() {
    // Reachable from a manifest; every path must answer, not panic.
    for (stride, kernel) in [(1, 3), (2, 3), (1, 1)] {
        let op = ConvOp {
            stride: (stride, stride),
            dilation: (1, 1),
            padding: (1, 1, 1, 1),
            groups: 1,
            activation: Activation::Identity,
        };
        let x = Tensor::zeros((2, 0, 8, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros(
            (3, 0, kernel, kernel),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let b = Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let y = x.apply_op3(&w, &b, op).unwrap();
        let values = to_vec(&y).unwrap();
        let plane = values.len() / 6;
        for (i, v) in values.iter().enumerate() {
            assert_eq!(*v, [1f32, -2.0, 3.0][i / plane % 3], "{op:?}");
        }
    }
}

#[test]
fn batches_and_threads_agree_with_one_image_at_a_time() {
    // A batch runs one image per task; one image runs gemm on the pool.
    let mut rng = Rng::new(5);
    for _ in 0..40 {
        let (op, x, w, b) = case(&mut rng);
        let n = x.dim(0).unwrap();
        let batch = x.apply_op3(&w, &b, op).unwrap();
        for i in 0..n {
            let one = x.narrow(0, i, 1).unwrap().apply_op3(&w, &b, op).unwrap();
            close(&one, &batch.narrow(0, i, 1).unwrap(), &format!("{op:?}"));
        }
    }
}

#[test]
fn backward_matches_candle_on_random_shapes() {
    let mut rng = Rng::new(9);
    let mut checked = 0;
    while checked < 150 {
        let (op, x, w, b) = case(&mut rng);
        if !candle_differentiates(&op, &x, &w) {
            continue;
        }
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let bv = Var::from_tensor(&b).unwrap();
        let bias = if b.elem_count() > 0 {
            bv.as_tensor().clone()
        } else {
            b.clone()
        };
        // A loss that weighs every output differently.
        let probe = rng.tensor(reference(&op, &x, &w, &b).dims());
        let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let ours = grads(xv.as_tensor().apply_op3(wv.as_tensor(), &bias, op).unwrap());
        let theirs = grads(reference(&op, xv.as_tensor(), wv.as_tensor(), &bias));
        let what = format!("{op:?} x{:?} w{:?}", x.dims(), w.dims());
        close(
            ours.get(xv.as_tensor()).unwrap(),
            theirs.get(xv.as_tensor()).unwrap(),
            &format!("dx {what}"),
        );
        close(
            ours.get(wv.as_tensor()).unwrap(),
            theirs.get(wv.as_tensor()).unwrap(),
            &format!("dw {what}"),
        );
        if b.elem_count() > 0 {
            close(
                ours.get(&bias).unwrap(),
                theirs.get(&bias).unwrap(),
                &format!("db {what}"),
            );
        }
        checked += 1;
    }
}

#[test]
fn what_candle_cannot_do_matches_finite_differences() {
    // Unequal strides or dilations, and strides that leave input
    // columns unused: check the forward against per-direction
    // subsampling of a stride-1 run, and the gradient numerically.
    let mut rng = Rng::new(13);
    let mut checked = 0;
    while checked < 40 {
        let (op, x, w, b) = case(&mut rng);
        if candle_differentiates(&op, &x, &w) || op.activation != Activation::Identity {
            continue;
        }
        let dense = ConvOp {
            stride: (1, 1),
            ..op
        };
        let full = x.apply_op3(&w, &b, dense).unwrap();
        let ours = x.apply_op3(&w, &b, op).unwrap();
        let (_, _, oh, ow) = ours.dims4().unwrap();
        let rows: Vec<u32> = (0..oh as u32).map(|i| i * op.stride.0 as u32).collect();
        let cols: Vec<u32> = (0..ow as u32).map(|i| i * op.stride.1 as u32).collect();
        let sub = full
            .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(), 2)
            .unwrap()
            .index_select(&Tensor::new(cols.as_slice(), &Device::Cpu).unwrap(), 3)
            .unwrap();
        close(&ours, &sub, &format!("{op:?}"));
        // d/dx of Σ probe·y, against central differences in f64.
        let probe = to_vec(&rng.tensor(ours.dims())).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y = xv.as_tensor().apply_op3(&w, &b, op).unwrap();
        let pt = Tensor::from_vec(probe.clone(), y.shape(), &Device::Cpu).unwrap();
        let dx = to_vec(
            (y * pt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
                .get(xv.as_tensor())
                .unwrap(),
        )
        .unwrap();
        let xs = to_vec(&x).unwrap();
        let loss = |v: &[f32]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), x.shape(), &Device::Cpu).unwrap();
            to_vec(&t.apply_op3(&w, &b, op).unwrap())
                .unwrap()
                .iter()
                .zip(&probe)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum()
        };
        for i in (0..xs.len()).step_by(7) {
            let (mut up, mut down) = (xs.clone(), xs.clone());
            up[i] += 1e-2;
            down[i] -= 1e-2;
            let numeric = (loss(&up) - loss(&down)) / 2e-2;
            assert!(
                (numeric - dx[i] as f64).abs() < 1e-2,
                "{op:?} element {i}: {numeric} vs {}",
                dx[i]
            );
        }
        checked += 1;
    }
}

#[test]
fn only_the_gradients_asked_for_are_computed() {
    let mut rng = Rng::new(17);
    let x = Var::from_tensor(&rng.tensor(&[2, 4, 6, 6])).unwrap();
    let w = rng.tensor(&[3, 4, 3, 3]);
    let b = rng.tensor(&[3]);
    let op = ConvOp {
        stride: (1, 1),
        dilation: (1, 1),
        padding: (1, 1, 1, 1),
        groups: 1,
        activation: Activation::Relu,
    };
    let y = x.as_tensor().apply_op3(&w, &b, op).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(x.as_tensor()).is_some());
    assert!(
        grads.get(&w).is_none(),
        "a constant weight gets no gradient"
    );
    assert!(grads.get(&b).is_none(), "a constant bias gets no gradient");
}

#[test]
fn a_wide_layers_input_gradient_runs_winograd_and_matches_col2im() {
    // From 128 channels on both sides the transposed convolution runs
    // Winograd F(2×2, 3×3); held to the `Wᵀ·G` + col2im gradient, per image,
    // with asymmetric and full paddings, odd and even sizes, a batch of 2.
    let mut rng = Rng::new(17);
    for (c, o, h, w, padding) in [
        (128, 128, 7, 6, (1, 1, 1, 1)),
        (130, 160, 5, 9, (0, 2, 1, 0)),
        (128, 144, 4, 4, (2, 2, 2, 2)),
    ] {
        let op = ConvOp {
            stride: (1, 1),
            dilation: (1, 1),
            padding,
            groups: 1,
            activation: Activation::Identity,
        };
        let x = rng.tensor(&[2, c, h, w]);
        let wt = rng.tensor(&[o, c, 3, 3]);
        let d = op.dims(x.layout(), wt.layout()).unwrap();
        assert!(crate::kernels::winograd::pays_for(d.c, d.o));
        let g = to_vec(&rng.tensor(&[2, o, d.oh, d.ow])).unwrap();
        let wv = to_vec(&wt).unwrap();
        let u = crate::kernels::winograd::transform_transposed(&wv, o, c).into();
        let t = op.transposed(&d).expect("a transposed convolution");
        let fast = t.input_grad(&d, &wv, &g, Some(&u));
        // Winograd ran: it rounds unlike the direct transposed convolution
        // (the fallback when the transform does not fit is silent).
        assert_ne!(
            fast,
            t.input_grad(&d, &wv, &g, None),
            "{c}->{o}: no Winograd"
        );
        let plane = c * h * w;
        let mut slow = vec![0f32; 2 * plane];
        for (i, dx) in slow.chunks_mut(plane).enumerate() {
            let p = o * d.oh * d.ow;
            op.input_grad_image(&d, &wv, &g[i * p..(i + 1) * p], dx);
        }
        let shape = [2, c, h, w];
        close(
            &Tensor::from_vec(fast, &shape, &Device::Cpu).unwrap(),
            &Tensor::from_vec(slow, &shape, &Device::Cpu).unwrap(),
            &format!("{c}->{o} {h}x{w} {padding:?}"),
        );
    }
}
