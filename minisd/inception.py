"""Inception-v3 as FID defines it: the 2015 TensorFlow graph, as torch-fidelity ported it; its 2048-d pool features.

Source: FeatureExtractorInceptionV3 in torch_fidelity/feature_extractor_inceptionv3.py (toshas/torch-fidelity), the
network torchmetrics' FrechetInceptionDistance runs. Module paths are the keys of torch-fidelity's weights file (a
plain state dict converted from TF's `classify_image_graph_def.pb`). Why not torchvision's Inception-v3: its weights
are another training run, so its figures are not comparable with papers, and its pooling differs from the graph's
(see tf_avg_pool and InceptionE).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .resize import resize_like_tf1

INPUT_SIZE = 299   # the TF graph's input size; every image is resized to it, whatever its own size


class BatchNorm(nn.Module):
    """Inference-only batch norm holding exactly the four tensors per layer that the weights file holds (TF's graph
    has no `num_batches_tracked`, so the converted file has none)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        # eps 0.001: the TF graph's variance_epsilon (torch's default is 1e-5). Always the stored statistics.
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=1e-3)


class BasicConv2d(nn.Module):
    """conv (no bias: batch norm's beta is the bias) -> batch norm -> ReLU; kwargs go to nn.Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = BatchNorm(out_channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool():
    """3x3 average pool, stride 1, "SAME" padding. Why count_include_pad=False: TF averages over the pixels inside
    the image only, so a border pixel's average is over 4 or 6 values, not 9 with padded zeros (torch's default)."""
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avg pool->1x1, concatenated in that order; 35x35 kept."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.pool = tf_avg_pool()
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        # [N, C, 35, 35] -> [N, 224 + pool_features, 35, 35]
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(self.pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a, the 35 -> 17 reduction: 3x3/2 | 1x1->3x3->3x3/2 | max pool 3x3/2 ("VALID", no padding)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, self.pool(x)], 1)   # [N, 288, 35, 35] -> [N, 768, 17, 17]


class InceptionC(nn.Module):
    """Mixed_6b..6e: 1x1 | 1x1->1x7->7x1 | 1x1->7x1->1x7->7x1->1x7 | avg pool->1x1; factorised 7x7 convolutions."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.pool = tf_avg_pool()
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        # [N, 768, 17, 17] -> [N, 768, 17, 17]
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(self.pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a, the 17 -> 8 reduction: 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | max pool 3x3/2."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, self.pool(x)], 1)   # [N, 768, 17, 17] -> [N, 1280, 8, 8]


class InceptionE(nn.Module):
    """Mixed_7b/7c: 1x1 | 1x1->(1x3, 3x1) | 1x1->3x3->(1x3, 3x1) | pool->1x1; each pair's outputs side by side.

    Why `pool` is an argument: in the TF graph Mixed_7b pools by average but Mixed_7c by *max* (3x3, stride 1,
    padding 1). The paper and torchvision average in both; FID is defined on the graph, so we follow it."""

    def __init__(self, in_channels: int, pool: nn.Module):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.pool = pool
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # [N, C, 8, 8] -> [N, 320 + 2*384 + 2*384 + 192 = 2048, 8, 8]
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
                          self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
                          self.branch_pool(self.pool(x))], 1)


class InceptionV3(nn.Module):
    """Normalised images [N, 3, 299, 299] -> pool features [N, 2048]. `features` below prepares the images."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool=tf_avg_pool())
        self.Mixed_7c = InceptionE(2048, pool=nn.MaxPool2d(3, stride=1, padding=1))   # max: see InceptionE
        self.AvgPool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # [N, 3, 299, 299] -> [N, 64, 147, 147]
        x = self.MaxPool_1(x)                                                # -> [N, 64, 73, 73]
        x = self.MaxPool_2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))       # -> [N, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                  # -> [N, 288, 35, 35]
        x = self.Mixed_6a(x)                                                 # -> [N, 768, 17, 17]
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))   # -> [N, 768, 17, 17]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                  # -> [N, 2048, 8, 8]
        return self.AvgPool(x).flatten(1)                                   # -> [N, 2048]


def features(model: InceptionV3, images: torch.Tensor, antialias: bool = False) -> torch.Tensor:
    """uint8 RGB images [N, 3, H, W], any H and W -> FID's 2048-d features [N, 2048], float32.

    On the model's device and dtype (float32 as loaded; float64 as torch-fidelity's internal_dtype="float64"); the
    caller batches. Resize: TF1's (resize.py), torch-fidelity's, and torchmetrics' before its PR #3177 (2025);
    `antialias=True`: torch's antialiased bilinear, torchmetrics' default since (1.9.0 here). Both keep 299x299."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(f"features() takes uint8 images [N, 3, H, W], not {images.dtype} {list(images.shape)}")
    weight = model.Conv2d_1a_3x3.conv.weight
    x = images.to(weight.device).to(weight.dtype)   # uint8 travels (4x smaller), then 0..255 exactly as floats
    if antialias:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    else:
        x = resize_like_tf1(x, INPUT_SIZE)
    # Resize first, then normalise, as the graph does. The graph computes (x - 128) * 0.0078125; since 1/128 is a
    # power of two, division gives the same bits. 128, not 127.5: the range is [-1, 127/128], as TF's graph has it.
    x = (x - 128) / 128
    with torch.no_grad():   # channels_last: see load_inception
        return model(x.contiguous(memory_format=torch.channels_last)).float()
