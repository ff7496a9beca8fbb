//! The network every SSL trainer pretrains: a backbone (any model built
//! from a `VarBuilder`) followed by a projection head.

use std::sync::Arc;

use candle_core::{ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{HeadConfig, ProjectionHead, ResNet, ResNetConfig};
use crate::{Error, Result};

/// How to build the backbone being pretrained, and the width of its output
/// features (the input width of the projection head).
///
/// The builder is called once for the online network and again for each
/// copy a method needs (BYOL's target, MoCo's key encoder), each time with
/// a fresh `VarBuilder`; it must create the same variables every time. Any
/// model works: ours ([`Backbone::resnet`]) or a user's candle model whose
/// `forward_t` returns `(N, feature_dim)` features.
///
/// ```
/// use aimass::prelude::*;
/// use aimass::nn::{ResNet, ResNetConfig};
/// use aimass::ssl::Backbone;
///
/// // Ours, with its feature width taken from the config:
/// let tiny = Backbone::resnet(ResNetConfig::resnet_tiny());
/// assert_eq!(tiny.feature_dim(), 64);
/// // Any model built from a VarBuilder, with its feature width:
/// let mlp = Backbone::new(32, |vb| {
///     let fc = aimass::candle_nn::linear(784, 32, vb.pp("fc"))?;
///     Ok(aimass::nn::seq().add_fn(|x, _| x.flatten_from(1)).add(fc))
/// });
/// assert_eq!(mlp.feature_dim(), 32);
/// ```
pub struct Backbone<B> {
    build: Arc<dyn Fn(VarBuilder<'static>) -> Result<B> + Send + Sync>,
    feature_dim: usize,
}

impl<B> Clone for Backbone<B> {
    fn clone(&self) -> Self {
        Backbone {
            build: Arc::clone(&self.build),
            feature_dim: self.feature_dim,
        }
    }
}

impl<B> std::fmt::Debug for Backbone<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backbone")
            .field("feature_dim", &self.feature_dim)
            .finish_non_exhaustive()
    }
}

impl<B> Backbone<B> {
    /// A backbone with `feature_dim` output features, built by `build`.
    pub fn new(
        feature_dim: usize,
        build: impl Fn(VarBuilder<'static>) -> Result<B> + Send + Sync + 'static,
    ) -> Self {
        Backbone {
            build: Arc::new(build),
            feature_dim,
        }
    }

    /// The width of the backbone's output features.
    pub fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    /// Builds the backbone under `vb`.
    pub fn build(&self, vb: VarBuilder<'static>) -> Result<B> {
        if self.feature_dim == 0 {
            return Err(Error::config(
                "Backbone::feature_dim",
                0,
                "must be the (non-zero) width of the backbone's output features",
            ));
        }
        (self.build)(vb)
    }
}

impl Backbone<ResNet> {
    /// A [`ResNet`] without classifier (`num_classes` is ignored), e.g.
    /// [`ResNetConfig::resnet_tiny`]: 64 features for 28×28 images.
    pub fn resnet(config: ResNetConfig) -> Self {
        let config = config.with_num_classes(None);
        let feature_dim = config.feature_dim();
        Backbone::new(feature_dim, move |vb| ResNet::new(config.clone(), vb))
    }
}

/// A backbone followed by a projection head: `projector(backbone(x))`.
/// Variables are named `backbone.*` and `projector.*` (BYOL's and MoCo's
/// target networks are copies of this).
pub struct Encoder<B> {
    backbone: B,
    projector: ProjectionHead,
}

impl<B: ModuleT> Encoder<B> {
    /// Builds the backbone under `vb.pp("backbone")` and a head of layout
    /// `projector` (its `input_dim` set to the backbone's feature width)
    /// under `vb.pp("projector")`.
    pub fn new(
        backbone: &Backbone<B>,
        projector: &HeadConfig,
        vb: VarBuilder<'static>,
    ) -> Result<Self> {
        let head = projector.clone().with_input_dim(backbone.feature_dim());
        Ok(Encoder {
            backbone: backbone.build(vb.pp("backbone"))?,
            projector: ProjectionHead::new(head, vb.pp("projector"))?,
        })
    }

    /// The backbone.
    pub fn backbone(&self) -> &B {
        &self.backbone
    }

    /// The projection head.
    pub fn projector(&self) -> &ProjectionHead {
        &self.projector
    }

    /// Backbone features `(N, feature_dim)`, checked to be a matrix.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let h = self.backbone.forward_t(x, train)?;
        if h.rank() != 2 {
            return Err(Error::shape(
                "ssl::Encoder (backbone output)",
                "features of shape (N, feature_dim): pool and flatten inside the backbone",
                h.dims(),
            ));
        }
        Ok(h)
    }
}

impl<B: ModuleT> ModuleT for Encoder<B> {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.features(x, train).map_err(crate::nn::to_candle)?;
        ModuleT::forward_t(&self.projector, &h, train)
    }
}
