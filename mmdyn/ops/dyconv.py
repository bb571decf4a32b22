"""Placeholder: being implemented."""
from torch import nn


class CondConv2d(nn.Module):

    def __init__(self, *args, **kwargs):
        raise NotImplementedError


class DyConv2d(nn.Module):

    def __init__(self, *args, **kwargs):
        raise NotImplementedError

