"""torchvision segmentation models (DeepLabV3, FCN) on a small ResNet-18 backbone.

Built through torchvision's own classes (``DeepLabV3``/``FCN`` with ``DeepLabHead``/``FCNHead`` on
an ``IntermediateLayerGetter`` over ``resnet18(weights=None)``), sized for 48x48 digit scenes and a
CPU: a 3x3 stride-2 stem, and the backbone cut after ``layer2`` (output stride 8, a 6x6 map for the
head; ResNet-18's BasicBlock cannot dilate, and deeper stages would cost minutes more of
training). Nothing is downloaded.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import FCN, DeepLabV3
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

_FEATURES = 128  # channels of layer2


def _backbone(in_channels: int) -> nn.Module:
    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=2, padding=1, bias=False)
    return IntermediateLayerGetter(net, return_layers={"layer2": "out"})


def small_deeplabv3(num_classes: int, in_channels: int) -> nn.Module:
    """DeepLabV3 (ASPP head) on a ResNet-18 backbone with output stride 8."""
    return DeepLabV3(_backbone(in_channels), DeepLabHead(_FEATURES, num_classes), None)


def small_fcn(num_classes: int, in_channels: int) -> nn.Module:
    """FCN (3x3 conv head) on a ResNet-18 backbone with output stride 8."""
    return FCN(_backbone(in_channels), FCNHead(_FEATURES, num_classes), None)
