//! Tests of `aimass::data`: readers (valid and broken files, arbitrary
//! bytes), embedded data, augmentation properties and PyTorch references,
//! the loader and the episode sampler.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use aimass::candle::Device;
use aimass::data::augment::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, blur_with_kernel,
    gaussian_kernel1d, presets, resized_crop, ColorJitter, ColorJitterConfig, Compose, CropBox,
    CropMode, GaussianBlur, GaussianBlurConfig, HorizontalFlip, Image, ImageBatch, MultiView,
    Normalize, RandomCrop, RandomCropConfig, RandomGrayscale, RandomResizedCrop,
    RandomResizedCropConfig, Solarize, Transform,
};
use aimass::data::idx::{idx_dataset_from_bytes, parse_idx};
use aimass::data::*;
use aimass::device::rng;
use aimass::Error;
use rand::Rng;

// ------------------------------------------------------------------ helpers

/// A fresh directory under the system's temporary directory, removed
/// (with its contents) when dropped.
struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TmpDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmpdir(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("aimass-data-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn assert_malformed(e: Error, path_part: &str, what_part: &str) {
    match &e {
        Error::Malformed { path, what, .. } => {
            assert!(path.to_string_lossy().contains(path_part), "{e}");
            assert!(what.contains(what_part), "expected `{what_part}` in: {e}");
        }
        other => panic!("expected Error::Malformed, got {other:?}"),
    }
}

fn rand_image(c: usize, h: usize, w: usize, seed: u64) -> Image {
    let mut r = rng(seed);
    Image::new((0..c * h * w).map(|_| r.random::<f32>()).collect(), c, h, w).unwrap()
}

fn close(a: &[f32], b: &[f64], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - *y as f32).abs() <= tol, "{what}[{i}]: {x} vs {y}");
    }
}

// ------------------------------------------------------------------ IDX

#[test]
fn idx_valid_raw_and_gzip_files() {
    let d = tmpdir("idx-valid");
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
    let imgs = idx_bytes(&[3, 4, 5], &pixels);
    let labs = idx_bytes(&[3], &[2, 0, 9]);
    std::fs::write(d.join("i.idx"), &imgs).unwrap();
    std::fs::write(d.join("l.idx.gz"), gz(&labs)).unwrap();
    let ds = read_idx_dataset(d.join("i.idx"), d.join("l.idx.gz")).unwrap();
    assert_eq!(ds.image_shape(), (1, 4, 5));
    assert_eq!(ds.labels(), &[2, 0, 9]);
    assert_eq!(ds.get(1).unwrap().pixels.as_ref(), &pixels[20..40]);
    let a = read_idx(d.join("l.idx.gz")).unwrap();
    assert_eq!(a.dims, vec![3]);
}

#[test]
fn idx_each_broken_kind_is_a_typed_error_with_the_path() {
    let d = tmpdir("idx-broken");
    let good_imgs = idx_bytes(&[2, 2, 2], &[1; 8]);
    let good_labs = idx_bytes(&[2], &[0, 1]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("magic", vec![1, 2, 8, 1, 0, 0, 0, 0], "IDX header"),
        (
            "type",
            {
                let mut v = good_labs.clone();
                v[2] = 0x0d;
                v
            },
            "IDX header",
        ),
        ("short", vec![0, 0], "IDX header"),
        ("header-cut", vec![0, 0, 8, 3, 0, 0, 0, 2, 0], "IDX header"),
        ("zero-dims", vec![0, 0, 8, 0], "IDX header"),
        (
            "truncated",
            good_labs[..good_labs.len() - 1].to_vec(),
            "IDX data",
        ),
        (
            "trailing",
            {
                let mut v = good_labs.clone();
                v.push(0);
                v
            },
            "IDX data",
        ),
        (
            "huge-header",
            idx_bytes(&[u32::MAX, u32::MAX, u32::MAX], &[]),
            "IDX",
        ),
        (
            "bad-gzip",
            {
                let mut v = gz(&good_labs);
                let n = v.len();
                v.truncate(n / 2);
                v
            },
            "gzip",
        ),
    ];
    for (name, bytes, what) in cases {
        let p = d.join(format!("{name}.idx"));
        std::fs::write(&p, &bytes).unwrap();
        assert_malformed(read_idx(&p).unwrap_err(), name, what);
    }
    // Image/label count mismatch, wrong ranks.
    std::fs::write(d.join("imgs.idx"), &good_imgs).unwrap();
    std::fs::write(d.join("labs3.idx"), idx_bytes(&[3], &[0, 1, 2])).unwrap();
    assert_malformed(
        read_idx_dataset(d.join("imgs.idx"), d.join("labs3.idx")).unwrap_err(),
        "labs3",
        "label count",
    );
    std::fs::write(d.join("labs.idx"), &good_labs).unwrap();
    assert_malformed(
        read_idx_dataset(d.join("labs.idx"), d.join("labs.idx")).unwrap_err(),
        "labs",
        "image header",
    );
    assert_malformed(
        read_idx_dataset(d.join("imgs.idx"), d.join("imgs.idx")).unwrap_err(),
        "imgs",
        "label header",
    );
    // A missing file is an I/O error naming it.
    let e = read_idx(d.join("missing.idx")).unwrap_err();
    assert!(
        matches!(&e, Error::Io { path, .. } if path.ends_with("missing.idx")),
        "{e}"
    );
}

