//! Meta-SGD: MAML with learned per-parameter inner learning rates.

use candle_core::ModuleT;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::config::config;
use crate::meta::gradient::{gradient_meta_api, GradientMeta, Settings, RATE_PREFIX};
use crate::meta::maml::check_inner;
use crate::meta::TaskLoss;
use crate::nn::params::{dtype_device, is_buffer, named_vars};
use crate::nn::Model;
use crate::optim::Optimizer;
use crate::train::NonFinitePolicy;
use crate::{Error, Result};

config! {
    /// Settings of [`MetaSgd`].
    pub struct MetaSgdConfig {
        /// Initial value of every learned inner learning rate (default
        /// 0.01; Li et al. draw them from U[0.005, 0.1], learn2learn
        /// starts them all at one value).
        init_lr: f64 = 0.01,
        /// Inner steps per task during meta-training (default 1, Li et al.'s).
        inner_steps: usize = 1,
        /// First-order Meta-SGD (default false: exact second order). The
        /// rates still get a gradient: the adapted weights depend on them
        /// directly.
        first_order: bool = false,
        /// Run the meta-batch's tasks at once on per-task weights (see
        /// [`MamlConfig::batch_tasks`](crate::meta::MamlConfig::batch_tasks)).
        /// Default false. The learned rates are shared by the tasks; the
        /// meta-gradient is the per-task one (tested against finite
        /// differences).
        batch_tasks: bool = false,
        /// The loss of the inner steps and of the query sets (default
        /// cross-entropy).
        loss: TaskLoss = TaskLoss::CrossEntropy,
        /// What to do on a non-finite query loss or meta-gradient (default:
        /// error).
        non_finite: NonFinitePolicy = NonFinitePolicy::Error,
    }
}

/// Adds Meta-SGD's learned learning rates to a model's variables: for
/// every parameter `p`, a variable `meta_sgd.lr.p` of `p`'s shape, set to
/// `init_lr` (variables already there are kept, so loading a meta-trained
/// model and calling this again changes nothing).
///
/// Call it before building the meta-optimizer over the `VarMap`, so that
/// the optimizer learns the rates with the weights. The rates are saved and
/// loaded with the model; they are parameters, so an optimizer with weight
/// decay would decay them (Li et al. use Adam without).
///
/// # Errors
///
/// [`Error::Config`] for a non-finite `init_lr`.
pub fn add_learned_rates(varmap: &VarMap, init_lr: f64) -> Result<()> {
    if !init_lr.is_finite() {
        return Err(Error::config(
            "MetaSgdConfig::init_lr",
            init_lr,
            "must be finite",
        ));
    }
    let (dtype, device) = dtype_device(varmap)?;
    let vb = VarBuilder::from_varmap(varmap, dtype, &device);
    for (name, var) in named_vars(varmap)? {
        if is_buffer(&name) || name.starts_with(RATE_PREFIX) {
            continue;
        }
        vb.get_with_hints(
            var.shape(),
            &format!("{RATE_PREFIX}{name}"),
            Init::Const(init_lr),
        )?;
    }
    Ok(())
}

/// Meta-SGD (Li et al., "Meta-SGD: Learning to Learn Quickly for Few-Shot
/// Learning", 2017): MAML whose inner step is `φ ← φ − α ⊙ ∇φ L_support`
/// with a learned rate `α` for every element of every parameter,
/// meta-learned together with the initial weights.
///
/// The rates are variables `meta_sgd.lr.<param>` of the model's `VarMap`,
/// added by [`add_learned_rates`] before the meta-optimizer is built, so
/// one optimizer learns both; they are checkpointed and saved with the
/// model (adapting a meta-trained model needs them).
///
/// ```
/// use aimass::prelude::*;
/// use aimass::meta::{add_learned_rates, MetaSgd, MetaSgdConfig, TaskLoss};
/// use aimass::nn::{init, Mlp, MlpConfig, Model};
/// use aimass::optim::{Adam, AdamConfig};
///
/// let build = |vb: VarBuilder| Mlp::new(MlpConfig::new([1, 40, 40, 1]), vb);
/// let varmap = VarMap::new();
/// let model = Model::new(build(init::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu))?, varmap);
/// let cfg = MetaSgdConfig::default().with_loss(TaskLoss::Mse).with_first_order(true);
/// add_learned_rates(model.varmap(), cfg.init_lr)?; // before the optimizer
/// let opt = Adam::from_varmap(model.varmap(), AdamConfig::default().with_lr(1e-3))?;
/// let meta_sgd = MetaSgd::new(model, build, opt, cfg)?;
/// # Ok::<(), aimass::Error>(())
/// ```
///
/// Everything else is [`Maml`](crate::meta::Maml)'s: second or first
/// order, the clone/adapt API, [`crate::train::TrainStep`] with exact
/// resume, `evaluate`.
pub struct MetaSgd<M, B, O> {
    core: GradientMeta<M, B, O>,
}

impl<M, B, O> MetaSgd<M, B, O>
where
    M: ModuleT,
    B: Fn(VarBuilder<'static>) -> Result<M>,
    O: Optimizer,
{
    /// Meta-SGD on `model` (rebuilt by `build`), meta-optimized by
    /// `optimizer`, which must hold the learned rates.
    ///
    /// # Errors
    ///
    /// As [`Maml::new`](crate::meta::Maml::new), and
    /// [`Error::InvalidArgument`] when a parameter has no learned rate
    /// (call [`add_learned_rates`] first) or the optimizer does not hold
    /// the rates (build it after [`add_learned_rates`]).
    pub fn new(model: Model<M>, build: B, optimizer: O, cfg: MetaSgdConfig) -> Result<Self> {
        check_inner("MetaSgdConfig", cfg.init_lr, cfg.inner_steps)?;
        let names: Vec<String> = model
            .named_parameters()?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let optimized = optimizer.param_names();
        for name in names.iter().filter(|n| !n.starts_with(RATE_PREFIX)) {
            let rate = format!("{RATE_PREFIX}{name}");
            if !names.contains(&rate) {
                return Err(Error::invalid(
                    "MetaSgd::new",
                    format!("the parameter `{name}` has no learned learning rate `{rate}`: call aimass::meta::add_learned_rates(model.varmap(), cfg.init_lr) before building the optimizer"),
                ));
            }
            if !optimized.contains(&rate) {
                return Err(Error::invalid(
                    "MetaSgd::new",
                    format!("the optimizer does not hold the learned rate `{rate}`, so the rates would never be learned: build it over the model's VarMap after add_learned_rates"),
                ));
            }
        }
        let mut settings = Settings::new(
            cfg.init_lr,
            cfg.inner_steps,
            cfg.first_order,
            cfg.batch_tasks,
            cfg.loss,
            cfg.non_finite,
        );
        settings.learned_rates = true;
        Ok(MetaSgd {
            core: GradientMeta::new(model, build, optimizer, settings, "MetaSgd")?,
        })
    }
}

gradient_meta_api!(MetaSgd, "meta_sgd");
