//! The forward pass of a batch of images that each differ from one base
//! image only inside a rectangle of their own: occlusion's patched images.
//!
//! A patch changes only what lies in its receptive field: after each layer
//! a window that grows by the kernel and shrinks by the stride. So every
//! value of the pass is kept as the base image's value (computed once)
//! plus, per image, its window's contents (one `[B, C, h, w]` crop for the
//! batch: every image's window has the same size, its start clamped into
//! the plane). A convolution or pool reads each window with its halo, the
//! base's values around the crop and the padding value past the edge, and
//! computes only the window's outputs; elementwise steps run on the crops.
//! Once a window covers most of its plane (and for any step without a
//! window rule: linear layers, global pools, reshapes), the value becomes
//! the whole batch and the pass goes on as [`Dag::forward`] does.
//!
//! For ResNet-18 at 224² and a 16² patch the windows stay under a fifth of
//! the planes up to `layer2`, which carries half of the network's
//! multiply-adds. Results are those of the whole pass to float32 rounding.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::ops::{BinOp, GraphOp};
use super::{Dag, DagNode, INPUT};
use crate::error::{Error, Result};
use crate::kernels::conv::Activation;
use crate::layers::{Padding, PoolKind};
use crate::tap::ReluRule;

/// A window covering at least this share of its plane is computed whole:
/// the halo reads and copies would cost more than they save.
const DENSE_SHARE: f64 = 0.6;

/// Where each image's window lies along one axis: every image's has the
/// length `len`; `start[b]` is image `b`'s first index.
#[derive(Debug, Clone, PartialEq)]
struct Span {
    start: Vec<usize>,
    len: usize,
}

impl Span {
    /// The outputs of a kernel of extent `ke` (dilation included), stride
    /// `s` and leading padding `p` that read this span, out of `out`.
    fn through(&self, ke: usize, s: usize, p: usize, out: usize) -> Span {
        let ranges: Vec<(usize, usize)> = self
            .start
            .iter()
            .map(|&a| {
                let first = (a + p + 1).saturating_sub(ke).div_ceil(s);
                let last = ((a + self.len - 1 + p) / s).min(out - 1);
                (first.min(last), last)
            })
            .collect();
        Span::covering(&ranges, out)
    }

    /// One length for every image's `(first, last)`, starts clamped so the
    /// windows stay inside `0..size`.
    fn covering(ranges: &[(usize, usize)], size: usize) -> Span {
        let len = ranges
            .iter()
            .map(|&(f, l)| l + 1 - f)
            .max()
            .unwrap_or(1)
            .min(size);
        Span {
            start: ranges.iter().map(|&(f, _)| f.min(size - len)).collect(),
            len,
        }
    }

    /// The smallest span holding both, per image.
    fn union(&self, other: &Span, size: usize) -> Span {
        let ranges: Vec<(usize, usize)> = self
            .start
            .iter()
            .zip(&other.start)
            .map(|(&a, &b)| (a.min(b), (a + self.len).max(b + other.len) - 1))
            .collect();
        Span::covering(&ranges, size)
    }
}

/// A value of the pass.
#[derive(Clone)]
enum Val {
    /// The base image's value `[C, H, W]` except inside each image's window.
    Win(Arc<Win>),
    /// The whole batch.
    Dense(Tensor),
}

/// See [`Val::Win`].
struct Win {
    base: Arc<Vec<f32>>,
    c: usize,
    h: usize,
    w: usize,
    ys: Span,
    xs: Span,
    /// `[B, C, ys.len, xs.len]`.
    crop: Tensor,
}

impl Win {
    fn batch(&self) -> usize {
        self.ys.start.len()
    }

