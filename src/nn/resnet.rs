//! ResNet (He et al. 2016) with torchvision's layout and parameter names.

use candle_core::{DType, ModuleT, Tensor};
use candle_nn::VarBuilder;

use crate::config::config;
use crate::nn::{
    global_avg_pool, BatchNorm, BatchNormConfig, Conv2d, Conv2dConfig, FeatureExtractor, Features,
    Linear, MaxPool2d,
};
use crate::ops::kernels;
use crate::{Error, Result};

/// The residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34), expansion 1.
    #[default]
    Basic,
    /// 1×1 – 3×3 (strided, as torchvision's "ResNet v1.5") – 1×1, expansion 4
    /// (ResNet-50 and deeper).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per unit of width (1 for Basic, 4 for Bottleneck).
    pub fn expansion(&self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The first layers of the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Stem {
    /// ImageNet stem: 7×7 conv stride 2 padding 3, BN, ReLU, 3×3 max pool
    /// stride 2 padding 1 (torchvision; divides the resolution by 4).
    #[default]
    ImageNet,
    /// Small-image stem for 28×28 / 32×32 inputs: 3×3 conv stride 1
    /// padding 1, BN, ReLU, no max pool (the CIFAR variant).
    Small,
}

config! {
    /// Configuration of a [`ResNet`]. The default is torchvision's
    /// `resnet18()` (ImageNet stem, 3 input channels, 1000 classes).
    #[derive(Eq)]
    pub struct ResNetConfig {
        /// Residual block type (resnet18: Basic).
        block: BlockKind = BlockKind::Basic,
        /// Blocks per stage (resnet18: 2, 2, 2, 2). One stage per entry; stage
        /// `i` is named `layer{i+1}`.
        layers: Vec<usize> = vec![2, 2, 2, 2],
        /// Width (planes) of each stage (torchvision: 64, 128, 256, 512). The
        /// stem outputs `widths[0]` channels; the first stage has stride 1 and
        /// every later one stride 2.
        widths: Vec<usize> = vec![64, 128, 256, 512],
        /// Input channels (torchvision: 3).
        in_channels: usize = 3,
        /// Stem type (torchvision: ImageNet).
        stem: Stem = Stem::ImageNet,
        /// Classes of the final `fc` layer, or `None` for a feature extractor
        /// whose output is the pooled features (torchvision: 1000).
        num_classes: Option<usize> = Some(1000),
    }
}

impl ResNetConfig {
    /// torchvision `resnet18`: Basic, [2, 2, 2, 2], 1000 classes
    /// (11,689,512 parameters).
    pub fn resnet18() -> Self {
        Self::default()
    }

    /// torchvision `resnet34`: Basic, [3, 4, 6, 3] (21,797,672 parameters).
    pub fn resnet34() -> Self {
        Self {
            layers: vec![3, 4, 6, 3],
            ..Self::resnet18()
        }
    }

    /// torchvision `resnet50`: Bottleneck, [3, 4, 6, 3] (25,557,032 parameters).
    pub fn resnet50() -> Self {
        Self {
            block: BlockKind::Bottleneck,
            layers: vec![3, 4, 6, 3],
            ..Self::resnet18()
        }
    }

    /// `resnet_tiny` of the reference protocols (docs/benchmarks.md,
    /// "Protocols"): small stem 3×3 conv 1→16,
    /// BN, ReLU; three stages of 2 BasicBlocks at widths 16/32/64, strides
    /// 1/2/2; global average pool; 64-d features, no classifier.
    pub fn resnet_tiny() -> Self {
        Self {
            block: BlockKind::Basic,
            layers: vec![2, 2, 2],
            widths: vec![16, 32, 64],
            in_channels: 1,
            stem: Stem::Small,
            num_classes: None,
        }
    }

    /// `resnet_small` of the reference protocols: as [`Self::resnet_tiny`]
    /// at widths 32/64/128 (128-d features).
    pub fn resnet_small() -> Self {
        Self {
            widths: vec![32, 64, 128],
            ..Self::resnet_tiny()
        }
    }

    /// The width of the pooled features: `widths.last() × expansion`.
    pub fn feature_dim(&self) -> usize {
        self.widths.last().copied().unwrap_or(0) * self.block.expansion()
    }
    /// Checks every field; called by the constructor.
    fn validate(&self) -> Result<()> {
        if self.layers.is_empty() || self.layers.len() != self.widths.len() {
            return Err(Error::config(
                "ResNetConfig::layers",
                format!("{:?} (widths {:?})", self.layers, self.widths),
                "need one entry per stage in both `layers` and `widths`, at least one stage",
            ));
        }
        if self.layers.contains(&0) || self.widths.contains(&0) {
            return Err(Error::config(
                "ResNetConfig::layers/widths",
                format!("{:?} / {:?}", self.layers, self.widths),
                "every stage needs at least one block and a width ≥ 1",
            ));
        }
        if self.in_channels == 0 {
            return Err(Error::config(
                "ResNetConfig::in_channels",
                0,
                "must be at least 1",
            ));
        }
        if self.num_classes == Some(0) {
            return Err(Error::config(
                "ResNetConfig::num_classes",
                "Some(0)",
                "use None for no classifier",
            ));
        }
        Ok(())
    }
}

fn conv_bn(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    vb: &VarBuilder,
    conv: &str,
    bn: &str,
) -> Result<(Conv2d, BatchNorm)> {
    let c = Conv2dConfig::default()
        .with_stride(stride)
        .with_padding(k / 2)
        .with_bias(false);
    Ok((
        Conv2d::new(cin, cout, k, c, vb.pp(conv))?,
        BatchNorm::new(cout, BatchNormConfig::default(), vb.pp(bn))?,
    ))
}

#[derive(Debug, Clone)]
struct Block {
    convs: Vec<(Conv2d, BatchNorm)>,
    downsample: Option<(Conv2d, BatchNorm)>,
}

impl Block {
    fn new(
        kind: BlockKind,
        cin: usize,
        planes: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cout = planes * kind.expansion();
        let convs = match kind {
            BlockKind::Basic => vec![
                conv_bn(cin, planes, 3, stride, &vb, "conv1", "bn1")?,
                conv_bn(planes, planes, 3, 1, &vb, "conv2", "bn2")?,
            ],
            BlockKind::Bottleneck => vec![
                conv_bn(cin, planes, 1, 1, &vb, "conv1", "bn1")?,
                conv_bn(planes, planes, 3, stride, &vb, "conv2", "bn2")?,
                conv_bn(planes, cout, 1, 1, &vb, "conv3", "bn3")?,
            ],
        };
        let downsample = if stride != 1 || cin != cout {
            let ds = vb.pp("downsample");
            Some(conv_bn(cin, cout, 1, stride, &ds, "0", "1")?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let Some(((last_conv, last_bn), rest)) = self.convs.split_last() else {
            return Err(Error::invalid(
                "ResNet block",
                "a block without convolutions",
            ));
        };
        let mut y = x.clone();
        for (c, b) in rest {
            y = b.forward_relu_t(&c.forward(&y)?, train)?;
        }
        let z = last_conv.forward(&y)?;
        let short = match &self.downsample {
            Some((c, b)) => b.forward_t(&c.forward(x)?, train)?,
            None => x.clone(),
        };
        // relu(bn(z) + short), one fused kernel in train mode on the CPU.
        last_bn.forward_add_relu_t(&z, &short, train)
    }
}

/// `conv` then `bn` as a stage of the fused residual kernel, when the
/// kernel takes it (no bias, one group, no dilation, parameters of `dt`).
fn fused_stage<'a>(conv: &'a Conv2d, bn: &'a BatchNorm, dt: DType) -> Option<kernels::ConvBn<'a>> {
    let p = conv.params();
    let (weight, bias) = bn.affine_params();
    let same = |t: Option<&Tensor>| t.is_none_or(|t| t.dtype() == dt);
    if conv.bias().is_some()
        || p.groups != 1
        || p.dilation != 1
        || conv.weight().dtype() != dt
        || !same(weight)
        || !same(bias)
    {
        return None;
    }
    Some(kernels::ConvBn {
        weight: conv.weight(),
        stride: (p.stride, p.stride),
        padding: (p.padding, p.padding),
        bn_weight: weight,
        bn_bias: bias,
        eps: bn.config().eps,
    })
}

/// Consecutive blocks run by one call of the fused training kernel
/// ([`kernels::residual_blocks_train`]), with their BatchNorm layers in the
/// order of the statistics it returns.
#[derive(Default)]
struct FusedRun<'a> {
    blocks: Vec<kernels::ResidualBlock<'a>>,
    bns: Vec<&'a BatchNorm>,
}

impl<'a> FusedRun<'a> {
    /// Appends `convs` (all ReLU'd but the last, whose ReLU follows the
    /// shortcut); `None` when a layer does not fit the kernel.
    fn push(
        &mut self,
        convs: &'a [(Conv2d, BatchNorm)],
        shortcut: Option<Option<&'a (Conv2d, BatchNorm)>>,
        dt: DType,
    ) -> Option<()> {
        let mut stages = Vec::with_capacity(convs.len());
        for (c, b) in convs {
            stages.push(fused_stage(c, b, dt)?);
            self.bns.push(b);
        }
        let shortcut = match shortcut {
            None => kernels::Shortcut::None,
            Some(None) => kernels::Shortcut::Identity,
            Some(Some((c, b))) => {
                self.bns.push(b);
                kernels::Shortcut::Projection(fused_stage(c, b, dt)?)
            }
        };
        self.blocks
            .push(kernels::ResidualBlock { stages, shortcut });
        Some(())
    }

    /// Runs the blocks gathered so far on `x` (returns `x` when there are
    /// none) and updates the BatchNorm running statistics.
    fn flush(&mut self, x: Tensor) -> Result<Tensor> {
        if self.blocks.is_empty() {
            return Ok(x);
        }
        let out = kernels::residual_blocks_train(&x, &self.blocks)?;
        if out.stats.len() != self.bns.len() {
            return Err(Error::invalid(
                "ResNet (fused training step)",
                "the kernel returned statistics for another number of BatchNorm layers",
            ));
        }
        for (bn, st) in self.bns.iter().zip(&out.stats) {
            if st.count <= 1 {
                return Err(Error::shape(
                    "BatchNorm (train mode)",
                    "more than one value per channel (batch of ≥ 2, or spatial size > 1)",
                    x.dims(),
                ));
            }
            bn.update_running_stats(&st.mean, &st.var, st.count)?;
        }
        self.blocks.clear();
        self.bns.clear();
        Ok(out.output)
    }
}

/// A residual network with torchvision's parameter names (`conv1.weight`,
/// `bn1.running_mean`, `layer1.0.conv1.weight`, `layer2.0.downsample.0.weight`,
/// `layer2.0.downsample.1.*`, `fc.weight`, ...), so a torchvision state dict
/// (saved as safetensors) loads with [`crate::nn::params::load`].
///
/// `forward_t` returns the logits when the configuration has a classifier,
/// else the pooled features; [`ResNet::features`] always returns the pooled
/// features; [`FeatureExtractor::forward_features`] records `stem`,
/// `layer1`, ..., `pool` and (with a classifier) `logits`.
///
/// ```
/// use aimass::candle::{DType, Device, Tensor};
/// use aimass::candle_nn::VarMap;
/// use aimass::nn::{ResNet, ResNetConfig};
///
/// let vm = VarMap::new();
/// let vb = aimass::nn::init::seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
/// let net = ResNet::new(ResNetConfig::resnet_tiny(), vb)?;
/// let x = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
/// assert_eq!(net.forward_t(&x, false)?.dims(), &[2, 64]);
/// # Ok::<(), aimass::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ResNet {
    /// `conv1` and `bn1`.
    stem: (Conv2d, BatchNorm),
    maxpool: Option<MaxPool2d>,
    stages: Vec<Vec<Block>>,
    fc: Option<Linear>,
    cfg: ResNetConfig,
}

impl ResNet {
    /// Builds the network under `vb`.
    pub fn new(cfg: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let w0 = cfg.widths[0];
        let (conv1, bn1) = match cfg.stem {
            Stem::ImageNet => conv_bn(cfg.in_channels, w0, 7, 2, &vb, "conv1", "bn1")?,
            Stem::Small => conv_bn(cfg.in_channels, w0, 3, 1, &vb, "conv1", "bn1")?,
        };
        let maxpool = match cfg.stem {
            Stem::ImageNet => Some(MaxPool2d::new(3, 2, 1)?),
            Stem::Small => None,
        };
        let mut cin = w0;
        let mut stages = Vec::with_capacity(cfg.layers.len());
        for (i, (&n, &planes)) in cfg.layers.iter().zip(cfg.widths.iter()).enumerate() {
            let vs = vb.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::with_capacity(n);
            for j in 0..n {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                blocks.push(Block::new(
                    cfg.block,
                    cin,
                    planes,
                    stride,
                    vs.pp(j.to_string()),
                )?);
                cin = planes * cfg.block.expansion();
            }
            stages.push(blocks);
        }
        let fc = match cfg.num_classes {
            Some(k) => Some(Linear::new(cin, k, true, vb.pp("fc"))?),
            None => None,
        };
        Ok(Self {
            stem: (conv1, bn1),
            maxpool,
            stages,
            fc,
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// The width of the pooled features.
    pub fn feature_dim(&self) -> usize {
        self.cfg.feature_dim()
    }

    /// The convolutions up to the global pooling in training mode through
    /// the fused kernel ([`kernels::residual_blocks_train`]: the stem and
    /// all blocks as one op, split only where a max pool or a recorded
    /// feature sits between them), or `None` when it does not take these
    /// tensors (not on the CPU, another dtype).
    fn body_fused(
        &self,
        x: &Tensor,
        record: bool,
        push: &mut dyn FnMut(String, &Tensor),
    ) -> Result<Option<Tensor>> {
        let dt = x.dtype();
        if !kernels::supports(x) {
            return Ok(None);
        }
        let mut run = FusedRun::default();
        let stem = std::slice::from_ref(&self.stem);
        if run.push(stem, None, dt).is_none() {
            return Ok(None);
        }
        for blocks in &self.stages {
            for b in blocks {
                if run
                    .push(&b.convs, Some(b.downsample.as_ref()), dt)
                    .is_none()
                {
                    return Ok(None);
                }
            }
        }
        // Every layer fits: run them, flushing at the stem's max pool and
        // at each recorded feature.
        let mut run = FusedRun::default();
        let mut h = x.clone();
        run.push(stem, None, dt);
        if let Some(mp) = &self.maxpool {
            h = mp.forward(&run.flush(h)?)?;
        }
        if record {
            h = run.flush(h)?;
            push("stem".into(), &h);
        }
        for (i, blocks) in self.stages.iter().enumerate() {
            for b in blocks {
                run.push(&b.convs, Some(b.downsample.as_ref()), dt);
            }
            if record {
                h = run.flush(h)?;
                push(format!("layer{}", i + 1), &h);
            }
        }
        Ok(Some(run.flush(h)?))
    }

    fn run(
        &self,
        x: &Tensor,
        train: bool,
        classify: bool,
        mut rec: Option<&mut Features>,
    ) -> Result<Tensor> {
        if x.rank() != 4 || x.dim(1)? != self.cfg.in_channels {
            return Err(Error::shape(
                "ResNet",
                format!("(N, {}, H, W)", self.cfg.in_channels),
                x.dims(),
            ));
        }
        let record = rec.is_some();
        let mut push = |name: String, t: &Tensor| {
            if let Some(r) = rec.as_deref_mut() {
                r.push(name, t.clone());
            }
        };
        let fused = if train {
            self.body_fused(x, record, &mut push)?
        } else {
            None
        };
        let h = match fused {
            Some(h) => h,
            None => {
                let (conv1, bn1) = &self.stem;
                let mut h = bn1.forward_relu_t(&conv1.forward(x)?, train)?;
                if let Some(mp) = &self.maxpool {
                    h = mp.forward(&h)?;
                }
                push("stem".into(), &h);
                for (i, blocks) in self.stages.iter().enumerate() {
                    for b in blocks {
                        h = b.forward_t(&h, train)?;
                    }
                    push(format!("layer{}", i + 1), &h);
                }
                h
            }
        };
        let f = global_avg_pool(&h)?;
        push("pool".into(), &f);
        match (&self.fc, classify) {
            (Some(fc), true) => {
                let y = fc.forward(&f)?;
                push("logits".into(), &y);
                Ok(y)
            }
            _ => Ok(f),
        }
    }

    /// The logits (with a classifier) or the pooled features (without).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, true, None)
    }

    /// The pooled features before the classifier, `(N, feature_dim)`.
    pub fn features(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.run(x, train, false, None)
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        ResNet::forward_t(self, x, train).map_err(crate::nn::to_candle)
    }
}

impl FeatureExtractor for ResNet {
    /// `stem`, `layer1`, ..., `layerK`, `pool`, and `logits` with a classifier.
    fn feature_names(&self) -> Vec<String> {
        let mut v = vec!["stem".to_string()];
        v.extend((1..=self.stages.len()).map(|i| format!("layer{i}")));
        v.push("pool".into());
        if self.fc.is_some() {
            v.push("logits".into());
        }
        v
    }

    fn forward_features(&self, x: &Tensor, train: bool) -> Result<Features> {
        let mut f = Features::new();
        self.run(x, train, true, Some(&mut f))?;
        Ok(f)
    }
}

/// torchvision `resnet18(num_classes)` under `vb`.
pub fn resnet18(num_classes: Option<usize>, vb: VarBuilder) -> Result<ResNet> {
    ResNet::new(ResNetConfig::resnet18().with_num_classes(num_classes), vb)
}

/// torchvision `resnet34(num_classes)` under `vb`.
pub fn resnet34(num_classes: Option<usize>, vb: VarBuilder) -> Result<ResNet> {
    ResNet::new(ResNetConfig::resnet34().with_num_classes(num_classes), vb)
}

/// torchvision `resnet50(num_classes)` under `vb`.
pub fn resnet50(num_classes: Option<usize>, vb: VarBuilder) -> Result<ResNet> {
    ResNet::new(ResNetConfig::resnet50().with_num_classes(num_classes), vb)
}

/// The `resnet_tiny` feature extractor (see [`ResNetConfig::resnet_tiny`]).
pub fn resnet_tiny(vb: VarBuilder) -> Result<ResNet> {
    ResNet::new(ResNetConfig::resnet_tiny(), vb)
}

/// The `resnet_small` feature extractor (see [`ResNetConfig::resnet_small`]).
pub fn resnet_small(vb: VarBuilder) -> Result<ResNet> {
    ResNet::new(ResNetConfig::resnet_small(), vb)
}
