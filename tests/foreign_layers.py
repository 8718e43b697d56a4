"""Faithful re-implementations of other libraries' WS layers, from their published code and
formulas (shared REFERENCE.md), with the same class names and attributes. The project does not
depend on those libraries; these are what its adapters are tested against."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


# ---------------------------------------------------------------- timm layers/padding.py helpers
def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def get_same_padding(x: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)


def is_static_pad(kernel_size: int, stride: int = 1, dilation: int = 1) -> bool:
    return stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0


def pad_same(x: torch.Tensor, k: Any, s: Any, d: Any = (1, 1)) -> torch.Tensor:
    ih, iw = x.size()[-2:]
    pad_h, pad_w = get_same_padding(ih, k[0], s[0], d[0]), get_same_padding(iw, k[1], s[1], d[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def get_padding_value(padding: Any, kernel_size: int, stride: int,
                      dilation: int) -> tuple[Any, bool]:
    dynamic = False
    if isinstance(padding, str):
        if padding.lower() == "same":
            if is_static_pad(kernel_size, stride=stride, dilation=dilation):
                padding = get_padding(kernel_size, stride=stride, dilation=dilation)
            else:
                padding, dynamic = 0, True
        else:
            padding = 0
    return padding, dynamic


class timm:  # namespace: timm.layers.std_conv
    class StdConv2d(nn.Conv2d):
        def __init__(self, in_channel: int, out_channels: int, kernel_size: int, stride: int = 1,
                     padding: Any = None, dilation: int = 1, groups: int = 1, bias: bool = False,
                     eps: float = 1e-6) -> None:
            if padding is None:
                padding = get_padding(kernel_size, stride, dilation)
            super().__init__(in_channel, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias)
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                  training=True, momentum=0.0, eps=self.eps
                                  ).reshape_as(self.weight)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)

    class StdConv2dSame(nn.Conv2d):
        def __init__(self, in_channel: int, out_channels: int, kernel_size: int, stride: int = 1,
                     padding: Any = "SAME", dilation: int = 1, groups: int = 1,
                     bias: bool = False, eps: float = 1e-6) -> None:
            padding, is_dynamic = get_padding_value(padding, kernel_size, stride, dilation)
            super().__init__(in_channel, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias)
            self.same_pad = is_dynamic
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.same_pad:
                x = pad_same(x, self.kernel_size, self.stride, self.dilation)
            weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                  training=True, momentum=0.0, eps=self.eps
                                  ).reshape_as(self.weight)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)

    class ScaledStdConv2d(nn.Conv2d):
        def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                     stride: int = 1, padding: Any = None, dilation: int = 1, groups: int = 1,
                     bias: bool = True, gamma: float = 1.0, eps: float = 1e-6,
                     gain_init: float = 1.0) -> None:
            if padding is None:
                padding = get_padding(kernel_size, stride, dilation)
            super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias)
            self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
            self.scale = gamma * self.weight[0].numel() ** -0.5
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                  weight=(self.gain * self.scale).view(-1), training=True,
                                  momentum=0.0, eps=self.eps).reshape_as(self.weight)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)

    class ScaledStdConv2dSame(nn.Conv2d):
        def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                     stride: int = 1, padding: Any = "SAME", dilation: int = 1, groups: int = 1,
                     bias: bool = True, gamma: float = 1.0, eps: float = 1e-6,
                     gain_init: float = 1.0) -> None:
            padding, is_dynamic = get_padding_value(padding, kernel_size, stride, dilation)
            super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias)
            self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
            self.scale = gamma * self.weight[0].numel() ** -0.5
            self.same_pad = is_dynamic
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.same_pad:
                x = pad_same(x, self.kernel_size, self.stride, self.dilation)
            weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                  weight=(self.gain * self.scale).view(-1), training=True,
                                  momentum=0.0, eps=self.eps).reshape_as(self.weight)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)


class hf:  # namespace: transformers.models.bit.modeling_bit
    class DynamicPad2d(nn.Module):
        def __init__(self, kernel_size: int, stride: int, dilation: int, value: float = 0) -> None:
            super().__init__()
            self.kernel_size = (kernel_size, kernel_size)
            self.stride = (stride, stride)
            self.dilation = (dilation, dilation)
            self.value = value

        @staticmethod
        def compute_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
            return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x,
                       0)

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            ih, iw = input.size()[-2:]
            ph = self.compute_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
            pw = self.compute_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
            if ph > 0 or pw > 0:
                input = F.pad(input, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2],
                              value=self.value)
            return input

    class WeightStandardizedConv2d(nn.Conv2d):
        def __init__(self, in_channel: int, out_channels: int, kernel_size: int, stride: int = 1,
                     padding: Any = "SAME", dilation: int = 1, groups: int = 1,
                     bias: bool = False, eps: float = 1e-6) -> None:
            padding, is_dynamic = get_padding_value(padding, kernel_size, stride, dilation)
            super().__init__(in_channel, out_channels, kernel_size, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, bias=bias)
            self.pad = hf.DynamicPad2d(kernel_size, stride, dilation) if is_dynamic else None
            self.eps = eps

        def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
            if self.pad is not None:
                hidden_state = self.pad(hidden_state)
            weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                  training=True, momentum=0.0, eps=self.eps
                                  ).reshape_as(self.weight)
            return F.conv2d(hidden_state, weight, self.bias, self.stride, self.padding,
                            self.dilation, self.groups)


class bit:  # namespace: big_transfer bit_pytorch/models.py
    class StdConv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
            w = (w - m) / torch.sqrt(v + 1e-10)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class mmcv:  # namespace: mmcv.cnn.bricks.conv_ws
    class ConvWS2d(nn.Conv2d):
        def __init__(self, *args: Any, eps: float = 1e-5, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c_in = self.weight.size(0)
            weight_flat = self.weight.view(c_in, -1)
            mean = weight_flat.mean(dim=1, keepdim=True).view(c_in, 1, 1, 1)
            std = weight_flat.std(dim=1, keepdim=True).view(c_in, 1, 1, 1)
            weight = (self.weight - mean) / (std + self.eps)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)

    class ConvAWS2d(nn.Conv2d):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.register_buffer("weight_gamma", torch.ones(self.out_channels, 1, 1, 1))
            self.register_buffer("weight_beta", torch.zeros(self.out_channels, 1, 1, 1))

        def _get_weight(self, weight: torch.Tensor) -> torch.Tensor:
            weight_flat = weight.view(weight.size(0), -1)
            mean = weight_flat.mean(dim=1).view(-1, 1, 1, 1)
            std = torch.sqrt(weight_flat.var(dim=1) + 1e-5).view(-1, 1, 1, 1)
            weight = (weight - mean) / std
            return self.weight_gamma * weight + self.weight_beta

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self._get_weight(self.weight), self.bias, self.stride,
                            self.padding, self.dilation, self.groups)


class WeightStandardizer(nn.Module):
    """Composer's parametrization (composer.algorithms.weight_standardization)."""

    def __init__(self, epsilon: float = 1e-10) -> None:
        super().__init__()
        self.epsilon = epsilon

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        dims = list(range(1, W.dim()))
        var, mean = torch.var_mean(W, dim=dims, keepdim=True, unbiased=False)
        return (W - mean) / (var + self.epsilon).sqrt()


