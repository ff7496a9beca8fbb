//! A sequential container that passes the train flag to every layer.

use candle_core::{ModuleT, Tensor};

use crate::nn::{FeatureExtractor, Features};
use crate::Result;

/// Layers applied one after the other, each with the same `train` flag.
///
/// candle-nn's `Sequential` holds `Module`s only, so it cannot hold
/// BatchNorm or Dropout, whose behaviour depends on the mode; this one
/// holds any [`ModuleT`].
///
/// ```
/// use aimass::candle::{DType, Device, Tensor};
/// use aimass::candle_nn::VarMap;
/// use aimass::nn::{seq, Activation, BatchNorm, BatchNormConfig, Linear};
///
/// let vm = VarMap::new();
/// let vb = aimass::nn::init::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
/// let net = seq()
///     .add(Linear::new(4, 8, true, vb.pp("0"))?)
///     .add(BatchNorm::new(8, BatchNormConfig::default(), vb.pp("1"))?)
///     .add(Activation::Relu);
/// let y = net.forward_t(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?, true)?;
/// assert_eq!(y.dims(), &[3, 8]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Default)]
pub struct SequentialT {
    layers: Vec<Box<dyn ModuleT + Send + Sync>>,
}

impl std::fmt::Debug for SequentialT {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SequentialT({} layers)", self.layers.len())
    }
}

/// An empty [`SequentialT`].
pub fn seq() -> SequentialT {
    SequentialT::default()
}

impl SequentialT {
    /// Appends a layer.
    #[allow(clippy::should_implement_trait)]
    pub fn add<M: ModuleT + Send + Sync + 'static>(mut self, layer: M) -> Self {
        self.layers.push(Box::new(layer));
        self
    }

    /// Appends a function of the input and the train flag.
    pub fn add_fn<F>(self, f: F) -> Self
    where
        F: 'static + Fn(&Tensor, bool) -> candle_core::Result<Tensor> + Send + Sync,
    {
        self.add(FnLayer(f))
    }

    /// The number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Applies every layer in order.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            x = l.forward_t(&x, train)?;
        }
        Ok(x)
    }
}

impl ModuleT for SequentialT {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        SequentialT::forward_t(self, x, train).map_err(crate::nn::to_candle)
    }
}

/// Each layer's output is a stage named by its index, as the children of a
/// `torch.nn.Sequential` are (`0`, `1`, ...); the last one is the output.
/// So any [`ModuleT`] becomes a feature extractor (for instance a
/// distillation teacher or student) as `seq().add(module)`.
impl FeatureExtractor for SequentialT {
    fn feature_names(&self) -> Vec<String> {
        (0..self.layers.len()).map(|i| i.to_string()).collect()
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Features> {
        let mut f = Features::new();
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward_t(&x, train)?;
            f.push(i.to_string(), x.clone());
        }
        Ok(f)
    }
}

struct FnLayer<F>(F);

impl<F> ModuleT for FnLayer<F>
where
    F: Fn(&Tensor, bool) -> candle_core::Result<Tensor> + Send + Sync,
{
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        (self.0)(x, train)
    }
}
