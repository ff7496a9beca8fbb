//! ANIL: MAML that adapts only the head.

use candle_core::ModuleT;
use candle_nn::VarBuilder;

use crate::config::config;
use crate::meta::gradient::{gradient_meta_api, GradientMeta, Settings};
use crate::meta::maml::check_inner;
use crate::meta::TaskLoss;
use crate::nn::Model;
use crate::optim::Optimizer;
use crate::train::NonFinitePolicy;
use crate::{Error, Result};

config! {
    /// Settings of [`Anil`]; the inner loop's defaults are [`Maml`](crate::meta::Maml)'s.
    pub struct AnilConfig {
        /// The head: parameters whose name starts with this prefix are
        /// adapted in the inner loop, all others only meta-learned
        /// (default `"head."`).
        head: String = "head.".to_string(),
        /// Inner learning rate α (default 0.01).
        inner_lr: f64 = 0.01,
        /// Inner SGD steps per task during meta-training (default 1).
        inner_steps: usize = 1,
        /// First-order ANIL (default false: exact second order).
        first_order: bool = false,
        /// Run the meta-batch's tasks at once on per-task weights (see
        /// [`MamlConfig::batch_tasks`](crate::meta::MamlConfig::batch_tasks)).
        /// Default false.
        batch_tasks: bool = false,
        /// The loss of the inner steps and of the query sets (default
        /// cross-entropy).
        loss: TaskLoss = TaskLoss::CrossEntropy,
        /// What to do on a non-finite query loss or meta-gradient (default:
        /// error).
        non_finite: NonFinitePolicy = NonFinitePolicy::Error,
    }
}

/// ANIL, "almost no inner loop" (Raghu et al., "Rapid Learning or Feature
/// Reuse? Towards Understanding the Effectiveness of MAML", ICLR 2020):
/// MAML whose inner loop adapts only the head, the parameters named
/// `head*` ([`AnilConfig::head`]); the body is meta-learned through the
/// query loss but never adapted.
///
/// Everything else is [`Maml`](crate::meta::Maml)'s: second or first
/// order, the clone/adapt API, [`crate::train::TrainStep`] with exact
/// resume, `evaluate`. The body still runs at every inner step (the head's
/// gradient depends on its features); the second-order terms flow through
/// the head only.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::meta::{Anil, AnilConfig};
/// use aimass::nn::{init, linear, seq, Activation, Model};
/// use aimass::optim::{Adam, AdamConfig};
///
/// let build = |vb: VarBuilder| -> aimass::Result<_> {
///     Ok(seq()
///         .add(linear(4, 8, vb.pp("body"))?)
///         .add(Activation::Relu)
///         .add(linear(8, 3, vb.pp("head"))?))
/// };
/// let varmap = VarMap::new();
/// let model = Model::new(build(init::seeded_var_builder(&varmap, 0, DType::F32, &Device::Cpu))?, varmap);
/// let opt = Adam::from_varmap(model.varmap(), AdamConfig::default())?;
/// let anil = Anil::new(model, build, opt, AnilConfig::default().with_first_order(true))?;
/// # Ok::<(), aimass::Error>(())
/// ```
pub struct Anil<M, B, O> {
    core: GradientMeta<M, B, O>,
}

impl<M, B, O> Anil<M, B, O>
where
    M: ModuleT,
    B: Fn(VarBuilder<'static>) -> Result<M>,
    O: Optimizer,
{
    /// ANIL on `model` (rebuilt by `build`), meta-optimized by `optimizer`.
    ///
    /// # Errors
    ///
    /// As [`Maml::new`](crate::meta::Maml::new), and [`Error::Config`] when
    /// no parameter's name starts with [`AnilConfig::head`] (the message
    /// lists the parameters).
    pub fn new(model: Model<M>, build: B, optimizer: O, cfg: AnilConfig) -> Result<Self> {
        check_inner("AnilConfig", cfg.inner_lr, cfg.inner_steps)?;
        let names: Vec<String> = model
            .named_parameters()?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        if cfg.head.is_empty() {
            return Err(Error::config(
                "AnilConfig::head",
                "\"\"",
                "must name the head's prefix (an empty prefix adapts every parameter: that is Maml)",
            ));
        }
        if !names.iter().any(|n| n.starts_with(&cfg.head)) {
            return Err(Error::config(
                "AnilConfig::head",
                format!("{:?}", cfg.head),
                format!(
                    "no parameter's name starts with it; name the head's prefix among the model's parameters {names:?}"
                ),
            ));
        }
        let mut settings = Settings::new(
            cfg.inner_lr,
            cfg.inner_steps,
            cfg.first_order,
            cfg.batch_tasks,
            cfg.loss,
            cfg.non_finite,
        );
        settings.rule.only = Some(cfg.head.clone());
        Ok(Anil {
            core: GradientMeta::new(model, build, optimizer, settings, "Anil")?,
        })
    }
}

gradient_meta_api!(Anil, "anil");
