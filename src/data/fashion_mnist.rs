//! The data every example uses: Fashion-MNIST, full or embedded.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{idx::read_idx_dataset, InMemoryDataset};
use crate::{Error, Result};

/// Where the Debian/Ubuntu package `dataset-fashion-mnist` installs the files.
pub const FASHION_MNIST_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Where the repository keeps the embedded test split (absent from the published crate).
pub const FASHION_MNIST_EMBEDDED_DIR: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist");
/// Training images of the embedded split: the first 8,000 of `t10k` in file order.
pub const EMBEDDED_TRAIN_LEN: usize = 8000;
/// Mean of Fashion-MNIST pixels in `[0, 1]` (the value the reference protocols
/// of docs/benchmarks.md normalise with).
pub const FASHION_MNIST_MEAN: f32 = 0.2860;
/// Standard deviation of Fashion-MNIST pixels in `[0, 1]`.
pub const FASHION_MNIST_STD: f32 = 0.3530;
/// The ten class names, label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";
const TEST_IMAGES: &str = "t10k-images-idx3-ubyte.gz";
const TEST_LABELS: &str = "t10k-labels-idx1-ubyte.gz";

/// Which data [`fashion_mnist`] loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DataSource {
    /// The full dataset: 60,000 training and 10,000 test images from `dir`.
    Full {
        /// The directory holding the four IDX files.
        dir: PathBuf,
    },
    /// The embedded `t10k` file: first 8,000 train, last 2,000 held out.
    Embedded {
        /// The directory holding the two IDX files.
        dir: PathBuf,
    },
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Full { dir } => write!(
                f,
                "full Fashion-MNIST (60000 train / 10000 test) from {}",
                dir.display()
            ),
            DataSource::Embedded { dir } => write!(
                f,
                "embedded Fashion-MNIST t10k split (first 8000 train / last 2000 held out) from {}",
                dir.display()
            ),
        }
    }
}

/// A train/test pair and where it came from.
#[derive(Debug, Clone)]
pub struct FashionMnist {
    /// Training (or pretraining) images.
    pub train: InMemoryDataset,
    /// Held-out images for evaluation.
    pub test: InMemoryDataset,
    /// Which files were read.
    pub source: DataSource,
}

fn has_all(dir: &Path, names: &[&str]) -> bool {
    names.iter().all(|n| dir.join(n).is_file())
}

/// The data an example should use.
///
/// - `Some(dir)`: the full Fashion-MNIST from `dir` (the four
///   `*-ubyte.gz` files); an error if any is missing.
/// - `None`: the full dataset from [`FASHION_MNIST_SYSTEM_DIR`] when it is
///   installed, else the embedded split ([`embedded_fashion_mnist`]), else
///   an error that says how to get the data.
///
/// [`FashionMnist::source`] says which was used (print it).
pub fn fashion_mnist(dir: Option<&Path>) -> Result<FashionMnist> {
    let all = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];
    if let Some(dir) = dir {
        if let Some(missing) = all.iter().find(|n| !dir.join(n).is_file()) {
            return Err(Error::io(
                dir.join(missing),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "the full Fashion-MNIST needs {} in this directory",
                        all.join(", ")
                    ),
                ),
            ));
        }
        return load_full(dir);
    }
    let system = Path::new(FASHION_MNIST_SYSTEM_DIR);
    if has_all(system, &all) {
        return load_full(system);
    }
    embedded_fashion_mnist()
}

fn load_full(dir: &Path) -> Result<FashionMnist> {
    Ok(FashionMnist {
        train: read_idx_dataset(dir.join(TRAIN_IMAGES), dir.join(TRAIN_LABELS))?,
        test: read_idx_dataset(dir.join(TEST_IMAGES), dir.join(TEST_LABELS))?,
        source: DataSource::Full {
            dir: dir.to_path_buf(),
        },
    })
}

/// The embedded split: the 10,000 `t10k` images in file order, the first
/// 8,000 for training and the last 2,000 held out (the split of every
/// reference figure). Reads from [`FASHION_MNIST_EMBEDDED_DIR`] (a
/// repository checkout), else from [`FASHION_MNIST_SYSTEM_DIR`].
pub fn embedded_fashion_mnist() -> Result<FashionMnist> {
    for dir in [
        Path::new(FASHION_MNIST_EMBEDDED_DIR),
        Path::new(FASHION_MNIST_SYSTEM_DIR),
    ] {
        if has_all(dir, &[TEST_IMAGES, TEST_LABELS]) {
            let all = read_idx_dataset(dir.join(TEST_IMAGES), dir.join(TEST_LABELS))?;
            let (train, test) = all.split_at(EMBEDDED_TRAIN_LEN.min(all.len()))?;
            return Ok(FashionMnist {
                train,
                test,
                source: DataSource::Embedded {
                    dir: dir.to_path_buf(),
                },
            });
        }
    }
    Err(Error::io(
        FASHION_MNIST_EMBEDDED_DIR,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no Fashion-MNIST found (the embedded copy ships only with the aimass repository). Install it with \
                 `apt-get install dataset-fashion-mnist` (files in {FASHION_MNIST_SYSTEM_DIR}), or download the four \
                 *-ubyte.gz files from https://github.com/zalandoresearch/fashion-mnist and pass their directory"
            ),
        ),
    ))
}
