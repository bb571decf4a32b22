"""Convert official ODConv / KernelWarehouse / DDF checkpoints to mmdyn.

The official models (OSVAI/ODConv ``od_resnet``/``od_mobilenetv2``,
OSVAI/KernelWarehouse ``kw_resnet``, theFoxofSky/ddfnet
``ddf_{mul,add}_resnet``) are plain torchvision/timm-style networks. mmdyn
builds the same networks as an mmpretrain ``ImageClassifier`` whose layers
keep the official names inside mmpretrain's backbone layout, so a conversion
is a renaming of keys:

* ResNets: ``conv1``/``bn1``/``layerX.*`` (and KW's
  ``warehouse_manager.weights.i``) get the ``backbone.`` prefix, the
  classifier ``fc`` becomes ``head.fc``.
* MobileNetV2 (torchvision layout ``features.i``) maps to mmpretrain's
  ``conv1`` / ``layerS.j.conv.*`` (ConvModule: ``.conv``, ``.bn``) /
  ``conv2`` and ``classifier.1`` to ``head.fc``.

The converted dict is then checked against the target model built from an
mmdyn config: an official key that no rule knows, a target key left empty,
or a shape mismatch is refused with a message listing them. The only target
entries not taken from the checkpoint are the temperature buffers, which the
official code keeps as plain attributes; they get the model's construction
value, the inference value (ODConv/DyConv T = 1, KW tau = 0).
"""
import glob
import os.path as osp
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

FAMILIES = ('odconv', 'kw', 'ddf')
# Target entries that official checkpoints do not hold (see module doc).
FILLED_FROM_MODEL = (re.compile(r'(^|\.)temperature$'), )
# mmpretrain MobileNetV2 stages: blocks per stage of the standard table.
MBV2_BLOCKS = (1, 2, 3, 4, 3, 3, 1)

Rule = Tuple[str, object]


class ConversionError(ValueError):
    """An official checkpoint does not fit the target model."""


def load_official_state_dict(path: str) -> 'OrderedDict[str, torch.Tensor]':
    """Read an official checkpoint, unwrapping ``state_dict``/``model`` and
    the ``module.`` prefix of DataParallel/DDP saves."""
    ckpt = torch.load(path, map_location='cpu', weights_only=True)
    return unwrap_state_dict(ckpt)


def unwrap_state_dict(ckpt) -> 'OrderedDict[str, torch.Tensor]':
    """The tensor dict inside a checkpoint object (see above)."""
    if isinstance(ckpt, dict):
        for key in ('state_dict', 'model', 'model_ema'):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ConversionError('the checkpoint holds no state dict of '
                              'tensors')
    out = OrderedDict()
    for key, value in ckpt.items():
        out[key[len('module.'):] if key.startswith('module.') else key] = \
            value
    return out


RESNET_RULES: List[Rule] = [
    (r'^fc\.(weight|bias)$', r'head.fc.\1'),
    (r'^(conv1|bn1)\.(.+)$', r'backbone.\1.\2'),
    (r'^(layer[1-4]\.\d+\..+)$', r'backbone.\1'),
]
KW_RESNET_RULES: List[Rule] = RESNET_RULES + [
    (r'^warehouse_manager\.weights\.(\d+)$',
     r'backbone.warehouse_manager.weights.\1'),
]


def mbv2_block_index() -> Dict[int, Tuple[int, int]]:
    """official ``features.i`` (1..17) -> (mmpretrain stage, block)."""
    table, i = {}, 1
    for stage, count in enumerate(MBV2_BLOCKS, start=1):
        for block in range(count):
            table[i] = (stage, block)
            i += 1
    return table


