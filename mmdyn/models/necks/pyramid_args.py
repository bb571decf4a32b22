# Copyright (c) mmdyn contributors. All rights reserved.
"""Argument and input checks shared by the DDF-Up necks.

mmdet's ``FPN``, ``PAFPN`` and ``NASFPN`` check their level arguments with
bare ``assert`` statements, and some values (a ``start_level`` past the last
backbone level, an empty ``in_channels``) pass them and fail only in the
forward. These checks run before the parent constructor and raise one
``ValueError`` naming the config key, the value and the allowed range.
"""
from typing import Sequence

from torch import Tensor

#: The values FPN accepts for a string ``add_extra_convs``.
EXTRA_CONV_SOURCES = ('on_input', 'on_lateral', 'on_output')


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_pyramid_levels(neck: str,
                         in_channels,
                         num_outs,
                         start_level,
                         end_level,
                         add_extra_convs=False) -> None:
    """Raise ``ValueError`` unless the level arguments of an FPN-style neck are
    ones it can build and run.

    The rules are mmdet ``FPN``'s: ``in_channels`` is a non-empty list of
    positive ints (one per backbone level); ``start_level`` is one of those
    levels; ``end_level`` is -1 (the last level) or a level from
    ``start_level`` on; with the last level used, ``num_outs`` is at least
    the number of levels used (more adds extra levels), otherwise exactly
    that number; ``add_extra_convs`` is a bool or one of
    :data:`EXTRA_CONV_SOURCES`.

    Args:
        neck (str): Neck class name, for the message.
        in_channels: The neck's ``in_channels``.
        num_outs: The neck's ``num_outs``.
        start_level: The neck's ``start_level``.
        end_level: The neck's ``end_level``.
        add_extra_convs: The neck's ``add_extra_convs``.
    """
    if isinstance(in_channels, (str, bytes)) or \
            not isinstance(in_channels, Sequence) or not in_channels or \
            not all(_is_int(c) and c > 0 for c in in_channels):
        raise ValueError(
            f'{neck}: neck.in_channels must be a non-empty list of positive '
            f'ints (the channels of each backbone level), got '
            f'{in_channels!r}')
    last = len(in_channels) - 1
    if not _is_int(start_level) or not 0 <= start_level <= last:
        raise ValueError(
            f'{neck}: neck.start_level must be an int from 0 to {last} (a '
            f'level of the {last + 1} in neck.in_channels), got '
            f'{start_level!r}')
    if not _is_int(end_level) or not (end_level == -1
                                      or start_level <= end_level <= last):
        raise ValueError(
            f'{neck}: neck.end_level must be -1 (the last level) or an int '
            f'from start_level ({start_level}) to {last}, got '
            f'{end_level!r}')
    if end_level in (-1, last):
        used = last + 1 - start_level
        if not _is_int(num_outs) or num_outs < used:
            raise ValueError(
                f'{neck}: neck.num_outs must be an int >= {used} (the '
                f'levels {start_level} to {last} it uses; more adds extra '
                f'levels), got {num_outs!r}')
    else:
        used = end_level - start_level + 1
        if not _is_int(num_outs) or num_outs != used:
            raise ValueError(
                f'{neck}: neck.num_outs must be {used} (the levels '
                f'{start_level} to {end_level}; extra levels only follow the '
                f'last backbone level, end_level=-1), got {num_outs!r}')
    if not (isinstance(add_extra_convs, bool)
            or add_extra_convs in EXTRA_CONV_SOURCES):
        raise ValueError(
            f'{neck}: neck.add_extra_convs must be a bool or one of '
            f'{EXTRA_CONV_SOURCES}, got {add_extra_convs!r}')


def check_feature_maps(neck: str, inputs: Sequence[Tensor],
                       in_channels: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``inputs`` holds one non-empty ``[B,
    in_channels[i], H, W]`` map per entry of ``in_channels``.

    A map with no rows or columns is refused here, as the static neck's first
    conv refuses it, but naming the level.
    """
    if len(inputs) != len(in_channels):
        raise ValueError(
            f'{neck}: neck.in_channels has {len(in_channels)} entries but '
            f'the backbone gave {len(inputs)} feature maps; set '
            "neck.in_channels to the backbone's out channels")
    for level, (feat, channels) in enumerate(zip(inputs, in_channels)):
        if feat.dim() != 4 or feat.shape[1] != channels:
            raise ValueError(
                f'{neck}: neck.in_channels[{level}] is {channels} but '
                f'feature map {level} has shape {tuple(feat.shape)}')
        if feat.shape[2] == 0 or feat.shape[3] == 0:
            raise ValueError(
                f'{neck}: feature map {level} has shape '
                f'{tuple(feat.shape)}; every level needs a height and a '
                'width >= 1')