    /// Rows `y0[b]..y0[b] + hl`, columns `x0[b]..x0[b] + wl` of every
    /// image (negative or past the edge: `fill`), as `[B, C, hl, wl]`.
    fn read(&self, y0: &[isize], hl: usize, x0: &[isize], wl: usize, fill: f32) -> Result<Tensor> {
        let crop = self.crop.flatten_all()?.to_vec1::<f32>()?;
        let (c, h, w) = (self.c, self.h, self.w);
        let (ch, cw) = (self.ys.len, self.xs.len);
        let mut out = vec![fill; self.batch() * c * hl * wl];
        out.par_chunks_mut(hl * wl)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (b, ch_i) = (plane / c, plane % c);
                let base = &self.base[ch_i * h * w..(ch_i + 1) * h * w];
                let crop = &crop[plane * ch * cw..(plane + 1) * ch * cw];
                let (wy, wx) = (self.ys.start[b] as isize, self.xs.start[b] as isize);
                // Columns inside the image, and inside the window.
                let (lo, hi) = ((-x0[b]).max(0), (w as isize - x0[b]).min(wl as isize));
                let (clo, chi) = ((wx - x0[b]).max(lo), (wx + cw as isize - x0[b]).min(hi));
                for (r, row) in dst.chunks_exact_mut(wl).enumerate() {
                    let iy = y0[b] + r as isize;
                    if !(0..h as isize).contains(&iy) || lo >= hi {
                        continue;
                    }
                    let src = &base[iy as usize * w..(iy as usize + 1) * w];
                    let at = |col: isize| (col + x0[b]) as usize;
                    row[lo as usize..hi as usize].copy_from_slice(&src[at(lo)..at(hi)]);
                    if (wy..wy + ch as isize).contains(&iy) && clo < chi {
                        let cr = (iy - wy) as usize * cw;
                        let cx = |col: isize| (col + x0[b] - wx) as usize;
                        row[clo as usize..chi as usize]
                            .copy_from_slice(&crop[cr + cx(clo)..cr + cx(chi)]);
                    }
                }
            });
        Ok(Tensor::from_vec(
            out,
            (self.batch(), c, hl, wl),
            self.crop.device(),
        )?)
    }

    /// The window `ys × xs` (a superset of this one's), as a crop.
    fn read_span(&self, ys: &Span, xs: &Span) -> Result<Tensor> {
        let signed = |s: &Span| s.start.iter().map(|&v| v as isize).collect::<Vec<_>>();
        self.read(&signed(ys), ys.len, &signed(xs), xs.len, 0.0)
    }

    /// Every image whole, `[B, C, H, W]`.
    fn dense(&self) -> Result<Tensor> {
        let zeros = vec![0isize; self.batch()];
        self.read(&zeros, self.h, &zeros, self.w, 0.0)
    }
}

impl Val {
    fn dense(&self) -> Result<Tensor> {
        match self {
            Val::Win(w) => w.dense(),
            Val::Dense(t) => Ok(t.clone()),
        }
    }
}

/// A node's output for the base image, `[C, H, W]` flattened.
fn host(t: &Tensor) -> Result<Arc<Vec<f32>>> {
    Ok(Arc::new(t.flatten_all()?.to_vec1::<f32>()?))
}

/// The base image's pass, computed once for all its windowed batches
/// ([`Dag::base_pass`]).
pub struct BasePass {
    /// `[1, C, H, W]`.
    image: Tensor,
    pixels: Arc<Vec<f32>>,
    /// The output of each node a window's value may need (a fused chain's
    /// last node or a node alone), when it is a feature map.
    values: Vec<Option<Arc<Vec<f32>>>>,
}

