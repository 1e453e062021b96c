//! Datasets a job can train and evaluate on, found under one directory:
//!
//! - `mnist/`: the four idx files (`train-images-idx3-ubyte[.gz]`, ...) → `mnist`;
//! - `cifar10/`: the binary batches (`data_batch_1.bin` … `test_batch.bin`) →
//!   `cifar10`; with only `cifar10_test_first1000.bin` (what this repository
//!   carries), → `cifar10-sample`: those 1000 real test images, the first
//!   800 to train on and the last 200 to test;
//! - `imagefolder/<name>/<class>/*.png|jpg|...` → `<name>`, one sub-folder
//!   per class, split into train and test by `test_fraction` (seeded).
//!
//! Images stay `u8` in memory (MNIST's 60,000 are 47 MB); batches are
//! converted, augmented and normalised as they are drawn.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::manifest::Manifest;

use super::Rng;

/// Images of one split, `u8`, NCHW.
#[derive(Clone)]
pub struct Images {
    /// `n · c · h · w` bytes.
    pub pixels: Vec<u8>,
    /// One class index per image.
    pub labels: Vec<u32>,
    /// `(c, h, w)`.
    pub shape: (usize, usize, usize),
}

impl Images {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// No images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The first `n` images (all when `n` is larger).
    pub fn truncate(&mut self, n: usize) {
        let (c, h, w) = self.shape;
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * c * h * w);
    }

    fn image(&self, i: usize) -> &[u8] {
        let (c, h, w) = self.shape;
        let size = c * h * w;
        &self.pixels[i * size..(i + 1) * size]
    }
}

/// A dataset: train and test splits with class names.
pub struct Dataset {
    /// Its name in job bodies.
    pub name: String,
    /// Training images.
    pub train: Images,
    /// Held-out images.
    pub test: Images,
    /// Class names in label order.
    pub classes: Vec<String>,
}

/// How a dataset is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// IDX files (`train-images-idx3-ubyte`, optionally gzipped).
    Mnist,
    /// The CIFAR-10 binary batches.
    Cifar10,
    /// One folder of images per class.
    ImageFolder,
}

impl std::fmt::Display for DatasetFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatasetFormat::Mnist => "mnist",
            DatasetFormat::Cifar10 => "cifar10",
            DatasetFormat::ImageFolder => "imagefolder",
        })
    }
}

/// What `GET /datasets` shows of a dataset (without loading its pixels).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DatasetInfo {
    /// Name in job bodies.
    pub name: String,
    /// `mnist`, `cifar10` or `imagefolder`.
    pub format: DatasetFormat,
    /// Where it was found.
    pub path: String,
    /// `[C, H, W]` of its images (ImageFolder: resized to the model's input).
    pub shape: Option<[usize; 3]>,
    /// Class names.
    pub classes: Vec<String>,
    /// Training images.
    pub train_size: usize,
    /// Test images.
    pub test_size: usize,
}

const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