def _mbv2_rules(state: Dict[str, torch.Tensor]) -> List[Rule]:
    """Rules for torchvision-layout (OD_)MobileNetV2 keys.

    A block with an expansion conv has official modules ``conv.0`` (expand
    ConvBNReLU), ``conv.1`` (depthwise ConvBNReLU), ``conv.2`` (projection
    conv) and ``conv.3`` (its BN); without expansion ``conv.0`` (depthwise),
    ``conv.1`` (projection), ``conv.2`` (BN). mmpretrain has a ConvModule
    (``.conv`` + ``.bn``) per conv.
    """
    index = mbv2_block_index()
    last = max(index) + 1
    rules: List[Rule] = [
        (r'^features\.0\.0\.(.+)$', r'backbone.conv1.conv.\1'),
        (r'^features\.0\.1\.(.+)$', r'backbone.conv1.bn.\1'),
        (rf'^features\.{last}\.0\.(.+)$', r'backbone.conv2.conv.\1'),
        (rf'^features\.{last}\.1\.(.+)$', r'backbone.conv2.bn.\1'),
        (r'^classifier\.1\.(weight|bias)$', r'head.fc.\1'),
    ]
    for i, (stage, block) in index.items():
        src, dst = rf'^features\.{i}\.conv\.', f'backbone.layer{stage}.' \
            f'{block}.conv.'
        expands = any(k.startswith(f'features.{i}.conv.3.') for k in state)
        if expands:
            pairs = [('0.0', '0.conv'), ('0.1', '0.bn'), ('1.0', '1.conv'),
                     ('1.1', '1.bn'), ('2', '2.conv'), ('3', '2.bn')]
        else:
            pairs = [('0.0', '0.conv'), ('0.1', '0.bn'), ('1', '1.conv'),
                     ('2', '1.bn')]
        for old, new in pairs:
            rules.append((src + re.escape(old) + r'\.(.+)$', dst + new +
                          r'.\1'))
    return rules


def rename_keys(state: Dict[str, torch.Tensor],
                rules: Sequence[Rule]) -> 'OrderedDict[str, torch.Tensor]':
    """Apply the first matching ``(pattern, replacement)`` rule to each key.

    Raises:
        ConversionError: listing the keys no rule matches.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    out, unknown = OrderedDict(), []
    for key, value in state.items():
        for pattern, replacement in compiled:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f'{len(unknown)} key(s) of the official checkpoint are not part '
            f'of the layout this converter knows: {_preview(unknown)}')
    return out


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)'
                    if len(keys) > limit else '')


def match_target(converted: Dict[str, torch.Tensor],
                 target: Dict[str, torch.Tensor]
                 ) -> 'OrderedDict[str, torch.Tensor]':
    """Check ``converted`` against the target model's state dict.

    Returns the dict to load (every target key, in target order; only the
    temperature buffers come from ``target``).

    Raises:
        ConversionError: listing unexpected keys, missing keys and shape
            mismatches.
    """
    unexpected = [k for k in converted if k not in target]
    missing = [
        k for k in target if k not in converted
        and not any(p.search(k) for p in FILLED_FROM_MODEL)
    ]
    mismatched = [
        f'{k}: checkpoint {tuple(converted[k].shape)} vs model '
        f'{tuple(target[k].shape)}' for k in converted
        if k in target and converted[k].shape != target[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(f'{len(unexpected)} converted key(s) the model does '
                        f'not have: {_preview(unexpected)}')
    if missing:
        problems.append(f'{len(missing)} model key(s) missing from the '
                        f'checkpoint: {_preview(missing)}')
    if mismatched:
        problems.append(f'{len(mismatched)} shape mismatch(es): '
                        f'{_preview(mismatched)}')
    if problems:
        raise ConversionError('; '.join(problems))
    out = OrderedDict()
    for key, value in target.items():
        out[key] = converted[key] if key in converted else value.clone()
    return out


def rules_for(family: str, state: Dict[str, torch.Tensor]) -> List[Rule]:
    """Renaming rules for an official checkpoint of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f'family must be one of {FAMILIES}, got '
                         f'{family!r}')
    if any(k.startswith('features.') for k in state):
        if family != 'odconv':
            raise ConversionError(
                f'MobileNetV2 checkpoints are supported for ODConv only, '
                f'not for {family!r}')
        return _mbv2_rules(state)
    if family == 'kw':
        return KW_RESNET_RULES
    return RESNET_RULES


