"""Accelerated execution paths of the :mod:`mmdyn.ops` layers.

Nothing here defines what a layer computes: every path is checked against
the layer's ``forward_reference`` (pure PyTorch autograd) in the tests.
"""
