//! Gradients as a value: named tensors that a caller can assemble.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Result};

/// Gradients by parameter name, assembled by the caller: straight out of a
/// backward pass ([`Gradients::from_store`]), the mean of a meta-batch's
/// task gradients ([`Gradients::mean_of`]), micro-batches accumulated by a
/// [`GradAccumulator`](super::GradAccumulator), or gradients with respect to
/// functional parameters ([`crate::nn::ParamMap::grad`]).
///
/// Every optimizer steps from them with
/// [`Optimizer::step_gradients`](crate::optim::Optimizer::step_gradients),
/// with the same result as stepping from the [`GradStore`] they came from.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::autograd::Gradients;
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
/// let w = vb.get_with_hints(2, "w", aimass::candle_nn::Init::Const(1.0))?;
/// let x = Tensor::new(&[3.0f64, 4.0], &Device::Cpu)?;
/// let loss = (&w * &x)?.sum_all()?;
/// let grads = Gradients::from_varmap(&loss.backward()?, &varmap)?;
/// assert_eq!(grads.get("w").unwrap().to_vec1::<f64>()?, vec![3.0, 4.0]);
/// let half = grads.scale(0.5)?;
/// assert_eq!(half.get("w").unwrap().to_vec1::<f64>()?, vec![1.5, 2.0]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Gradients {
    map: BTreeMap<String, Tensor>,
}

impl Gradients {
    /// No gradients.
    pub fn new() -> Self {
        Self::default()
    }

    /// The gradients in `store` of the named variables `params`; variables
    /// without a gradient in `store` are left out.
    pub fn from_store(store: &GradStore, params: &[(String, Var)]) -> Self {
        let map = params
            .iter()
            .filter_map(|(n, v)| store.get(v).map(|g| (n.clone(), g.clone())))
            .collect();
        Gradients { map }
    }

    /// The gradients in `store` of every parameter of `varmap` (buffers,
    /// i.e. BatchNorm running statistics, are never included).
    pub fn from_varmap(store: &GradStore, varmap: &VarMap) -> Result<Self> {
        let params: Vec<(String, Var)> = crate::nn::params::named_vars(varmap)?
            .into_iter()
            .filter(|(n, _)| !crate::nn::params::is_buffer(n))
            .collect();
        Ok(Self::from_store(store, &params))
    }

    /// Sets the gradient of `name`, returning the previous one.
    pub fn insert(&mut self, name: impl Into<String>, grad: Tensor) -> Option<Tensor> {
        self.map.insert(name.into(), grad)
    }

    /// The gradient of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    /// Removes and returns the gradient of `name`.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.map.remove(name)
    }

    /// The number of gradients.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The parameter names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.map.keys().map(String::as_str).collect()
    }

    /// (name, gradient) pairs, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.map.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The same gradients cut from the graph that computed them (a
    /// gradient computed with second order on keeps its graph, and with it
    /// every activation of the step).
    pub fn detach(&self) -> Self {
        Gradients {
            map: self
                .map
                .iter()
                .map(|(n, t)| (n.clone(), t.detach()))
                .collect(),
        }
    }

    /// Every gradient multiplied by `factor`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a non-finite factor.
    pub fn scale(&self, factor: f64) -> Result<Self> {
        if !factor.is_finite() {
            return Err(Error::invalid(
                "Gradients::scale",
                format!("the factor must be finite, got {factor}"),
            ));
        }
        let map = self
            .map
            .iter()
            .map(|(n, t)| Ok((n.clone(), (t * factor)?)))
            .collect::<Result<_>>()?;
        Ok(Gradients { map })
    }

    /// The sum of `self` and `other`, name by name; a name present in only
    /// one of them keeps that gradient (a parameter without a gradient
    /// contributes zero).
    ///
    /// # Errors
    ///
    /// [`Error::Shape`] when the two gradients of one name differ in shape.
    pub fn add(&self, other: &Gradients) -> Result<Self> {
        let mut map = self.map.clone();
        for (n, g) in &other.map {
            let sum = match map.get(n) {
                Some(a) => add_named(n, a, g)?,
                None => g.clone(),
            };
            map.insert(n.clone(), sum);
        }
        Ok(Gradients { map })
    }

    /// The mean of several gradient sets, name by name (each divided by the
    /// number of sets, so a parameter missing from some sets counts zero
    /// there): the meta-gradient of a meta-batch of tasks.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an empty list; [`Error::Shape`] as
    /// [`Gradients::add`].
    pub fn mean_of(sets: &[Gradients]) -> Result<Self> {
        let Some((first, rest)) = sets.split_first() else {
            return Err(Error::invalid(
                "Gradients::mean_of",
                "needs at least one set of gradients",
            ));
        };
        let mut sum = first.clone();
        for g in rest {
            sum = sum.add(g)?;
        }
        sum.scale(1.0 / sets.len() as f64)
    }
}

impl FromIterator<(String, Tensor)> for Gradients {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        Gradients {
            map: iter.into_iter().collect(),
        }
    }
}

impl IntoIterator for Gradients {
    type Item = (String, Tensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.map.into_iter()
    }
}

/// `a + b` for two gradients of parameter `name`, with a shape check.
pub(crate) fn add_named(name: &str, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::shape(
            format!("adding gradients of `{name}`"),
            format!("{:?}", a.dims()),
            b.dims(),
        ));
    }
    Ok((a + b.to_dtype(a.dtype())?)?)
}