def candidate_configs(family: str, state: Dict[str, torch.Tensor],
                      config_root: str) -> List[str]:
    """mmdyn configs that may fit an official checkpoint (architecture
    guessed from the keys; the exact variant is then found by shapes)."""
    folder = dict(odconv='odconv', kw='kernelwarehouse', ddf='ddf')[family]
    if any(k.startswith('features.') for k in state):
        pattern = 'mobilenet-v2*_in1k.py'
    else:
        blocks = len({k.split('.')[1] for k in state
                      if k.startswith('layer3.')})
        bottleneck = any('.conv3.' in k for k in state)
        depth = {(2, False): 18, (6, False): 34, (6, True): 50,
                 (23, True): 101, (36, True): 152}.get((blocks, bottleneck))
        if depth is None:
            raise ConversionError(
                f'cannot tell the ResNet depth of this checkpoint '
                f'({blocks} blocks in layer3); pass the target config')
        pattern = f'resnet{depth}-*_in1k.py'
    return sorted(glob.glob(osp.join(config_root, folder, pattern)))


def convert(state: Dict[str, torch.Tensor],
            family: str,
            config: Optional[str] = None,
            config_root: Optional[str] = None,
            build: Optional[Callable[[str], torch.nn.Module]] = None,
            log: Optional[Callable[[str], None]] = None
            ) -> Tuple['OrderedDict[str, torch.Tensor]', str]:
    """Convert an official state dict to an mmdyn model's state dict.

    Args:
        state (dict): Official state dict (already unwrapped).
        family (str): 'odconv', 'kw' or 'ddf'.
        config (str, optional): Target mmdyn config. Default: the one config
            of ``config_root`` whose model the checkpoint fits exactly.
        config_root (str, optional): mmdyn's ``configs`` folder. Default:
            the repository's.
        build (callable, optional): config path -> model; default builds it
            with :func:`mmdyn.analysis.models.build_model`.
        log (callable, optional): Progress printer.

    Returns:
        tuple: (state dict to save, config it was checked against).

    Raises:
        ConversionError: unknown keys, or no/several fitting configs, or a
            mismatch with ``config``.
    """
    if build is None:
        from .models import build_model
        build = build_model
    converted = rename_keys(state, rules_for(family, state))
    if config is not None:
        return match_target(converted, build(config).state_dict()), config
    root = config_root or osp.join(
        osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))),
        'configs')
    fits, reasons = [], []
    for candidate in candidate_configs(family, state, root):
        if log is not None:
            log(f'trying {candidate}')
        try:
            fits.append((match_target(converted,
                                      build(candidate).state_dict()),
                         candidate))
        except ConversionError as err:
            reasons.append(f'{osp.basename(candidate)}: {err}')
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise ConversionError(
            'the checkpoint fits no mmdyn config; pass --config. Tried: ' +
            (' | '.join(reasons) if reasons else 'nothing (no config)'))
    raise ConversionError(
        'the checkpoint fits several configs '
        f'({", ".join(osp.basename(c) for _, c in fits)}), e.g. DDF mul '
        'and add have the same weights: pass --config')


def save_checkpoint(state: Dict[str, torch.Tensor], path: str,
                    source: str, config: str) -> None:
    """Save as an mmengine checkpoint (``state_dict`` + ``meta``)."""
    torch.save(
        dict(
            state_dict=state,
            meta=dict(converted_from=osp.basename(source),
                      config=osp.basename(config))), path)


def convert_file(family: str, src: str, dst: str,
                 config: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = print) -> str:
    """Read, convert, check and save; returns the config used."""
    state = load_official_state_dict(src)
    out, used = convert(state, family, config, log=log)
    save_checkpoint(out, dst, src, used)
    if log is not None:
        log(f'converted {len(state)} tensors of {src} for {used} -> {dst}')
    return used


def converter_cli(family: str, description: str,
                  argv: Optional[Sequence[str]] = None) -> None:
    """Command line of ``tools/model_converters/<family>2mmdyn.py``.

    ``IN OUT [--config CONFIG]``; exits with the refusal message (unknown,
    missing or mis-shaped keys) instead of a traceback.
    """
    import argparse
    import sys
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('dst', help='output mmdyn checkpoint')
    parser.add_argument('--config', default=None,
                        help='target mmdyn config (default: found by shapes)')
    args = parser.parse_args(argv)
    try:
        convert_file(family, args.src, args.dst, args.config)
    except ConversionError as err:
        sys.exit(f'conversion refused: {err}')
