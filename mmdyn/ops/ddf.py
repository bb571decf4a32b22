"""Placeholder: being implemented."""
from torch import nn


class DDFConv2d(nn.Module):

    def __init__(self, *args, **kwargs):
        raise NotImplementedError


class DDFUpsample(nn.Module):

    def __init__(self, *args, **kwargs):
        raise NotImplementedError



def ddf(*args, **kwargs):
    raise NotImplementedError
