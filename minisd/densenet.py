"""torchxrayvision's DenseNet-121 (`densenet121-res224-all`, Cohen et al. 2022, "TorchXRayVision: A library of chest
X-ray datasets and models") as the feature network of chest X-ray FID: what RoentGen and DiNO-Diffusion measured.

Sources: torchxrayvision 1.5.7 models.py (DenseNet, _DenseLayer, _DenseBlock, _Transition: torchvision's DenseNet
with one grey input channel), its datasets.py / utils.py for the preparation (normalize, XRayCenterCrop,
XRayResizer), and scikit-image's transform.resize, which XRayResizer calls.

Attribute paths are the release's keys (`features.denseblock1.denselayer1.norm1.weight`): the release is a
torchvision-style `features` nn.Sequential of named stages, kept as it is. The features are the 1024 values the
classifier reads: ReLU, then the mean over the 7 x 7 map (xrv's `DenseNet.features2`). Why not xrv's `features()`:
on the DenseNet that name is the nn.Sequential itself (it shadows the base class's feature method), whose output is
the 1024 x 7 x 7 map before the ReLU, 50,176 numbers per image: no FID statistics can be fitted to that.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 224     # the release's input_resolution: xrv resizes every image to it
MAX_VALUE = 1024     # xrv.utils.normalize: 8-bit values to [-1024, 1024], the range of its training data
TRUNCATE = 4.0       # scipy.ndimage.gaussian_filter's default, as scikit-image's anti-aliasing calls it


@dataclass(frozen=True)
class DenseNetConfig:
    """xrv's DenseNet constructor arguments; defaults are densenet121-res224-all (18 pathologies, one grey channel)."""
    growth_rate: int = 32
    block_config: tuple = (6, 12, 24, 16)
    num_init_features: int = 64
    bn_size: int = 4
    num_classes: int = 18
    in_channels: int = 1


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to bn_size * growth_rate, BN-ReLU-3x3 conv to growth_rate, concatenated onto the input
    (xrv's _DenseLayer; its relu1/relu2 hold no tensors and are calls here)."""

    def __init__(self, in_features: int, cfg: DenseNetConfig):
        super().__init__()
        width = cfg.bn_size * cfg.growth_rate
        self.norm1 = nn.BatchNorm2d(in_features)
        self.conv1 = nn.Conv2d(in_features, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cfg.growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(x))))))
        return torch.cat([x, new], dim=1)   # [N, C, H, W] -> [N, C + growth_rate, H, W]


class DenseBlock(nn.Sequential):
    """denselayer1..n, each seeing every earlier layer's output (xrv's _DenseBlock)."""

    def __init__(self, layers: int, in_features: int, cfg: DenseNetConfig):
        super().__init__(OrderedDict(
            (f"denselayer{i + 1}", DenseLayer(in_features + i * cfg.growth_rate, cfg)) for i in range(layers)))


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv halving the channels, then a 2x2 average pool halving the size (xrv's _Transition)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_features)), ("relu", nn.ReLU()),
            ("conv", nn.Conv2d(in_features, out_features, kernel_size=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2))]))


class DenseNet(nn.Module):
    """Prepared grey images [N, 1, 224, 224] -> features [N, 1024] (xrv's DenseNet.features2)."""

    def __init__(self, cfg: DenseNetConfig = DenseNetConfig()):
        super().__init__()
        self.config = cfg
        stages = [("conv0", nn.Conv2d(cfg.in_channels, cfg.num_init_features, 7, stride=2, padding=3, bias=False)),
                  ("norm0", nn.BatchNorm2d(cfg.num_init_features)), ("relu0", nn.ReLU()),
                  ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        width = cfg.num_init_features
        for i, layers in enumerate(cfg.block_config):
            stages.append((f"denseblock{i + 1}", DenseBlock(layers, width, cfg)))
            width += layers * cfg.growth_rate
            if i < len(cfg.block_config) - 1:   # a transition between blocks, none after the last
                stages.append((f"transition{i + 1}", Transition(width, width // 2)))
                width //= 2
        stages.append(("norm5", nn.BatchNorm2d(width)))
        self.features = nn.Sequential(OrderedDict(stages))
        self.feature_dim = width
        # Loaded (strictly, as the release stores it) but not run: the features are the classifier's input.
        self.classifier = nn.Linear(width, cfg.num_classes)

    def forward(self, x):
        # [N, 1024, 7, 7] -> ReLU -> mean over the map -> [N, 1024]
        return F.relu(self.features(x)).mean(dim=(2, 3))


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter of each [H, W] plane, mode "constant" (zeros beyond the edge), as
    scikit-image's resize anti-aliases before downsampling: a kernel of radius int(4 sigma + 0.5), normalised."""
    radius = int(TRUNCATE * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    n, c, h, w = x.shape
    # rows then columns, each a 1-D convolution with zero padding; [N, 1, H, W] -> [N*H, 1, W] and back
    x = F.conv1d(x.reshape(-1, 1, w), kernel[None, None], padding=radius).reshape(n, c, h, w)
    x = x.transpose(2, 3).reshape(-1, 1, h)
    return F.conv1d(x, kernel[None, None], padding=radius).reshape(n, c, w, h).transpose(2, 3)


def resize_like_skimage(x: torch.Tensor, size: int) -> torch.Tensor:
    """skimage.transform.resize(img, (1, size, size), mode="constant", preserve_range=True) of square [N, 1, S, S]
    float32 images, as xrv's XRayResizer calls it: when shrinking, a Gaussian of sigma (S / size - 1) / 2 first,
    then linear interpolation at pixel centres (scipy's zoom with grid_mode). Why grid_sample with zero padding,
    not F.interpolate: when enlarging, the outermost samples fall outside the image and scipy's "constant" mode
    blends them with 0 there (F.interpolate would repeat the edge); inside, the two are the same interpolation."""
    factor = x.shape[-1] / size
    if factor > 1:
        x = _gaussian_blur(x, (factor - 1) / 2)
    if factor == 1:
        return x
    # the output's pixel centres in grid_sample's [-1, 1] coordinates: an identity affine map
    identity = torch.eye(2, 3, dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
    grid = F.affine_grid(identity, [len(x), 1, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> float32 [N, 1, 224, 224] as xrv's README prepares an 8-bit image: normalize to
    [-1024, 1024], the mean of the colour channels (grey), XRayCenterCrop (the centred square of the short side,
    integer halves), XRayResizer(224)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"DenseNet features take uint8 images [N, 3, H, W], not {images.dtype} {list(images.shape)}")
    # xrv.utils.normalize: (2 * (img / 255) - 1) * 1024 in float32; then img.mean(2): grey
    x = ((2 * (images.float() / 255) - 1) * MAX_VALUE).mean(dim=1, keepdim=True)
    height, width = x.shape[2:]
    side = min(height, width)
    top, left = height // 2 - side // 2, width // 2 - side // 2
    return resize_like_skimage(x[:, :, top:top + side, left:left + side].contiguous(), INPUT_SIZE)


@torch.no_grad()
def features(model: DenseNet, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] (any size) -> float32 features [N, 1024], on the model's device."""
    weight = model.features.conv0.weight
    return model(prepare(images.to(weight.device)).to(weight.dtype)).float()

