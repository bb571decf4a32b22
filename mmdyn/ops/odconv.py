"""Placeholder: being implemented."""
from torch import nn


class ODConv2d(nn.Module):

    def __init__(self, *args, **kwargs):
        raise NotImplementedError