impl Dag {
    /// The output of node `stop` (or of the network) for a batch of
    /// images, image `b` being `base` (`[1, C, H, W]`) but for rows
    /// `at[b].0..+crop_h` and columns `at[b].1..+crop_w`, which are
    /// `crops[b]` (`[B, C, crop_h, crop_w]`, inside the image). Float32 on
    /// the CPU; the same values as [`Dag::forward`] of the whole batch.
    pub fn forward_windowed(
        &self,
        base: &BasePass,
        crops: &Tensor,
        at: &[(usize, usize)],
        stop: Option<&str>,
    ) -> Result<Tensor> {
        let (_, c, h, w) = base.image.dims4()?;
        let (b, cc, ch, cw) = crops.dims4()?;
        if at.len() != b
            || cc != c
            || ch == 0
            || cw == 0
            || at.iter().any(|&(y, x)| y + ch > h || x + cw > w)
        {
            return Err(Error::Shape {
                layer: "input".into(),
                reason: format!(
                    "windowed pass: {b} crops of {cc}x{ch}x{cw} at {} places must each lie inside the {c}x{h}x{w} image",
                    at.len()
                ),
            });
        }
        let bases = &base.values;
        let n = self.nodes.len();
        let mut vals: Vec<Option<Val>> = vec![None; n];
        let mut covered = vec![false; n];
        let input = Val::Win(Arc::new(Win {
            base: base.pixels.clone(),
            c,
            h,
            w,
            ys: Span {
                start: at.iter().map(|a| a.0).collect(),
                len: ch,
            },
            xs: Span {
                start: at.iter().map(|a| a.1).collect(),
                len: cw,
            },
            crop: crops.contiguous()?,
        }));
        let mut latest = input.clone();
        for i in 0..n {
            if !covered[i] {
                let node = &self.nodes[i];
                // No taps watch this pass: every fusion applies.
                let fused = self.fusions[i].as_ref();
                let inputs = node
                    .inputs
                    .iter()
                    .map(|&j| {
                        if j == INPUT {
                            Ok(input.clone())
                        } else {
                            vals[j].clone().ok_or_else(|| Error::Shape {
                                layer: node.name.clone(),
                                reason: format!("input '{}' was not computed", self.nodes[j].name),
                            })
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                let last = fused.map_or(i, |f| *f.covers.last().expect("non-empty"));
                let y = self
                    .windowed_step(i, last, &inputs, fused.map(|f| f.activation), bases)
                    .map_err(|e| match e {
                        Error::Candle(source) => Error::Forward {
                            layer: self.nodes[last].name.clone(),
                            source,
                        },
                        e => e,
                    })?;
                if let Some(f) = fused {
                    for &j in &f.covers {
                        covered[j] = true;
                    }
                }
                let out = &self.nodes[last];
                if let Some(stop) = stop
                    && (out.name == stop || out.aliases.iter().any(|a| a.name == stop))
                {
                    return y.dense();
                }
                latest = y.clone();
                vals[last] = Some(y);
            }
            for &j in &self.frees[i] {
                vals[j] = None;
            }
        }
        if let Some(stop) = stop {
            return Err(Error::Shape {
                layer: stop.to_string(),
                reason: "the windowed pass never computed this layer on its own".into(),
            });
        }
        vals[self.output].take().unwrap_or(latest).dense()
    }

    /// The pass of `image` (`[1, C, H, W]`, float32 on the CPU, the size
    /// the network was built for) that [`Dag::forward_windowed`] takes the
    /// values outside each window from.
    pub fn base_pass(&self, image: &Tensor) -> Result<BasePass> {
        let (n, _, _, _) = image.dims4()?;
        if n != 1 || !image.device().is_cpu() || image.dtype() != DType::F32 {
            return Err(Error::Shape {
                layer: "input".into(),
                reason: "the windowed pass takes one float32 image on the CPU".into(),
            });
        }
        // Only a fused chain's last node (or a node alone) is ever read.
        let mut needed = vec![true; self.nodes.len()];
        for (i, f) in self.fusions.iter().enumerate() {
            if let Some(f) = f {
                needed[i] = false;
                for &j in &f.covers[..f.covers.len() - 1] {
                    needed[j] = false;
                }
            }
        }
        let mut values = vec![None; self.nodes.len()];
        let mut k = 0;
        self.run_with(image, |node, inputs| {
            let y = self
                .unfused(node, inputs, ReluRule::Autograd)
                .map_err(|source| Error::Forward {
                    layer: node.name.clone(),
                    source,
                })?;
            if y.rank() == 4 && y.dims() != self.shapes[k].as_slice() {
                return Err(Error::Shape {
                    layer: node.name.clone(),
                    reason: format!(
                        "the windowed pass needs the input size the network was built for: output {:?}, expected {:?}",
                        y.dims(),
                        self.shapes[k]
                    ),
                });
            }
            if needed[k] && y.rank() == 4 {
                values[k] = Some(host(&y)?);
            }
            k += 1;
            Ok(y)
        })?;
        Ok(BasePass {
            pixels: host(image)?,
            image: image.clone(),
            values,
        })
    }

    /// Node `i` (through `last`, when fused with `activation`) on windowed
    /// inputs: a window when a rule keeps one, else the whole batch.
    fn windowed_step(
        &self,
        i: usize,
        last: usize,
        inputs: &[Val],
        activation: Option<Activation>,
        bases: &[Option<Arc<Vec<f32>>>],
    ) -> Result<Val> {
        let node = &self.nodes[i];
        let shape = &self.shapes[last];
        let base = bases[last].clone();
        let wins: Option<Vec<&Arc<Win>>> = inputs
            .iter()
            .map(|v| match v {
                Val::Win(w) => Some(w),
                Val::Dense(_) => None,
            })
            .collect();
        let (Some(wins), Some(base), &[_, oc, oh, ow]) = (wins, base, &shape[..]) else {
            return self.dense_step(i, last, inputs, activation);
        };
        let keep = |ys: Span, xs: Span, crop: Tensor| -> Result<Val> {
            Ok(Val::Win(Arc::new(Win {
                base: base.clone(),
                c: oc,
                h: oh,
                w: ow,
                ys,
                xs,
                crop,
            })))
        };
        let small =
            |ys: &Span, xs: &Span| ((ys.len * xs.len) as f64) < DENSE_SHARE * (oh * ow) as f64;
        match (&node.op, &wins[..]) {
            (GraphOp::Conv(conv), [x]) => {
                let (_, _, kh, kw) = conv.kernel();
                let (top, _, left, _) = conv.pads(x.h, x.w);
                let (s, d) = (conv.stride, conv.dilation);
                let (keh, kew) = (d * (kh - 1) + 1, d * (kw - 1) + 1);
                let ys = x.ys.through(keh, s, top, oh);
                let xs = x.xs.through(kew, s, left, ow);
                if !small(&ys, &xs) {
                    return self.dense_step(i, last, inputs, activation);
                }
                let rows = |sp: &Span, p: usize| -> Vec<isize> {
                    sp.start
                        .iter()
                        .map(|&o| (o * s) as isize - p as isize)
                        .collect()
                };
                let src = x.read(
                    &rows(&ys, top),
                    (ys.len - 1) * s + keh,
                    &rows(&xs, left),
                    (xs.len - 1) * s + kew,
                    0.0,
                )?;
                let mut unpadded = conv.clone();
                unpadded.padding = Padding::Explicit(0, 0, 0, 0);
                let y = match activation {
                    Some(a) => {
                        let p = conv.prepared.as_deref().expect("prepared at build");
                        unpadded.forward_fused(&src, p, a)?
                    }
                    None => unpadded.forward(&src)?,
                };
                keep(ys, xs, y)
            }
            (GraphOp::Pool(pool), [x])
                if pool.kind == PoolKind::Max || (pool.count_include_pad && !pool.ceil_mode) =>
            {
                let (k, s, p) = (pool.kernel, pool.stride, pool.padding);
                let ys = x.ys.through(k.0, s.0, p.0, oh);
                let xs = x.xs.through(k.1, s.1, p.1, ow);
                if !small(&ys, &xs) {
                    return self.dense_step(i, last, inputs, activation);
                }
                let rows = |sp: &Span, s: usize, p: usize| -> Vec<isize> {
                    sp.start
                        .iter()
                        .map(|&o| (o * s) as isize - p as isize)
                        .collect()
                };
                let fill = if pool.kind == PoolKind::Max {
                    f32::NEG_INFINITY
                } else {
                    0.0
                };
                let src = x.read(
                    &rows(&ys, s.0, p.0),
                    (ys.len - 1) * s.0 + k.0,
                    &rows(&xs, s.1, p.1),
                    (xs.len - 1) * s.1 + k.1,
                    fill,
                )?;
                let mut unpadded = pool.clone();
                unpadded.padding = (0, 0);
                unpadded.ceil_mode = false;
                keep(ys, xs, unpadded.forward(&src)?)
            }
            (GraphOp::BatchNorm(bn), [x]) => keep(
                x.ys.clone(),
                x.xs.clone(),
                bn.forward_with(&x.crop, activation.unwrap_or(Activation::Identity))?,
            ),
            (GraphOp::Unary(_) | GraphOp::Identity { .. }, [x])
            | (
                GraphOp::Binary {
                    scalar: Some(_), ..
                },
                [x],
            ) => keep(x.ys.clone(), x.xs.clone(), node.op.forward(&[&x.crop])?),
            (GraphOp::Binary { op, scalar: None }, [a, b])
                if (a.c, a.h, a.w) == (b.c, b.h, b.w) && (a.h, a.w) == (oh, ow) =>
            {
                let (ys, xs) = (a.ys.union(&b.ys, oh), a.xs.union(&b.xs, ow));
                if !small(&ys, &xs) {
                    return self.dense_step(i, last, inputs, activation);
                }
                let (ca, cb) = (a.read_span(&ys, &xs)?, b.read_span(&ys, &xs)?);
                let y = match (op, activation) {
                    (BinOp::Add, Some(Activation::Relu)) => {
                        crate::kernels::elementwise::add_relu(&ca, &cb)?
                    }
                    _ => node.op.forward(&[&ca, &cb])?,
                };
                keep(ys, xs, y)
            }
            (GraphOp::Cat { dim }, wins)
                if (*dim == 1 || *dim == -3) && wins.iter().all(|v| (v.h, v.w) == (oh, ow)) =>
            {
                let (mut ys, mut xs) = (wins[0].ys.clone(), wins[0].xs.clone());
                for v in &wins[1..] {
                    ys = ys.union(&v.ys, oh);
                    xs = xs.union(&v.xs, ow);
                }
                if !small(&ys, &xs) {
                    return self.dense_step(i, last, inputs, activation);
                }
                let crops = wins
                    .iter()
                    .map(|v| v.read_span(&ys, &xs))
                    .collect::<Result<Vec<_>>>()?;
                keep(ys, xs, Tensor::cat(&crops, 1)?)
            }
            _ => self.dense_step(i, last, inputs, activation),
        }
    }

    /// Node `i` (fused through `last`) on whole batches, as
    /// [`Dag::forward`] computes it.
    fn dense_step(
        &self,
        i: usize,
        last: usize,
        inputs: &[Val],
        activation: Option<Activation>,
    ) -> Result<Val> {
        let node: &DagNode = &self.nodes[i];
        let dense = inputs.iter().map(Val::dense).collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Tensor> = dense.iter().collect();
        let y = match activation {
            Some(a) => super::fused_kernel(node, &refs, a),
            None => self.unfused(node, &refs, ReluRule::Autograd),
        }
        .map_err(|source| Error::Forward {
            layer: self.nodes[last].name.clone(),
            source,
        })?;
        Ok(Val::Dense(y))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use crate::model::LoadedModel;
    use crate::rng::Rng;

    fn bundled(name: &str) -> LoadedModel {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        LoadedModel::from_files(&dir.join(format!("{name}.json")), &Device::Cpu).unwrap()
    }

    fn weightless(name: &str) -> LoadedModel {
        const EMPTY: &[u8] = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ";
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/graph_build");
        LoadedModel::from_bytes(&std::fs::read(dir.join(name)).unwrap(), EMPTY, &Device::Cpu)
            .unwrap()
    }

    /// Random windows (at the edges too, square and not) on every bundled
    /// architecture: the windowed pass gives the whole pass's logits.
    #[test]
    fn windowed_logits_are_the_whole_batchs() {
        let mut models: Vec<(String, LoadedModel)> = [
            "resnet20-cifar10",
            "mobilenet-v1-0.25-128",
            "cnn-a-mnist",
            "captum-cifar-net",
        ]
        .iter()
        .map(|n| (n.to_string(), bundled(n)))
        .collect();
        for g in ["residual.json", "shuffle.json"] {
            models.push((g.to_string(), weightless(g)));
        }
        let mut rng = Rng::new(11);
        for (name, model) in &models {
            let (c, h, w) = model.network.input();
            let img: Vec<f32> = (0..c * h * w).map(|_| rng.normal()).collect();
            let base = Tensor::from_vec(img.clone(), (1, c, h, w), &Device::Cpu).unwrap();
            for (wh, ww) in [(1, 1), (4, 4), (h.min(8), w.min(5)), (h, w)] {
                let n = 5;
                let at: Vec<(usize, usize)> = (0..n)
                    .map(|i| match i {
                        0 => (0, 0),
                        1 => (h - wh, w - ww),
                        _ => (
                            (rng.uniform() * (h - wh + 1) as f64) as usize,
                            (rng.uniform() * (w - ww + 1) as f64) as usize,
                        ),
                    })
                    .map(|(y, x)| (y.min(h - wh), x.min(w - ww)))
                    .collect();
                let crops: Vec<f32> = (0..n * c * wh * ww).map(|_| rng.normal()).collect();
                let mut whole = Vec::new();
                for (b, &(y0, x0)) in at.iter().enumerate() {
                    let mut one = img.clone();
                    for ch in 0..c {
                        for y in 0..wh {
                            for x in 0..ww {
                                one[ch * h * w + (y0 + y) * w + x0 + x] =
                                    crops[((b * c + ch) * wh + y) * ww + x];
                            }
                        }
                    }
                    whole.extend(one);
                }
                let whole = Tensor::from_vec(whole, (n, c, h, w), &Device::Cpu).unwrap();
                let crops = Tensor::from_vec(crops, (n, c, wh, ww), &Device::Cpu).unwrap();
                let want = model.logits(&whole).unwrap();
                let pass = model.network.dag().base_pass(&base).unwrap();
                let got = model.logits_windowed(&pass, &crops, &at).unwrap();
                assert_eq!(got.dims(), want.dims(), "{name}");
                let (g, e) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                let scale = e.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                for (i, (a, b)) in g.iter().zip(&e).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{name}, window {wh}x{ww} at {at:?}, logit {i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