fn find_maybe_gz(dir: &Path, stem: &str) -> Option<PathBuf> {
    [dir.join(stem), dir.join(format!("{stem}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

fn read_all(path: &Path) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn bad_data(path: &Path, why: &str) -> Error {
    Error::Dataset(format!("{}: {why}", path.display()))
}

fn idx_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let b = read_all(path)?;
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
    if b.len() < 16 || be(0) != 0x0803 {
        return Err(bad_data(path, "not an idx3 image file"));
    }
    let (n, h, w) = (be(4), be(8), be(12));
    if b.len() != 16 + n * h * w {
        return Err(bad_data(path, "truncated idx3 file"));
    }
    Ok((b[16..].to_vec(), n, h, w))
}

fn idx_labels(path: &Path) -> Result<Vec<u32>> {
    let b = read_all(path)?;
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
    if b.len() < 8 || be(0) != 0x0801 || b.len() != 8 + be(4) {
        return Err(bad_data(path, "not an idx1 label file"));
    }
    Ok(b[8..].iter().map(|&l| l as u32).collect())
}

fn mnist(dir: &Path) -> Result<Dataset> {
    let p: Vec<PathBuf> = MNIST_FILES
        .iter()
        .map(|f| find_maybe_gz(dir, f).ok_or_else(|| bad_data(dir, &format!("{f} missing"))))
        .collect::<Result<_>>()?;
    let (train_px, n, h, w) = idx_images(&p[0])?;
    let train_labels = idx_labels(&p[1])?;
    let (test_px, m, _, _) = idx_images(&p[2])?;
    let test_labels = idx_labels(&p[3])?;
    if train_labels.len() != n || test_labels.len() != m {
        return Err(bad_data(dir, "image and label counts differ"));
    }
    Ok(Dataset {
        name: "mnist".into(),
        train: Images {
            pixels: train_px,
            labels: train_labels,
            shape: (1, h, w),
        },
        test: Images {
            pixels: test_px,
            labels: test_labels,
            shape: (1, h, w),
        },
        classes: (0..10).map(|d| d.to_string()).collect(),
    })
}

/// CIFAR-10 binary records: a label byte then 3072 pixel bytes (R, G, B planes).
fn cifar_records(path: &Path) -> Result<Images> {
    let b = read_all(path)?;
    if b.is_empty() || b.len() % 3073 != 0 {
        return Err(bad_data(
            path,
            "not a CIFAR-10 binary batch (3073-byte records)",
        ));
    }
    let n = b.len() / 3073;
    let mut pixels = Vec::with_capacity(n * 3072);
    let mut labels = Vec::with_capacity(n);
    for r in b.chunks_exact(3073) {
        if r[0] > 9 {
            return Err(bad_data(path, "label above 9"));
        }
        labels.push(r[0] as u32);
        pixels.extend_from_slice(&r[1..]);
    }
    Ok(Images {
        pixels,
        labels,
        shape: (3, 32, 32),
    })
}

fn cifar_classes(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("batches.meta.txt"))
        .ok()
        .map(|s| {
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|c| c.len() == 10)
        .unwrap_or_else(|| {
            [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ]
            .map(String::from)
            .to_vec()
        })
}

fn concat(parts: Vec<Images>) -> Images {
    let shape = parts[0].shape;
    let mut out = Images {
        pixels: Vec::new(),
        labels: Vec::new(),
        shape,
    };
    for p in parts {
        out.pixels.extend(p.pixels);
        out.labels.extend(p.labels);
    }
    out
}

fn cifar(dir: &Path, sample: bool) -> Result<Dataset> {
    let classes = cifar_classes(dir);
    if sample {
        let all = cifar_records(&dir.join("cifar10_test_first1000.bin"))?;
        let cut = all.len() * 4 / 5;
        let (c, h, w) = all.shape;
        let size = c * h * w;
        let train = Images {
            pixels: all.pixels[..cut * size].to_vec(),
            labels: all.labels[..cut].to_vec(),
            shape: all.shape,
        };
        let test = Images {
            pixels: all.pixels[cut * size..].to_vec(),
            labels: all.labels[cut..].to_vec(),
            shape: all.shape,
        };
        return Ok(Dataset {
            name: "cifar10-sample".into(),
            train,
            test,
            classes,
        });
    }
    let train = (1..=5)
        .map(|i| cifar_records(&dir.join(format!("data_batch_{i}.bin"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Dataset {
        name: "cifar10".into(),
        train: concat(train),
        test: cifar_records(&dir.join("test_batch.bin"))?,
        classes,
    })
}

const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "webp", "gif"];

/// Class names, and each image file with its class index.
type FolderFiles = (Vec<String>, Vec<(PathBuf, u32)>);

fn folder_files(dir: &Path) -> Result<FolderFiles> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut classes: Vec<String> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        .collect();
    classes.sort();
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let mut in_class: Vec<PathBuf> = std::fs::read_dir(dir.join(class))
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        in_class.sort();
        files.extend(in_class.into_iter().map(|p| (p, label as u32)));
    }
    Ok((classes, files))
}

/// Loads an ImageFolder, each image decoded, converted, resized and cropped
/// exactly as inference does for `manifest`; a seeded shuffle puts
/// `test_fraction` of each class into the test split.
fn image_folder(
    name: &str,
    dir: &Path,
    manifest: &Manifest,
    test_fraction: f64,
) -> Result<Dataset> {
    let i = &manifest.input;
    let shape = (i.channels, i.height, i.width);
    let (classes, files) = folder_files(dir)?;
    if classes.len() < 2 {
        return Err(bad_data(
            dir,
            "an ImageFolder needs at least two class sub-folders",
        ));
    }
    let mut train = Images {
        pixels: Vec::new(),
        labels: Vec::new(),
        shape,
    };
    let mut test = train.clone();
    let mut rng = Rng::new(0x1_4A6E_F01D);
    for (label, _) in classes.iter().enumerate() {
        let mut in_class: Vec<&PathBuf> = files
            .iter()
            .filter(|(_, l)| *l == label as u32)
            .map(|(p, _)| p)
            .collect();
        shuffle(&mut in_class, &mut rng);
        let n_test = ((in_class.len() as f64) * test_fraction).round() as usize;
        for (i, path) in in_class.into_iter().enumerate() {
            let bytes = std::fs::read(path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let img = crate::preprocess::decode(&bytes, crate::preprocess::DecodeLimits::default())
                .map_err(|e| bad_data(path, &e.to_string()))?;
            let px = crate::preprocess::pixels(&img, manifest)
                .map_err(|e| bad_data(path, &e.to_string()))?;
            let split = if i < n_test { &mut test } else { &mut train };
            split.pixels.extend(px);
            split.labels.push(label as u32);
        }
    }
    Ok(Dataset {
        name: name.to_string(),
        train,
        test,
        classes,
    })
}

/// Fisher–Yates with the job's generator.
pub fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize;
        items.swap(i, j.min(i));
    }
}

/// Every dataset under `root`, without loading pixels (counts come from
/// file sizes and headers).
pub fn list(root: &Path) -> Vec<DatasetInfo> {
    let mut out = Vec::new();
    let mnist_dir = root.join("mnist");
    if MNIST_FILES
        .iter()
        .all(|f| find_maybe_gz(&mnist_dir, f).is_some())
    {
        let count = |f: &str| {
            find_maybe_gz(&mnist_dir, f)
                .and_then(|p| idx_labels(&p).ok())
                .map_or(0, |l| l.len())
        };
        out.push(DatasetInfo {
            name: "mnist".into(),
            format: DatasetFormat::Mnist,
            path: mnist_dir.display().to_string(),
            shape: Some([1, 28, 28]),
            classes: (0..10).map(|d| d.to_string()).collect(),
            train_size: count(MNIST_FILES[1]),
            test_size: count(MNIST_FILES[3]),
        });
    }
    let cifar_dir = root.join("cifar10");
    let records = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len() as usize / 3073);
    if (1..=5).all(|i| cifar_dir.join(format!("data_batch_{i}.bin")).is_file())
        && cifar_dir.join("test_batch.bin").is_file()
    {
        out.push(DatasetInfo {
            name: "cifar10".into(),
            format: DatasetFormat::Cifar10,
            path: cifar_dir.display().to_string(),
            shape: Some([3, 32, 32]),
            classes: cifar_classes(&cifar_dir),
            train_size: (1..=5)
                .map(|i| records(cifar_dir.join(format!("data_batch_{i}.bin"))))
                .sum(),
            test_size: records(cifar_dir.join("test_batch.bin")),
        });
    }
    let sample = cifar_dir.join("cifar10_test_first1000.bin");
    if sample.is_file() {
        let n = records(sample);
        out.push(DatasetInfo {
            name: "cifar10-sample".into(),
            format: DatasetFormat::Cifar10,
            path: cifar_dir.display().to_string(),
            shape: Some([3, 32, 32]),
            classes: cifar_classes(&cifar_dir),
            train_size: n * 4 / 5,
            test_size: n - n * 4 / 5,
        });
    }
    if let Ok(entries) = std::fs::read_dir(root.join("imagefolder")) {
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for dir in dirs {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(String::from) else {
                continue;
            };
            if let Ok((classes, files)) = folder_files(&dir)
                && classes.len() >= 2
            {
                out.push(DatasetInfo {
                    name,
                    format: DatasetFormat::ImageFolder,
                    path: dir.display().to_string(),
                    shape: None,
                    classes,
                    train_size: files.len(),
                    test_size: 0,
                });
            }
        }
    }
    out
}

/// Loads dataset `name` from `root`; ImageFolder images are preprocessed
/// for `manifest` as inference would.
pub fn open(root: &Path, name: &str, manifest: &Manifest, test_fraction: f64) -> Result<Dataset> {
    // A built-in dataset whose files this server lacks (the full CIFAR-10
    // where only the 1000-image sample is) is the caller's choice to fix,
    // not a failed read.
    if matches!(name, "mnist" | "cifar10" | "cifar10-sample")
        && !list(root).iter().any(|d| d.name == name)
    {
        let here: Vec<String> = list(root).into_iter().map(|d| d.name).collect();
        return Err(Error::Dataset(format!(
            "dataset '{name}' is not on this server (its files are missing); the datasets here: {}",
            if here.is_empty() {
                "none".to_string()
            } else {
                here.join(", ")
            }
        )));
    }
    match name {
        "mnist" => mnist(&root.join("mnist")),
        "cifar10" => cifar(&root.join("cifar10"), false),
        "cifar10-sample" => cifar(&root.join("cifar10"), true),
        other => {
            let dir = root.join("imagefolder").join(other);
            if dir.is_dir() && !other.contains(['/', '\\']) && other != ".." {
                image_folder(other, &dir, manifest, test_fraction)
            } else {
                Err(Error::Dataset(format!("no dataset '{other}'")))
            }
        }
    }
}

/// Augmentations applied to training batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Pad by this many zero pixels, then crop a random window of the
    /// original size (`transforms.RandomCrop(size, padding)`).
    #[serde(default)]
    pub random_crop_padding: usize,
    /// Mirror left-right with probability ½.
    #[serde(default)]
    pub horizontal_flip: bool,
}

