//! Your own images: one sub-folder per class, PNG or JPEG files inside.
//!
//! ```text
//! root/
//!   cat/  001.png 002.jpg ...
//!   dog/  a.jpeg ...
//! ```
//!
//! Classes are the sub-folder names sorted alphabetically (torchvision's
//! `ImageFolder` convention): the first is label 0. Files with other
//! extensions are skipped. A class folder without any image is an error
//! naming it, as in torchvision, unless [`ImageFolderConfig::allow_empty`]
//! is set (the class then keeps its label and has no sample). Images are
//! converted to the requested number of channels and, when a size is given,
//! resized with a bilinear filter.

use std::path::{Path, PathBuf};

use super::InMemoryDataset;
use crate::config::config;
use crate::{Error, Result};

config! {
    /// Options of [`ImageFolder::load`].
    #[derive(Eq)]
    pub struct ImageFolderConfig {
        /// Channels of the loaded images: 1 (grayscale) or 3 (RGB). Default 3.
        channels: usize = 3,
        /// Resize every image to `(height, width)`; `None` (default) requires
        /// all images to have the same size already.
        size: Option<(usize, usize)> = None,
        /// Accept class folders without any image (torchvision `ImageFolder`'s
        /// `allow_empty`, default false: an empty class folder is an error).
        allow_empty: bool = false,
    }
}

impl ImageFolderConfig {
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.channels != 1 && self.channels != 3 {
            return Err(Error::config(
                "ImageFolderConfig::channels",
                self.channels,
                "must be 1 or 3",
            ));
        }
        if let Some((h, w)) = self.size {
            if h == 0 || w == 0 || h > 1 << 16 || w > 1 << 16 {
                return Err(Error::config(
                    "ImageFolderConfig::size",
                    format!("{h}×{w}"),
                    "both sides must be in 1..=65536",
                ));
            }
        }
        Ok(())
    }
}

/// A dataset loaded from a class-per-folder tree, with its class names.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// The images and labels.
    pub dataset: InMemoryDataset,
    /// The class names; label `i` is `classes[i]`.
    pub classes: Vec<String>,
    /// The file of each sample, in sample order.
    pub files: Vec<PathBuf>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        v.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    v.sort();
    Ok(v)
}

impl ImageFolder {
    /// Loads every PNG/JPEG under `root/<class>/`.
    pub fn load(root: impl AsRef<Path>, config: ImageFolderConfig) -> Result<Self> {
        let root = root.as_ref();
        config.validate()?;
        let mut classes = Vec::new();
        let mut files = Vec::new();
        let mut labels = Vec::new();
        let mut empty = Vec::new();
        for dir in sorted_entries(root)?.into_iter().filter(|p| p.is_dir()) {
            let label = classes.len() as u32;
            classes.push(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            let before = files.len();
            for f in sorted_entries(&dir)?
                .into_iter()
                .filter(|p| p.is_file() && is_image(p))
            {
                files.push(f);
                labels.push(label);
            }
            if files.len() == before {
                empty.push(dir);
            }
        }
        if let (Some(first), false, false) = (empty.first(), config.allow_empty, files.is_empty()) {
            let names: Vec<String> = empty
                .iter()
                .filter_map(|d| d.file_name())
                .map(|n| format!("`{}`", n.to_string_lossy()))
                .collect();
            return Err(Error::malformed(
                first,
                "image folder class",
                "at least one .png/.jpg/.jpeg file in every class folder (set ImageFolderConfig::allow_empty to keep empty classes, as torchvision's allow_empty)",
                format!("no image in the class folder(s) {}", names.join(", ")),
            ));
        }
        if files.is_empty() {
            return Err(Error::malformed(
                root,
                "image folder",
                "sub-folders (one per class) holding .png/.jpg/.jpeg files",
                format!("{} class folders and no image", classes.len()),
            ));
        }
        let mut shape: Option<(usize, usize)> = config.size;
        let mut pixels = Vec::new();
        for f in &files {
            let img = image::ImageReader::open(f)
                .map_err(|e| Error::io(f, e))?
                .with_guessed_format()
                .map_err(|e| Error::io(f, e))?
                .decode()
                .map_err(|e| {
                    Error::malformed(f, "image", "a decodable PNG or JPEG file", e.to_string())
                })?;
            let img = match config.size {
                Some((h, w)) if (img.height() as usize, img.width() as usize) != (h, w) => {
                    img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
                }
                _ => img,
            };
            let (h, w) = (img.height() as usize, img.width() as usize);
            match shape {
                None => shape = Some((h, w)),
                Some(s) if s != (h, w) => {
                    return Err(Error::malformed(
                        f,
                        "image size",
                        format!(
                            "{}×{} like the first image (or set ImageFolderConfig::size to resize)",
                            s.0, s.1
                        ),
                        format!("{h}×{w}"),
                    ))
                }
                _ => {}
            }
            if config.channels == 1 {
                pixels.extend_from_slice(img.to_luma8().as_raw());
            } else {
                // HWC -> CHW.
                let rgb = img.to_rgb8();
                let raw = rgb.as_raw();
                for c in 0..3 {
                    pixels.extend(raw.iter().skip(c).step_by(3));
                }
            }
        }
        let (h, w) = shape.unwrap_or((1, 1));
        let dataset = InMemoryDataset::new(pixels, labels, (config.channels, h, w))?;
        Ok(Self {
            dataset,
            classes,
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_class_folders_are_errors_unless_allowed() {
        let d = std::env::temp_dir().join(format!("aimass-imgfolder-empty-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for class in ["a_cat", "b_empty", "c_dog", "d_text_only"] {
            std::fs::create_dir_all(d.join(class)).unwrap();
        }
        for class in ["a_cat", "c_dog"] {
            image::GrayImage::new(2, 2)
                .save(d.join(class).join("0.png"))
                .unwrap();
        }
        std::fs::write(d.join("d_text_only").join("notes.txt"), "x").unwrap();
        let e = ImageFolder::load(&d, ImageFolderConfig::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, Error::Malformed { path, .. } if path.ends_with("b_empty")),
            "{msg}"
        );
        assert!(msg.contains("`b_empty`, `d_text_only`"), "{msg}");
        assert!(msg.contains("allow_empty"), "{msg}");
        let f = ImageFolder::load(&d, ImageFolderConfig::default().with_allow_empty(true)).unwrap();
        assert_eq!(f.classes, ["a_cat", "b_empty", "c_dog", "d_text_only"]);
        assert_eq!(f.dataset.labels(), &[0, 2]);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