// ------------------------------------------------------------------ CIFAR

fn cifar_record(labels: &[u8], fill: u8) -> Vec<u8> {
    let mut r = labels.to_vec();
    r.extend((0..3072).map(|i| fill.wrapping_add(i as u8)));
    r
}

#[test]
fn cifar_valid_and_broken_files() {
    let d = tmpdir("cifar");
    let mut b10 = cifar_record(&[3], 0);
    b10.extend(cifar_record(&[9], 7));
    std::fs::write(d.join("b1.bin"), &b10).unwrap();
    std::fs::write(d.join("b2.bin"), cifar_record(&[0], 1)).unwrap();
    let ds = read_cifar(&[d.join("b1.bin"), d.join("b2.bin")], CifarKind::Cifar10).unwrap();
    assert_eq!(ds.labels(), &[3, 9, 0]);
    assert_eq!(ds.image_shape(), (3, 32, 32));
    assert_eq!(ds.get(1).unwrap().pixels[..3], [7, 8, 9]);

    let b100 = cifar_record(&[4, 77], 0);
    assert_eq!(
        parse_cifar(&b100, CifarKind::Cifar100Fine, "x")
            .unwrap()
            .labels(),
        &[77]
    );
    assert_eq!(
        parse_cifar(&b100, CifarKind::Cifar100Coarse, "x")
            .unwrap()
            .labels(),
        &[4]
    );

    std::fs::write(d.join("cut.bin"), &b10[..b10.len() - 5]).unwrap();
    assert_malformed(
        read_cifar(&[d.join("cut.bin")], CifarKind::Cifar10).unwrap_err(),
        "cut.bin",
        "CIFAR batch size",
    );
    std::fs::write(d.join("empty.bin"), []).unwrap();
    assert_malformed(
        read_cifar(&[d.join("empty.bin")], CifarKind::Cifar10).unwrap_err(),
        "empty.bin",
        "CIFAR batch size",
    );
    std::fs::write(d.join("label.bin"), cifar_record(&[10], 0)).unwrap();
    assert_malformed(
        read_cifar(&[d.join("label.bin")], CifarKind::Cifar10).unwrap_err(),
        "label.bin",
        "label of record 0",
    );
    // A CIFAR-100 file read as CIFAR-10 has the wrong record size.
    assert!(parse_cifar(&b100, CifarKind::Cifar10, "c100").is_err());
}

// ------------------------------------------------------------------ arbitrary bytes

#[test]
fn parsers_never_panic_on_random_truncated_or_bit_flipped_bytes() {
    let mut r = rng(2024);
    let seeds: Vec<Vec<u8>> = vec![
        idx_bytes(&[4, 3, 3], &[5; 36]),
        idx_bytes(&[4], &[1, 2, 3, 4]),
        gz(&idx_bytes(&[2, 2, 2], &[9; 8])),
        cifar_record(&[1], 3),
        cifar_record(&[1, 50], 3),
    ];
    let mut cases = 0;
    for _ in 0..400 {
        let base = &seeds[r.random_range(0..seeds.len())];
        let mut b = base.clone();
        match r.random_range(0..4) {
            0 => b.truncate(r.random_range(0..=b.len())),
            1 => {
                for _ in 0..r.random_range(1..6) {
                    let i = r.random_range(0..b.len());
                    b[i] ^= 1 << r.random_range(0..8);
                }
            }
            2 => {
                let n = r.random_range(0..64);
                b = (0..n).map(|_| r.random()).collect();
            }
            _ => {
                // A valid header whose sizes are random (possibly huge).
                b = vec![0, 0, 8, r.random_range(0..5)];
                for _ in 0..b[3] {
                    b.extend_from_slice(&r.random::<u32>().to_be_bytes());
                }
                b.extend((0..r.random_range(0..40)).map(|_| r.random::<u8>()));
            }
        }
        let res = std::panic::catch_unwind(|| {
            let _ = parse_idx(&b, "fuzz");
            let _ = idx_dataset_from_bytes(&b, &b, "fuzz-i", "fuzz-l");
            for k in [
                CifarKind::Cifar10,
                CifarKind::Cifar100Fine,
                CifarKind::Cifar100Coarse,
            ] {
                if let Err(e) = parse_cifar(&b, k, "fuzz") {
                    assert!(matches!(e, Error::Malformed { .. }), "{e}");
                }
            }
            if let Err(e) = parse_idx(&b, "fuzz") {
                assert!(matches!(e, Error::Malformed { .. }), "{e}");
            }
        });
        assert!(res.is_ok(), "a parser panicked on {b:?}");
        cases += 1;
    }
    assert_eq!(cases, 400);
}

// ------------------------------------------------------------------ image folder