def apply_weight_standardization(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            parametrize.register_parametrization(m, "weight", WeightStandardizer())
    return module


class Scale(nn.Module):
    """Some parametrization that is not WS."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 1.5


class Zoo(nn.Module):
    """One of each, with strided 'SAME' layers so odd and even input sizes differ."""

    def __init__(self) -> None:
        super().__init__()
        self.a = timm.StdConv2d(3, 8, 3, eps=1e-8)                      # timm BiT eps
        self.b = timm.StdConv2dSame(8, 8, 3, stride=2, eps=1e-8)       # dynamic SAME
        self.c = timm.ScaledStdConv2d(8, 8, 3, gamma=1.7, eps=1e-5)    # NFNet eps
        self.d = timm.ScaledStdConv2dSame(8, 8, 4, stride=2, eps=1e-5)
        self.e = hf.WeightStandardizedConv2d(8, 8, 3, stride=2, eps=1e-8)
        self.f = hf.WeightStandardizedConv2d(8, 8, 3, stride=1, eps=1e-8)  # static pad
        self.g = bit.StdConv2d(8, 8, 3, padding=1)
        self.h = mmcv.ConvWS2d(8, 8, 3, padding=1, eps=1e-4)
        self.i = mmcv.ConvAWS2d(8, 8, 3, padding=1)
        self.j = timm.StdConv2dSame(8, 8, 2, stride=1)                 # even kernel, stride 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.a, self.b, self.c, self.d, self.e, self.f, self.g, self.h, self.i,
                      self.j):
            x = F.group_norm(torch.relu(layer(x)), 2)
        return x


def zoo(seed: int = 0) -> Zoo:
    torch.manual_seed(seed)
    model = Zoo()
    with torch.no_grad():
        model.c.gain.uniform_(0.5, 1.5)
        model.d.gain.uniform_(0.5, 1.5)
        model.i.weight_gamma.uniform_(0.5, 1.5)
        model.i.weight_beta.normal_(0, 0.01)
    return model.eval()


def composer_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    return apply_weight_standardization(net).eval()