/// Builds normalised `[B, C, H, W]` batches for a model's input.
pub struct Batcher {
    /// Model input channels.
    pub channels: usize,
    /// Per-channel mean on `[0, 1]`.
    pub mean: Vec<f32>,
    /// Per-channel std on `[0, 1]`.
    pub std: Vec<f32>,
}

impl Batcher {
    /// Images `idx` of `data` as a batch, augmented when `rng` is given,
    /// and their labels.
    pub fn batch(
        &self,
        data: &Images,
        idx: &[usize],
        augment: Augment,
        rng: Option<&mut Rng>,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let (dc, h, w) = data.shape;
        let c = self.channels;
        let mut out = vec![0f32; idx.len() * c * h * w];
        let mut rng = rng;
        for (b, &i) in idx.iter().enumerate() {
            let src = data.image(i);
            let (dy, dx, flip) = match rng.as_deref_mut() {
                Some(r) => {
                    let p = augment.random_crop_padding as isize;
                    let (dy, dx) = if p > 0 {
                        let pick = |r: &mut Rng| (r.uniform() * (2 * p + 1) as f64) as isize - p;
                        (pick(r), pick(r))
                    } else {
                        (0, 0)
                    };
                    let flip = augment.horizontal_flip && r.uniform() < 0.5;
                    (dy, dx, flip)
                }
                None => (0, 0, false),
            };
            for ch in 0..c {
                let mean = self.mean[ch.min(self.mean.len() - 1)];
                let std = self.std[ch.min(self.std.len() - 1)];
                let dst = &mut out[(b * c + ch) * h * w..(b * c + ch + 1) * h * w];
                for y in 0..h {
                    for x in 0..w {
                        // Output (y, x) reads source (y + dy, x + dx) of the
                        // padded image, mirrored first when flipping.
                        let xs = if flip { w - 1 - x } else { x } as isize + dx;
                        let ys = y as isize + dy;
                        let v = if ys < 0 || xs < 0 || ys >= h as isize || xs >= w as isize {
                            0.0
                        } else {
                            let (ys, xs) = (ys as usize, xs as usize);
                            let px = |k: usize| src[k * h * w + ys * w + xs] as f32;
                            match (dc, c) {
                                (1, _) => px(0),
                                (3, 1) => (px(0) * 299.0 + px(1) * 587.0 + px(2) * 114.0) / 1000.0,
                                _ => px(ch),
                            }
                        };
                        dst[y * w + x] = (v / 255.0 - mean) / std;
                    }
                }
            }
        }
        let x = Tensor::from_vec(out, (idx.len(), c, h, w), device)?;
        let labels: Vec<u32> = idx.iter().map(|&i| data.labels[i]).collect();
        let y = Tensor::from_vec(labels, idx.len(), device)?;
        Ok((x, y))
    }
}