#[test]
fn image_folder_loads_classes_in_order_and_rejects_bad_files() {
    let d = tmpdir("folder");
    for (class, n) in [("b_dog", 2), ("a_cat", 1)] {
        std::fs::create_dir_all(d.join(class)).unwrap();
        for i in 0..n {
            let img = image::RgbImage::from_fn(4, 3, |x, y| {
                image::Rgb([x as u8 * 10, y as u8 * 20, 200 + i as u8])
            });
            img.save(d.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
    std::fs::write(d.join("a_cat").join("notes.txt"), "skipped").unwrap();
    let f = ImageFolder::load(&d, ImageFolderConfig::default()).unwrap();
    assert_eq!(f.classes, vec!["a_cat", "b_dog"]);
    assert_eq!(f.dataset.labels(), &[0, 1, 1]);
    assert_eq!(f.dataset.image_shape(), (3, 3, 4));
    let s = f.dataset.get(2).unwrap();
    // CHW: red plane row 0 is x*10; blue plane constant 201.
    assert_eq!(&s.pixels[..4], &[0, 10, 20, 30]);
    assert!(s.pixels[24..].iter().all(|&p| p == 201));
    let g = ImageFolder::load(
        &d,
        ImageFolderConfig::default()
            .with_channels(1)
            .with_size((6, 8)),
    )
    .unwrap();
    assert_eq!(g.dataset.image_shape(), (1, 6, 8));

    // Different sizes without resizing, and a corrupt file.
    image::RgbImage::new(5, 5)
        .save(d.join("a_cat").join("big.png"))
        .unwrap();
    let e = ImageFolder::load(&d, ImageFolderConfig::default()).unwrap_err();
    assert_malformed(e, "big.png", "image size");
    std::fs::write(d.join("a_cat").join("big.png"), b"\x89PNG not really").unwrap();
    let e = ImageFolder::load(&d, ImageFolderConfig::default()).unwrap_err();
    assert_malformed(e, "big.png", "image");
    let e = ImageFolder::load(tmpdir("folder-empty"), ImageFolderConfig::default()).unwrap_err();
    assert_malformed(e, "folder-empty", "image folder");
}

// ------------------------------------------------------------------ embedded data

#[test]
fn embedded_fashion_mnist_counts_split_and_histogram() {
    let fm = embedded_fashion_mnist().unwrap();
    assert!(matches!(fm.source, DataSource::Embedded { .. }));
    assert!(fm.source.to_string().contains("first 8000 train"));
    assert_eq!((fm.train.len(), fm.test.len()), (8000, 2000));
    assert_eq!(fm.train.image_shape(), (1, 28, 28));
    let all = InMemoryDataset::concat(&[fm.train.clone(), fm.test.clone()]).unwrap();
    let hist = all.class_counts();
    assert_eq!(hist.len(), 10);
    assert!(hist.values().all(|&n| n == 1000), "{hist:?}");
    // The first t10k label is 9 (ankle boot), the second 2 (pullover).
    assert_eq!(&fm.train.labels()[..2], &[9, 2]);
    // Mean pixel close to the documented normalisation constant.
    let mean = fm.train.pixels().iter().map(|&p| p as f64).sum::<f64>()
        / fm.train.pixels().len() as f64
        / 255.0;
    assert!((mean - FASHION_MNIST_MEAN as f64).abs() < 0.01, "{mean}");
}

#[test]
fn fashion_mnist_explicit_dir_must_hold_the_files() {
    let e = fashion_mnist(Some(&tmpdir("no-fm"))).unwrap_err();
    assert!(e.to_string().contains("train-images-idx3-ubyte.gz"), "{e}");
    if Path::new(FASHION_MNIST_SYSTEM_DIR)
        .join("train-images-idx3-ubyte.gz")
        .exists()
    {
        let fm = fashion_mnist(None).unwrap();
        assert!(matches!(fm.source, DataSource::Full { .. }));
        assert_eq!((fm.train.len(), fm.test.len()), (60000, 10000));
    }
}

// ------------------------------------------------------------------ dataset

#[test]
fn in_memory_dataset_subset_split_filter_and_errors() {
    let ds = InMemoryDataset::new((0..12).collect(), vec![0, 1, 2, 1, 0, 2], (1, 1, 2)).unwrap();
    assert_eq!(ds.subset(&[5, 0]).unwrap().pixels(), &[10, 11, 0, 1]);
    assert_eq!(ds.filter_classes(&[1, 2]).unwrap().labels(), &[1, 2, 1, 2]);
    assert_eq!(ds.num_classes(), 3);
    assert!(ds.subset(&[6]).is_err());
    assert!(ds.split_at(7).is_err());
    assert!(ds.get(6).is_err());
    assert!(InMemoryDataset::new(vec![0; 5], vec![0, 1], (1, 1, 2)).is_err());
    assert!(InMemoryDataset::new(vec![], vec![], (0, 1, 2)).is_err());
}

// ------------------------------------------------------------------ augmentation vs PyTorch

fn fixture() -> serde_json::Value {
    let s = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data.json"
    ))
    .unwrap();
    serde_json::from_str(&s).unwrap()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn crops_and_blur_match_pytorch() {
    let fx = fixture();
    let data: Vec<f32> = f64s(&fx["image"]["data"])
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let img = Image::new(data, 2, 7, 9).unwrap();
    for case in fx["resize"].as_array().unwrap() {
        let b = f64s(&case["box"]);
        let s = f64s(&case["size"]);
        let bx = CropBox {
            top: b[0] as f32,
            left: b[1] as f32,
            height: b[2] as f32,
            width: b[3] as f32,
        };
        let out = resized_crop(&img, bx, (s[0] as usize, s[1] as usize), false).unwrap();
        close(out.data(), &f64s(&case["out"]), 1e-5, "interpolate");
    }
    for case in fx["grid"].as_array().unwrap() {
        let (fw, fh, cx, cy) = (
            case["fw"].as_f64().unwrap() as f32,
            case["fh"].as_f64().unwrap() as f32,
            case["cx"].as_f64().unwrap() as f32,
            case["cy"].as_f64().unwrap() as f32,
        );
        let s = f64s(&case["size"]);
        let bx = CropBox {
            top: (cy - fh + 1.0) * 0.5 * 7.0,
            left: (cx - fw + 1.0) * 0.5 * 9.0,
            height: fh * 7.0,
            width: fw * 9.0,
        };
        let mut out = resized_crop(&img, bx, (s[0] as usize, s[1] as usize), true).unwrap();
        if case["flip"].as_i64().unwrap() < 0 {
            HorizontalFlip::new(1.0)
                .unwrap()
                .apply(&mut out, &mut rng(0))
                .unwrap();
        }
        close(out.data(), &f64s(&case["out"]), 1e-5, "grid_sample");
    }
    for case in fx["blur"].as_array().unwrap() {
        let mut out = img.clone();
        let k = gaussian_kernel1d(
            case["kernel_size"].as_u64().unwrap() as usize,
            case["sigma"].as_f64().unwrap() as f32,
        );
        blur_with_kernel(&mut out, &k);
        close(out.data(), &f64s(&case["out"]), 1e-5, "blur");
    }
}

// ------------------------------------------------------------------ augmentation properties

#[test]
fn colour_ops_match_hand_derived_values() {
    // Hue: pure red rotated by 1/3 turn is pure green, by 1/6 yellow.
    let red = Image::new(vec![1.0, 0.0, 0.0], 3, 1, 1).unwrap();
    let mut g = red.clone();
    adjust_hue(&mut g, 1.0 / 3.0);
    close(g.data(), &[0.0, 1.0, 0.0], 1e-5, "hue 1/3");
    let mut y = red.clone();
    adjust_hue(&mut y, 1.0 / 6.0);
    close(y.data(), &[1.0, 1.0, 0.0], 1e-5, "hue 1/6");
    // Saturation 0 gives the luma on every channel.
    let mut s = Image::new(vec![0.2, 0.4, 0.6], 3, 1, 1).unwrap();
    adjust_saturation(&mut s, 0.0);
    let l = 0.2989 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6;
    close(s.data(), &[l, l, l], 1e-6, "saturation 0");
    // Contrast 0 gives the mean gray; contrast 2 doubles the distance to it.
    let mut c = Image::new(vec![0.2, 0.4, 0.6, 0.8], 1, 2, 2).unwrap();
    adjust_contrast(&mut c, 0.0);
    close(c.data(), &[0.5; 4], 1e-6, "contrast 0");
    let mut c = Image::new(vec![0.4, 0.5, 0.6, 0.5], 1, 2, 2).unwrap();
    adjust_contrast(&mut c, 2.0);
    close(c.data(), &[0.3, 0.5, 0.7, 0.5], 1e-6, "contrast 2");
    let mut b = Image::new(vec![0.2, 0.7], 1, 1, 2).unwrap();
    adjust_brightness(&mut b, 1.5);
    close(b.data(), &[0.3, 1.0], 1e-6, "brightness clamps");
    // Solarize and normalize.
    let mut so = Image::new(vec![0.2, 0.5, 0.9], 1, 1, 3).unwrap();
    Solarize::new(0.5, 1.0)
        .unwrap()
        .apply(&mut so, &mut rng(0))
        .unwrap();
    close(so.data(), &[0.2, 0.5, 0.1], 1e-6, "solarize");
    let mut n = Image::new(vec![0.5, 0.5], 2, 1, 1).unwrap();
    Normalize::new(&[0.25, 0.5], &[0.5, 0.25])
        .unwrap()
        .apply(&mut n, &mut rng(0))
        .unwrap();
    close(n.data(), &[0.5, 0.0], 1e-6, "normalize");
    // Grayscale of RGB: luma on 3 channels; of one channel: unchanged.
    let mut gr = Image::new(vec![0.2, 0.4, 0.6], 3, 1, 1).unwrap();
    RandomGrayscale::new(1.0)
        .unwrap()
        .apply(&mut gr, &mut rng(0))
        .unwrap();
    close(gr.data(), &[l, l, l], 1e-6, "grayscale");
    // Blur kernel: exp(-x²/2σ²) normalised.
    let k = gaussian_kernel1d(3, 1.0);
    let e = (-0.5f64).exp();
    close(
        &k,
        &[
            e / (1.0 + 2.0 * e),
            1.0 / (1.0 + 2.0 * e),
            e / (1.0 + 2.0 * e),
        ],
        1e-6,
        "kernel",
    );
}

#[test]
fn flip_mirrors_rows() {
    let img = rand_image(3, 4, 5, 1);
    let mut f = img.clone();
    HorizontalFlip::new(1.0)
        .unwrap()
        .apply(&mut f, &mut rng(0))
        .unwrap();
    for c in 0..3 {
        for y in 0..4 {
            for x in 0..5 {
                assert_eq!(
                    f.data()[(c * 4 + y) * 5 + x],
                    img.data()[(c * 4 + y) * 5 + 4 - x]
                );
            }
        }
    }
    let mut same = img.clone();
    HorizontalFlip::new(0.0)
        .unwrap()
        .apply(&mut same, &mut rng(0))
        .unwrap();
    assert_eq!(same, img);
}

#[test]
fn crop_area_fractions_stay_in_the_scale_range() {
    for mode in [CropMode::Torchvision, CropMode::Continuous] {
        let scale = (0.3, 0.9);
        let crop = RandomResizedCrop::new(
            RandomResizedCropConfig::default()
                .with_scale(scale)
                .with_mode(mode),
        )
        .unwrap();
        let mut r = rng(5);
        let (mut lo, mut hi) = (1.0f32, 0.0f32);
        for _ in 0..3000 {
            let b = crop.sample_box(28, 28, &mut r);
            let frac = b.height * b.width / (28.0 * 28.0);
            // Rounding the sides to whole pixels moves the area by at most ~1 px per side.
            let tol = if mode == CropMode::Torchvision {
                2.0 * 28.0 * 0.5 / 784.0 + 0.01
            } else {
                1e-5
            };
            assert!(
                frac >= scale.0 - tol && frac <= scale.1 + tol,
                "{mode:?}: {frac}"
            );
            assert!(
                b.top >= -1e-4
                    && b.left >= -1e-4
                    && b.top + b.height <= 28.0 + 1e-4
                    && b.left + b.width <= 28.0 + 1e-4,
                "{b:?}"
            );
            let ratio = b.width / b.height;
            if mode == CropMode::Continuous && b.width < 27.99 && b.height < 27.99 {
                assert!(ratio > 0.75 - 1e-3 && ratio < 4.0 / 3.0 + 1e-3, "{ratio}");
            }
            lo = lo.min(frac);
            hi = hi.max(frac);
        }
        assert!(
            lo < scale.0 + 0.03 && hi > scale.1 - 0.05,
            "{mode:?}: range covered {lo}..{hi}"
        );
    }
}

fn fraction_changed(t: &dyn Transform, img: &Image, n: u64) -> f64 {
    let batch = ImageBatch::from_images(vec![img.clone(); n as usize]).unwrap();
    let out = batch.augment(t, 11, None).unwrap();
    (0..n as usize)
        .filter(|&i| out.image_data(i).unwrap() != img.data())
        .count() as f64
        / n as f64
}

#[test]
fn probabilities_are_close_to_the_configured_ones() {
    let img = rand_image(3, 6, 6, 2);
    let n = 4000u64;
    // 3-sigma bound of a binomial proportion.
    let check = |name: &str, got: f64, p: f64| {
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((got - p).abs() < 4.0 * sd + 1e-9, "{name}: {got} vs {p}");
    };
    check(
        "flip",
        fraction_changed(&HorizontalFlip::new(0.3).unwrap(), &img, n),
        0.3,
    );
    check(
        "grayscale",
        fraction_changed(&RandomGrayscale::new(0.2).unwrap(), &img, n),
        0.2,
    );
    check(
        "solarize",
        fraction_changed(&Solarize::new(0.0, 0.6).unwrap(), &img, n),
        0.6,
    );
    check(
        "jitter",
        fraction_changed(
            &ColorJitter::new(ColorJitterConfig::default().with_p(0.8)).unwrap(),
            &img,
            n,
        ),
        0.8,
    );
    check(
        "blur",
        fraction_changed(
            &GaussianBlur::new(GaussianBlurConfig::default().with_p(0.5)).unwrap(),
            &img,
            n,
        ),
        0.5,
    );
}

#[test]
fn pipelines_keep_shapes_and_ranges_for_one_and_three_channels() {
    for c in [1usize, 3] {
        let full = Compose::new()
            .then(
                RandomResizedCrop::new(RandomResizedCropConfig::default().with_size((20, 24)))
                    .unwrap(),
            )
            .then(HorizontalFlip::default())
            .then(ColorJitter::new(ColorJitterConfig::simclr(1.0)).unwrap())
            .then(RandomGrayscale::new(0.5).unwrap())
            .then(GaussianBlur::new(GaussianBlurConfig::default().with_kernel_size(5)).unwrap())
            .then(Solarize::new(0.5, 0.5).unwrap())
            .then(
                RandomCrop::new(
                    RandomCropConfig::default()
                        .with_size((20, 24))
                        .with_padding(3),
                )
                .unwrap(),
            );
        let batch =
            ImageBatch::from_images((0..64).map(|i| rand_image(c, 28, 28, i)).collect()).unwrap();
        let out = batch.augment(&full, 3, None).unwrap();
        assert_eq!(out.shape(), (64, c, 20, 24));
        let bad: Vec<&f32> = out
            .data()
            .iter()
            .filter(|v| !(-1e-6..=1.0 + 1e-6).contains(*v))
            .take(5)
            .collect();
        assert!(
            bad.is_empty(),
            "values left [0, 1] (beyond rounding): {bad:?}"
        );
    }
    // Presets end with the normalisation: values are centred around 0.
    let fm = embedded_fashion_mnist().unwrap();
    let px = &fm.train.pixels()[..256 * 784];
    let batch = ImageBatch::from_u8(px, (256, 1, 28, 28)).unwrap();
    for views in [
        presets::simclr_views(&Default::default()).unwrap(),
        presets::byol_views(&Default::default()).unwrap(),
        presets::fashion_mnist_reference_views().unwrap(),
    ] {
        let out = views.apply(&batch, 0, None).unwrap();
        assert_eq!(out.len(), 2);
        let m = out[0].data().iter().map(|&v| v as f64).sum::<f64>() / out[0].data().len() as f64;
        assert!(m.abs() < 0.6, "{m}");
        assert_eq!(out[1].shape(), (256, 1, 28, 28));
    }
    let sup = presets::fashion_mnist_supervised_reference().unwrap();
    assert_eq!(
        batch.augment(&sup, 0, None).unwrap().shape(),
        (256, 1, 28, 28)
    );
}

#[test]
fn fashion_mnist_simclr_view_jitters_brightness_at_simclr_strength() {
    // A flat grey image stays flat under crop and flip, so the centre pixel
    // of each view is 0.5 times its brightness factor (contrast around the
    // mean leaves a flat image alone): U(0.6, 1.4) for the reference view,
    // U(0.2, 1.8) for the SimCLR example's, each applied with p 0.8.
    let grey = Image::new(vec![0.5; 28 * 28], 1, 28, 28).unwrap();
    let batch = ImageBatch::from_images(vec![grey; 400]).unwrap();
    let centres = |pipe: Compose| -> Vec<f32> {
        let out = batch.augment(&pipe, 5, None).unwrap();
        (0..400)
            .map(|i| {
                out.image_data(i).unwrap()[14 * 28 + 14] * FASHION_MNIST_STD + FASHION_MNIST_MEAN
            })
            .collect()
    };
    let range = |v: &[f32]| {
        let lo = v.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (lo, hi)
    };
    let unchanged = |v: &[f32]| v.iter().filter(|&&x| (x - 0.5).abs() < 1e-5).count();
    let reference = centres(presets::fashion_mnist_reference().unwrap());
    let (lo, hi) = range(&reference);
    assert!(lo >= 0.3 - 0.02 && hi <= 0.7 + 0.02, "reference {lo}..{hi}");
    assert!(lo < 0.35 && hi > 0.65, "reference {lo}..{hi}");
    let simclr = centres(presets::fashion_mnist_simclr().unwrap());
    let (lo, hi) = range(&simclr);
    assert!(lo >= 0.1 - 0.02 && hi <= 0.9 + 0.02, "simclr {lo}..{hi}");
    assert!(lo < 0.2 && hi > 0.8, "simclr {lo}..{hi}");
    // p 0.8: about a fifth of the views keep their brightness.
    for v in [&reference, &simclr] {
        let n = unchanged(v);
        assert!((40..=120).contains(&n), "{n} of 400 unchanged");
    }
    let views = presets::fashion_mnist_simclr_views().unwrap();
    assert_eq!(views.apply(&batch, 0, None).unwrap().len(), 2);
}

#[test]
fn augmentation_is_deterministic_thread_independent_and_per_sample() {
    let pipe = presets::simclr(&Default::default()).unwrap();
    let img = rand_image(1, 28, 28, 9);
    let batch = ImageBatch::from_images(vec![img; 32]).unwrap();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| batch.augment(&pipe, 77, None).unwrap())
    };
    let a = run(1);
    assert_eq!(a, run(3));
    assert_ne!(a, batch.augment(&pipe, 78, None).unwrap());
    // Identical inputs, independent draws: all 32 outputs differ.
    let distinct: HashSet<Vec<u32>> = (0..32)
        .map(|i| {
            a.image_data(i)
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect();
    assert_eq!(distinct.len(), 32);
    // Two views of a MultiView differ, and a view depends only on its own stream.
    let mv = MultiView::repeat(pipe.clone(), 2).unwrap();
    let v = mv.apply(&batch, 5, None).unwrap();
    assert_ne!(v[0], v[1]);
    // Keys make an image's draw independent of its position in the batch.
    let keys: Vec<u64> = (100..132).collect();
    let k1 = batch.augment(&pipe, 5, Some(&keys)).unwrap();
    let rev: Vec<u64> = keys.iter().rev().copied().collect();
    let k2 = batch.augment(&pipe, 5, Some(&rev)).unwrap();
    assert_eq!(k1.image_data(0).unwrap(), k2.image_data(31).unwrap());
}

#[test]
fn invalid_configs_name_the_field() {
    let field = |e: Error| match e {
        Error::Config { field, .. } => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        field(HorizontalFlip::new(1.5).unwrap_err()),
        "HorizontalFlip::p"
    );
    assert_eq!(
        field(
            RandomResizedCrop::new(RandomResizedCropConfig::default().with_scale((0.9, 0.1)))
                .unwrap_err()
        ),
        "RandomResizedCropConfig::scale"
    );
    assert_eq!(
        field(GaussianBlur::new(GaussianBlurConfig::default().with_kernel_size(4)).unwrap_err()),
        "GaussianBlurConfig::kernel_size"
    );
    assert_eq!(
        field(ColorJitter::new(ColorJitterConfig::default().with_hue(0.7)).unwrap_err()),
        "ColorJitterConfig::hue"
    );
    assert_eq!(
        field(Normalize::new(&[0.5], &[0.0]).unwrap_err()),
        "Normalize::std"
    );
    let ds = InMemoryDataset::new(vec![0; 4], vec![0], (1, 2, 2)).unwrap();
    assert_eq!(
        field(
            DataLoader::new(
                ds,
                DataLoaderConfig::default().with_batch_size(0),
                &Device::Cpu
            )
            .unwrap_err()
        ),
        "DataLoaderConfig::batch_size"
    );
}

// ------------------------------------------------------------------ loader

fn numbered(n: usize) -> InMemoryDataset {
    // Image i is filled with i % 256 and labelled i % 7.
    let px: Vec<u8> = (0..n)
        .flat_map(|i| std::iter::repeat_n((i % 256) as u8, 4))
        .collect();
    InMemoryDataset::new(px, (0..n as u32).map(|i| i % 7).collect(), (1, 2, 2)).unwrap()
}

#[test]
fn loader_visits_every_sample_once_per_epoch_and_reshuffles() {
    let mut loader = DataLoader::new(
        numbered(103),
        DataLoaderConfig::default().with_batch_size(10).with_seed(3),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(loader.len(), 11);
    let mut orders = Vec::new();
    for epoch in 0..3 {
        let mut seen = Vec::new();
        for b in loader.epoch() {
            let b = b.unwrap();
            assert_eq!(b.epoch, epoch);
            let labels = b.labels.to_vec1::<u32>().unwrap();
            let px = b
                .images()
                .unwrap()
                .flatten_from(1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (k, &i) in b.indices.iter().enumerate() {
                assert_eq!(labels[k], i as u32 % 7);
                assert!((px[k][0] * 255.0 - (i % 256) as f32).abs() < 1e-3);
            }
            seen.extend(b.indices);
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..103).collect::<Vec<_>>());
        orders.push(seen);
    }
    assert_ne!(orders[0], orders[1]);
    assert_ne!(orders[1], orders[2]);
    assert_eq!(
        loader.position(),
        LoaderPosition {
            seed: 3,
            epoch: 3,
            batch: 0
        }
    );

    let dl = DataLoader::new(
        numbered(103),
        DataLoaderConfig::default()
            .with_batch_size(10)
            .with_drop_last(true),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(dl.len(), 10);
    let no_shuffle = DataLoader::new(
        numbered(5),
        DataLoaderConfig::default().with_shuffle(false),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(no_shuffle.order(4), vec![0, 1, 2, 3, 4]);
}

#[test]
fn loader_is_reproducible_resumable_and_thread_independent() {
    let fm = embedded_fashion_mnist().unwrap();
    let ds = fm.train.subset(&(0..96).collect::<Vec<_>>()).unwrap();
    let make = |prefetch: usize| {
        DataLoader::new(
            ds.clone(),
            DataLoaderConfig::default()
                .with_batch_size(32)
                .with_seed(9)
                .with_prefetch(prefetch),
            &Device::Cpu,
        )
        .unwrap()
        .with_views(presets::simclr_views(&Default::default()).unwrap())
    };
    let collect = |l: &mut DataLoader| -> Vec<Vec<f32>> {
        l.epoch()
            .map(|b| {
                b.unwrap().views[1]
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let mut a = make(2);
    let ea = collect(&mut a);
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let eb = one_thread.install(|| collect(&mut make(0)));
    assert_eq!(ea, eb, "same seed, different prefetch and thread count");
    // Epoch 1 of `a` differs from epoch 0.
    let a1 = collect(&mut a);
    assert_ne!(ea, a1);
    // Resume mid-epoch from a saved position.
    let mut c = make(2);
    c.set_position(LoaderPosition {
        seed: 9,
        epoch: 1,
        batch: 0,
    })
    .unwrap();
    let first = c.epoch().next().unwrap().unwrap();
    assert_eq!(
        first.views[1]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        a1[0]
    );
    let pos = c.position();
    assert_eq!(
        pos,
        LoaderPosition {
            seed: 9,
            epoch: 1,
            batch: 1
        }
    );
    let mut d = make(1);
    d.set_position(pos).unwrap();
    let rest = collect(&mut d);
    assert_eq!(rest, a1[1..].to_vec());
    assert!(d
        .set_position(LoaderPosition {
            seed: 1,
            epoch: 0,
            batch: 0
        })
        .is_err());
    assert_eq!(
        d.batch_at(1, 2).unwrap().views[1]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        a1[2]
    );
}

// ------------------------------------------------------------------ episodes

#[test]
fn episodes_have_right_shapes_allowed_classes_and_disjoint_support_query() {
    let fm = embedded_fashion_mnist().unwrap();
    let (meta_train, meta_test) = split_classes(&(0..10).collect::<Vec<_>>(), 5, 0).unwrap();
    assert!(meta_train.iter().all(|c| !meta_test.contains(c)));
    assert_eq!(meta_train.len() + meta_test.len(), 10);
    let cfg = EpisodeConfig::default()
        .with_n_way(5)
        .with_k_shot(5)
        .with_q_query(15)
        .with_seed(1);
    let mut s = EpisodeSampler::new(fm.test.clone(), &meta_test, cfg, &Device::Cpu).unwrap();
    for _ in 0..20 {
        let ep = s.sample().unwrap();
        assert_eq!(ep.support.dims(), &[25, 1, 28, 28]);
        assert_eq!(ep.query.dims(), &[75, 1, 28, 28]);
        assert!(ep.classes.iter().all(|c| meta_test.contains(c)));
        let sl = ep.support_labels.to_vec1::<u32>().unwrap();
        let ql = ep.query_labels.to_vec1::<u32>().unwrap();
        for (idx, l) in ep
            .support_indices
            .iter()
            .zip(&sl)
            .chain(ep.query_indices.iter().zip(&ql))
        {
            assert_eq!(fm.test.labels()[*idx], ep.classes[*l as usize]);
        }
        let sup: HashSet<_> = ep.support_indices.iter().collect();
        assert!(ep.query_indices.iter().all(|i| !sup.contains(i)));
        assert_eq!(sup.len(), 25);
    }
    // Episode i is a function of (seed, i).
    assert_eq!(
        s.episode(3).unwrap().query_indices,
        s.episode(3).unwrap().query_indices
    );
    assert_ne!(
        s.episode(3).unwrap().query_indices,
        s.episode(4).unwrap().query_indices
    );
    // The seed is EpisodeConfig::seed: another seed draws other episodes.
    let other =
        EpisodeSampler::new(fm.test.clone(), &meta_test, cfg.with_seed(2), &Device::Cpu).unwrap();
    assert_eq!((s.seed(), other.seed()), (1, 2));
    assert_ne!(
        s.episode(3).unwrap().query_indices,
        other.episode(3).unwrap().query_indices
    );
    // Too few images per class, too many ways.
    let tiny = numbered(14);
    assert!(EpisodeSampler::new(
        tiny.clone(),
        &[0, 1],
        EpisodeConfig::default()
            .with_n_way(2)
            .with_k_shot(1)
            .with_q_query(2),
        &Device::Cpu
    )
    .is_err());
    assert!(EpisodeSampler::new(tiny, &[0, 1], EpisodeConfig::default(), &Device::Cpu).is_err());
}

#[test]
fn jitter_factors_cover_the_torchvision_ranges() {
    // Brightness only, on a mid-gray image (no clamping): out = 0.5·f, f ~ U(0.6, 1.4).
    let t = ColorJitter::new(
        ColorJitterConfig::default()
            .with_brightness(0.4)
            .with_contrast(0.0)
            .with_saturation(0.0)
            .with_hue(0.0)
            .with_p(1.0),
    )
    .unwrap();
    let batch = ImageBatch::new(vec![0.5; 600 * 4], (600, 1, 2, 2)).unwrap();
    let out = batch.augment(&t, 1, None).unwrap();
    let f: Vec<f32> = (0..600)
        .map(|i| out.image_data(i).unwrap()[0] / 0.5)
        .collect();
    assert!(f.iter().all(|v| (0.6..=1.4).contains(v)));
    let (lo, hi) = f
        .iter()
        .fold((2f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(lo < 0.62 && hi > 1.38, "{lo} {hi}");
    let mean = f.iter().sum::<f32>() / 600.0;
    assert!((mean - 1.0).abs() < 0.04, "{mean}");
}

#[test]
fn random_crop_takes_a_window_of_the_zero_padded_image() {
    let (h, w, pad) = (5usize, 6usize, 2usize);
    let img = Image::new((1..=h * w).map(|v| v as f32).collect(), 1, h, w).unwrap();
    let padded = |y: isize, x: isize| -> f32 {
        let (sy, sx) = (y - pad as isize, x - pad as isize);
        if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
            0.0
        } else {
            img.data()[sy as usize * w + sx as usize]
        }
    };
    let t = RandomCrop::new(
        RandomCropConfig::default()
            .with_size((h, w))
            .with_padding(pad),
    )
    .unwrap();
    let mut offsets = HashSet::new();
    let mut r = rng(4);
    for _ in 0..300 {
        let mut o = img.clone();
        t.apply(&mut o, &mut r).unwrap();
        let found = (0..=2 * pad)
            .flat_map(|oy| (0..=2 * pad).map(move |ox| (oy, ox)))
            .find(|&(oy, ox)| {
                (0..h).all(|y| {
                    (0..w).all(|x| {
                        o.data()[y * w + x] == padded((y + oy) as isize, (x + ox) as isize)
                    })
                })
            });
        offsets.insert(found.expect("output is a window of the padded image"));
    }
    assert_eq!(offsets.len(), 25, "every offset 0..=4 × 0..=4 occurs");
}
