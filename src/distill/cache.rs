//! The teacher cache: the teacher's outputs (logits and the feature stages a
//! recipe reads) stored by dataset index, so the teacher runs once per
//! sample instead of once per step.

use candle_core::{DType, Device, Tensor};

use crate::nn::Features;
use crate::train::Checkpoint;
use crate::{Error, Result};

/// A teacher's outputs by dataset index: for each cached sample, one row
/// `(1, ...)` per stage (the logits and the feature stages a recipe reads).
///
/// A [`Distiller`](super::Distiller) in [`TeacherMode::Cached`](super::TeacherMode::Cached)
/// fills one ([`Distiller::precompute_teacher`](super::Distiller::precompute_teacher),
/// or batch by batch); [`Distiller::teacher_cache`](super::Distiller::teacher_cache)
/// and [`Distiller::set_teacher_cache`](super::Distiller::set_teacher_cache)
/// share it between runs over the same dataset with the same teacher
/// (seeds, students, hyperparameters), so the teacher runs once in all.
/// Cloning is cheap: the rows are shared.
#[derive(Debug, Clone)]
pub struct TeacherCache {
    stages: Vec<String>,
    rows: Vec<Option<Vec<Tensor>>>,
    filled: usize,
    teacher_crc: u32,
}

impl TeacherCache {
    /// An empty cache of these stages of the teacher with this CRC.
    pub(crate) fn new(stages: Vec<String>, teacher_crc: u32) -> Self {
        TeacherCache {
            stages,
            rows: Vec::new(),
            filled: 0,
            teacher_crc,
        }
    }

    /// The cached stages, in order.
    pub fn stages(&self) -> &[String] {
        &self.stages
    }

    /// How many samples are cached.
    pub fn filled(&self) -> usize {
        self.filled
    }

    /// Whether sample `i` is cached.
    pub fn has(&self, i: usize) -> bool {
        matches!(self.rows.get(i), Some(Some(_)))
    }

    /// The CRC-32 of the weights of the teacher that computed the outputs.
    pub(crate) fn teacher_crc(&self) -> u32 {
        self.teacher_crc
    }

    /// Caches row `j` of every stage of `feats` as sample `indices[j]`,
    /// for the samples not cached yet.
    pub(crate) fn insert(&mut self, indices: &[usize], feats: &Features) -> Result<()> {
        let outs = self
            .stages
            .iter()
            .map(|s| feats.require(s))
            .collect::<Result<Vec<_>>>()?;
        for t in &outs {
            if t.rank() == 0 || t.dim(0)? != indices.len() {
                return Err(Error::shape(
                    "teacher cache",
                    format!(
                        "teacher outputs with one row per sample ({})",
                        indices.len()
                    ),
                    t.dims(),
                ));
            }
        }
        for (j, &i) in indices.iter().enumerate() {
            if self.has(i) {
                continue;
            }
            if self.rows.len() <= i {
                self.rows.resize(i + 1, None);
            }
            let row = outs
                .iter()
                .map(|t| Ok(t.narrow(0, j, 1)?))
                .collect::<Result<Vec<_>>>()?;
            self.rows[i] = Some(row);
            self.filled += 1;
        }
        Ok(())
    }

    /// The cached outputs of `indices`, in that order, as [`Features`];
    /// every index must be cached.
    pub(crate) fn gather(&self, indices: &[usize]) -> Result<Features> {
        let rows = indices
            .iter()
            .map(|&i| {
                self.rows.get(i).and_then(|r| r.as_ref()).ok_or_else(|| {
                    Error::invalid("teacher cache", format!("sample {i} is not cached"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Features::new();
        for (k, name) in self.stages.iter().enumerate() {
            let parts: Vec<&Tensor> = rows.iter().map(|r| &r[k]).collect();
            out.push(name.clone(), Tensor::cat(&parts, 0)?);
        }
        Ok(out)
    }

    /// Adds the cached rows to `ckpt` under `prefix/` (an index tensor and
    /// one tensor per stage) and their count as metadata.
    pub(crate) fn save(&self, ckpt: &mut Checkpoint, prefix: &str) -> Result<()> {
        ckpt.set_meta(format!("{prefix}.filled"), self.filled);
        if self.filled == 0 {
            return Ok(());
        }
        let idx: Vec<usize> = (0..self.rows.len()).filter(|&i| self.has(i)).collect();
        let as_u32 = idx
            .iter()
            .map(|&i| u32::try_from(i))
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| Error::invalid("teacher cache", "a dataset index does not fit in u32"))?;
        ckpt.insert_tensor(
            format!("{prefix}/index"),
            Tensor::from_vec(as_u32, idx.len(), &Device::Cpu)?,
        );
        let all = self.gather(&idx)?;
        for (name, t) in all.into_vec() {
            ckpt.insert_tensor(format!("{prefix}/stage/{name}"), t);
        }
        Ok(())
    }

    /// A cache of `stages` read back from what [`TeacherCache::save`] wrote.
    pub(crate) fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        stages: &[String],
        teacher_crc: u32,
    ) -> Result<Self> {
        let filled: usize = ckpt.meta_parse(&format!("{prefix}.filled"))?;
        let mut cache = TeacherCache::new(stages.to_vec(), teacher_crc);
        if filled == 0 {
            return Ok(cache);
        }
        // host-ok: checkpoint loading.
        let idx = ckpt
            .tensor(&format!("{prefix}/index"))?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        if idx.len() != filled {
            return Err(Error::malformed(
                "<checkpoint>",
                "teacher cache",
                format!("{filled} cached samples"),
                format!("an index of {}", idx.len()),
            ));
        }
        let mut feats = Features::new();
        for name in stages {
            let t = ckpt.tensor(&format!("{prefix}/stage/{name}"))?;
            if t.rank() == 0 || t.dim(0)? != filled {
                return Err(Error::malformed(
                    "<checkpoint>",
                    format!("teacher cache stage `{name}`"),
                    format!("{filled} rows"),
                    format!("shape {:?}", t.dims()),
                ));
            }
            feats.push(name.clone(), t.clone());
        }
        let indices: Vec<usize> = idx.iter().map(|&i| i as usize).collect();
        cache.insert(&indices, &feats)?;
        Ok(cache)
    }
}
