//! Multi-layer perceptron.

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::config::config;
use crate::nn::{
    Activation, BatchNorm, BatchNormConfig, Dropout, DropoutConfig, FeatureExtractor, Features,
    Linear,
};
use crate::{Error, Result};

config! {
    /// Configuration of an [`Mlp`].
    pub struct MlpConfig {
        /// Layer widths, input first and output last: `[784, 128, 10]` is one
        /// hidden layer of 128 (default: the MLP student of the distillation
        /// protocol in docs/benchmarks.md, `Flatten–Linear(784,128)–ReLU–Linear(128,10)`).
        sizes: Vec<usize> = vec![784, 128, 10],
        /// Activation after every hidden layer (default ReLU).
        activation: Activation = Activation::Relu,
        /// BatchNorm after every hidden linear layer, before the activation
        /// (default false).
        batch_norm: bool = false,
        /// BatchNorm without affine parameters after the last linear layer
        /// (SimSiam's projector; default false).
        last_batch_norm: bool = false,
        /// Dropout probability after every hidden activation (default 0: none).
        dropout: f64 = 0.0,
        /// Linear layers have biases (torch default true).
        bias: bool = true,
        /// Seed of the dropout masks (default 0).
        dropout_seed: u64 = 0,
    }
}

impl MlpConfig {
    /// An MLP with these widths (input first, output last) and the other
    /// fields at their defaults.
    pub fn new(sizes: impl Into<Vec<usize>>) -> Self {
        Self {
            sizes: sizes.into(),
            ..Self::default()
        }
    }
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.sizes.len() < 2 || self.sizes.contains(&0) {
            return Err(Error::config(
                "MlpConfig::sizes",
                format!("{:?}", self.sizes),
                "need at least an input and an output width, all ≥ 1",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "MlpConfig::dropout",
                self.dropout,
                "must be in [0, 1)",
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
enum Layer {
    Linear(Linear),
    Bn(BatchNorm),
    Act(Activation),
    Drop(Box<Dropout>),
}

/// A multi-layer perceptron: `[Linear, (BatchNorm), activation,
/// (Dropout)] × hidden, Linear, (BatchNorm)`.
///
/// Inputs of rank > 2 are flattened after the batch dimension first (after
/// the task and batch dimensions when built from per-task parameters, see
/// [`crate::nn::ParamMap::expand_tasks`]). Tensor
/// names follow the indices of the equivalent `torch.nn.Sequential`, where
/// every module (activations and dropout included) takes an index: with
/// BatchNorm, `Linear–BN–ReLU–Linear` is `0.weight, 0.bias, 1.weight, 1.bias,
/// 1.running_mean, 1.running_var, 3.weight, 3.bias`, so a state dict of
/// that Sequential loads directly.
///
/// ```
/// use aimass::candle::{DType, Device, Tensor};
/// use aimass::candle_nn::VarMap;
/// use aimass::nn::{Mlp, MlpConfig};
///
/// let vm = VarMap::new();
/// let vb = aimass::nn::init::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
/// let mlp = Mlp::new(MlpConfig::new([784, 128, 10]), vb)?;
/// let y = mlp.forward_t(&Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?, false)?;
/// assert_eq!(y.dims(), &[2, 10]);
/// assert_eq!(aimass::nn::params::num_params(&vm)?, 784 * 128 + 128 + 128 * 10 + 10);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<Layer>,
    n_hidden: usize,
    out_dim: usize,
}

impl Mlp {
    /// Builds the MLP under `vb`.
    pub fn new(cfg: MlpConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut layers = Vec::new();
        let mut idx = 0usize;
        let n_lin = cfg.sizes.len() - 1;
        for (i, w) in cfg.sizes.windows(2).enumerate() {
            let (din, dout) = (w[0], w[1]);
            layers.push(Layer::Linear(Linear::new(
                din,
                dout,
                cfg.bias,
                vb.pp(idx.to_string()),
            )?));
            idx += 1;
            let last = i + 1 == n_lin;
            if last {
                if cfg.last_batch_norm {
                    let bn_cfg = BatchNormConfig::default().with_affine(false);
                    layers.push(Layer::Bn(BatchNorm::new(
                        dout,
                        bn_cfg,
                        vb.pp(idx.to_string()),
                    )?));
                }
                break;
            }
            if cfg.batch_norm {
                layers.push(Layer::Bn(BatchNorm::new(
                    dout,
                    BatchNormConfig::default(),
                    vb.pp(idx.to_string()),
                )?));
                idx += 1;
            }
            layers.push(Layer::Act(cfg.activation));
            idx += 1;
            if cfg.dropout > 0.0 {
                layers.push(Layer::Drop(Box::new(Dropout::new(
                    DropoutConfig::default()
                        .with_p(cfg.dropout)
                        .with_seed(cfg.dropout_seed.wrapping_add(i as u64)),
                )?)));
                idx += 1;
            }
        }
        let out_dim = cfg.sizes.last().copied().unwrap_or(0);
        Ok(Self {
            layers,
            n_hidden: n_lin - 1,
            out_dim,
        })
    }

    /// The output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Whether the MLP was built from per-task parameters
    /// ([`crate::nn::ParamMap::expand_tasks`]): inputs are then
    /// `(T, N, ...)`, flattened after the second dimension.
    pub fn is_task_batched(&self) -> bool {
        matches!(self.layers.first(), Some(Layer::Linear(l)) if l.is_task_batched())
    }

    /// Per-task weights: `(T, n, ...)` inputs, run as columns `(T, d, n)`
    /// (see [`Linear::forward_task_columns`]).
    fn run_tasks(&self, x: &Tensor, train: bool, mut rec: Option<&mut Features>) -> Result<Tensor> {
        let x = if x.rank() > 3 {
            x.flatten_from(2)?
        } else {
            x.clone()
        };
        if x.rank() != 3 {
            return Err(Error::shape(
                "Mlp (per-task weights)",
                "input (T, n, features) with the tasks first",
                x.dims(),
            ));
        }
        let mut h = x.transpose(1, 2)?;
        let mut hidden = 0usize;
        for (k, l) in self.layers.iter().enumerate() {
            h =
                match l {
                    Layer::Linear(m) => m.forward_task_columns(&h)?,
                    Layer::Act(a) => a.apply(&h)?,
                    Layer::Drop(d) => d.forward_t(&h, train)?,
                    Layer::Bn(_) => return Err(Error::invalid(
                        "Mlp (per-task weights)",
                        "BatchNorm would mix the tasks' statistics: run the tasks one at a time",
                    )),
                };
            if matches!(self.layers.get(k + 1), Some(Layer::Linear(_))) {
                hidden += 1;
                if let Some(r) = rec.as_deref_mut() {
                    r.push(format!("hidden{hidden}"), h.transpose(1, 2)?);
                }
            }
        }
        let out = h.transpose(1, 2)?;
        if let Some(r) = rec {
            r.push("output", out.clone());
        }
        Ok(out)
    }

    fn run(&self, x: &Tensor, train: bool, mut rec: Option<&mut Features>) -> Result<Tensor> {
        if self.is_task_batched() {
            return self.run_tasks(x, train, rec);
        }
        let mut x = if x.rank() > 2 {
            x.flatten_from(1)?
        } else {
            x.clone()
        };
        let mut hidden = 0usize;
        for (k, l) in self.layers.iter().enumerate() {
            x = match l {
                Layer::Linear(m) => m.forward(&x)?,
                Layer::Bn(m) => m.forward_t(&x, train)?,
                Layer::Act(a) => a.apply(&x)?,
                Layer::Drop(d) => d.forward_t(&x, train)?,
            };
            // A hidden layer ends before the next Linear.
            let ends_hidden = matches!(self.layers.get(k + 1), Some(Layer::Linear(_)));
            if ends_hidden {
                hidden += 1;
                if let Some(r) = rec.as_deref_mut() {
                    r.push(format!("hidden{hidden}"), x.clone());
                }
            }
        }
        if let Some(r) = rec {
            r.push("output", x.clone());
        }
        Ok(x)
    }

    /// Applies the MLP in train or eval mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, None)
    }
}

impl ModuleT for Mlp {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Mlp::forward_t(self, x, train).map_err(crate::nn::to_candle)
    }
}

impl FeatureExtractor for Mlp {
    /// `hidden1`, ..., `hiddenK` (after each hidden block), `output`.
    fn feature_names(&self) -> Vec<String> {
        let mut v: Vec<String> = (1..=self.n_hidden).map(|i| format!("hidden{i}")).collect();
        v.push("output".into());
        v
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Features> {
        let mut f = Features::new();
        self.run(x, train, Some(&mut f))?;
        Ok(f)
    }
}
