# Copyright (c) fasa_seesaw contributors.
"""Cosine (normalised) classifiers used by the Seesaw recipe."""

from torch import nn
from torch.nn import functional as F

__all__ = ["NormedLinear", "NormedConv2d"]


class NormedLinear(nn.Linear):
    """
    temperature * cos(w_k, x) + b_k: a linear layer on L2-normalised rows and inputs.

    Normalising removes the norm bias that head classes build up in their weight rows, which is
    what makes the cosine classifier help on long-tailed data.
    """

    def __init__(self, in_features, out_features, *, temperature=20.0, eps=1e-6, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.temperature = temperature
        self.eps = eps
        nn.init.normal_(self.weight, mean=0, std=0.01)
        if self.bias is not None:
            nn.init.constant_(self.bias, 0)

    def forward(self, x):
        w = self.weight / (self.weight.norm(dim=1, keepdim=True) + self.eps)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps)
        return F.linear(x * self.temperature, w, self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", temperature={self.temperature}"


class NormedConv2d(nn.Conv2d):
    """
    Cosine version of a convolution: each output filter and each input pixel's channel vector
    are L2-normalised, then scaled by the temperature. Used as the 1x1 mask predictor ("Norm Mask").
    """

    def __init__(self, *args, temperature=20.0, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.eps = eps

    def forward(self, x):
        if x.numel() == 0:
            return super().forward(x)
        x = x / (x.norm(dim=1, keepdim=True) + self.eps) * self.temperature
        w = self.weight / (self.weight.flatten(1).norm(dim=1)[:, None, None, None] + self.eps)
        return self._conv_forward(x, w, self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", temperature={self.temperature}"
