"""torchvision segmentation models (DeepLabV3, FCN) on a small ResNet-18 backbone.

Built through torchvision's own classes (``DeepLabV3``/``FCN`` with an ASPP head / ``FCNHead`` on
an ``IntermediateLayerGetter`` over ``resnet18(weights=None)``), sized for 48x48 digit scenes and a
CPU: a 3x3 stride-2 stem, no max-pool, and ``layer2`` without its stride, cut after ``layer2``:
output stride 2, a 24x24 map for the head, fine enough for digit outlines (stride 8 left 6x6 maps
and blob-shaped masks). ResNet-18's BasicBlock cannot dilate, and deeper stages would cost
minutes more of training. Nothing is downloaded.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import FCN, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead

_FEATURES = 128  # channels of layer2
ASPP_RATES = (2, 4, 6)  # atrous rates for a 24x24 map (torchvision's 12/24/36 suit ~65x65)
ASPP_WIDTH = 32
ASPP_DROPOUT = 0.1


def _backbone(in_channels: int) -> nn.Module:
    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
    net.maxpool = nn.Identity()
    first = net.layer2[0]  # keep layer2 at the stem's resolution: output stride 2
    first.conv1.stride = (1, 1)
    first.downsample[0].stride = (1, 1)
    return IntermediateLayerGetter(net, return_layers={"layer2": "out"})


def small_deeplabv3(num_classes: int, in_channels: int) -> nn.Module:
    """DeepLabV3 on a ResNet-18 backbone with output stride 2: an ASPP head (rates 2, 4, 6,
    width 32) then a 3x3 convolution, as torchvision's ``DeepLabHead`` but sized for 24x24 maps."""
    aspp = ASPP(_FEATURES, ASPP_RATES, ASPP_WIDTH)
    aspp.project[3].p = ASPP_DROPOUT  # torchvision's 0.5 is for large datasets
    head = nn.Sequential(
        aspp,
        nn.Conv2d(ASPP_WIDTH, ASPP_WIDTH, 3, padding=1, bias=False),
        nn.BatchNorm2d(ASPP_WIDTH),
        nn.ReLU(),
        nn.Conv2d(ASPP_WIDTH, num_classes, 1),
    )
    return DeepLabV3(_backbone(in_channels), head, None)


def small_fcn(num_classes: int, in_channels: int) -> nn.Module:
    """FCN (3x3 conv head) on a ResNet-18 backbone with output stride 2."""
    return FCN(_backbone(in_channels), FCNHead(_FEATURES, num_classes), None)
