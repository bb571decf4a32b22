# Copyright (c) mmdyn contributors. All rights reserved.
"""Key layouts of the official models and their names in mmdyn.

The official models are plain torchvision/timm-style networks; mmdyn builds
the same networks as mmpretrain ``ImageClassifier``s whose dynamic layers
keep the official names, so converting is renaming keys:

* ResNet (ODConv, KW, DDF, and DyConv of kaijieshi7/Dynamic-convolution-
  Pytorch): ``conv1``, ``bn1``, ``layerS.*`` get the ``backbone.`` prefix,
  ``fc`` becomes ``head.fc``.
* MobileNetV2 (ODConv, KW; torchvision layout ``features.i``): the stem,
  ``features.i.conv.j.*`` and the last conv map to mmpretrain's
  ``backbone.conv1``, ``backbone.layerS.b.conv.m.{conv,bn}`` and
  ``backbone.conv2`` (ConvModule names), the classifier to ``head.fc``.
* ConvNeXt (KW): ``downsample_layers.*`` and ``stages.*`` get the
  ``backbone.`` prefix, the final ``norm`` becomes ``backbone.normN`` (N the
  last stage) and ``head`` becomes ``head.fc``.

KernelWarehouse keeps its cells in ``warehouse_manager.weights.i`` (one
manager per network) -> ``backbone.warehouse_manager.weights.i``; the 1/2x
MobileNetV2's KW classifier (``classifier.1.conv.*``, the last warehouse)
goes to ``KWLinearClsHead`` (``head.fc.*``, ``head.warehouse_manager.
weights.0``). The classifiers: ODConv's MobileNetV2 ``classifier.1`` (after
its dropout), KW's ``classifier``.
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple

Rule = Tuple[str, str]

FAMILIES = ('odconv', 'kw', 'ddf', 'dyconv')
# configs/<folder> of each family, and the script that converts it.
CONFIG_FOLDERS = dict(
    odconv='odconv', kw='kernelwarehouse', ddf='ddf', dyconv='dyconv')
CONVERTER_SCRIPTS = {
    family: f'tools/model_converters/{family}2mmdyn.py'
    for family in FAMILIES
}
# Architectures each family ships configs for.
ARCHITECTURES = dict(
    odconv=('resnet', 'mobilenet_v2'),
    kw=('resnet', 'mobilenet_v2', 'convnext'),
    ddf=('resnet', ),
    dyconv=('resnet', ))
# mmpretrain MobileNetV2 stages: blocks per stage of the standard table.
MBV2_BLOCKS = (1, 2, 3, 4, 3, 3, 1)
# ResNet depth from (blocks in layer3, bottleneck).
RESNET_DEPTHS = {
    (2, False): 18,
    (6, False): 34,
    (6, True): 50,
    (23, True): 101,
    (36, True): 152
}

WAREHOUSE = r'^warehouse_manager\.weights\.(\d+)$'


class LayoutError(ValueError):
    """The keys do not follow an official layout this module knows."""


def _ints(state: Dict, pattern: str) -> List[int]:
    regex = re.compile(pattern)
    return sorted(
        {int(m.group(1))
         for k in state
         for m in [regex.match(k)] if m})


def architecture_of(state: Dict) -> str:
    """'resnet', 'mobilenet_v2' or 'convnext', from the key names."""
    if any(k.startswith('downsample_layers.') for k in state):
        return 'convnext'
    if any(k.startswith('features.') for k in state):
        return 'mobilenet_v2'
    if any(k.startswith('layer1.') for k in state):
        return 'resnet'
    if any(k.startswith(('backbone.', 'head.')) for k in state):
        raise LayoutError(
            'the keys are already in the mmdyn/mmpretrain layout (backbone.*, '
            'head.*): load the file directly, it needs no conversion')
    raise LayoutError(
        'the keys follow no official layout: expected ResNet (layer1.*), '
        'MobileNetV2 (features.*) or ConvNeXt (downsample_layers.*) keys, '
        f'found {", ".join(list(state)[:4])}, ...')


def resnet_depth(state: Dict) -> int:
    """ResNet depth from the number of blocks in ``layer3``."""
    blocks = len(_ints(state, r'^layer3\.(\d+)\.'))
    bottleneck = any('.conv3.' in k for k in state)
    depth = RESNET_DEPTHS.get((blocks, bottleneck))
    if depth is None:
        raise LayoutError(
            f'cannot tell the ResNet depth ({blocks} blocks in layer3, '
            f'bottleneck={bottleneck}); pass --config')
    return depth


def config_pattern(arch: str, state: Dict) -> str:
    """Glob, inside the family's config folder, of the configs to try."""
    if arch == 'resnet':
        return f'resnet{resnet_depth(state)}-*_in1k.py'
    if arch == 'mobilenet_v2':
        return 'mobilenet-v2*_in1k.py'
    return 'convnext-*_in1k.py'


RESNET_RULES: List[Rule] = [
    (r'^fc\.(weight|bias)$', r'head.fc.\1'),
    (r'^(conv1|bn1)\.(.+)$', r'backbone.\1.\2'),
    (r'^(layer[1-4]\.\d+\..+)$', r'backbone.\1'),
]
KW_WAREHOUSE_RULES: List[Rule] = [
    (WAREHOUSE, r'backbone.warehouse_manager.weights.\1'),
]


def mbv2_block_index() -> Dict[int, Tuple[int, int]]:
    """Official ``features.i`` (1..17) -> (mmpretrain stage, block)."""
    table, i = {}, 1
    for stage, count in enumerate(MBV2_BLOCKS, start=1):
        for block in range(count):
            table[i] = (stage, block)
            i += 1
    return table


def mbv2_rules(state: Dict) -> List[Rule]:
    """Rules for torchvision-layout MobileNetV2 keys (ODConv and KW).

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
        # ODConv: Sequential(Dropout, Linear); KW: Linear; KW 1/2x:
        # Sequential(Dropout, KWLinear) whose layer sits in ``.conv``.
        (r'^classifier\.1\.(weight|bias)$', r'head.fc.\1'),
        (r'^classifier\.(weight|bias)$', r'head.fc.\1'),
        (r'^classifier\.1\.conv\.(.+)$', r'head.fc.\1'),
    ]
    if any(k.startswith('classifier.1.conv.') for k in state):
        # The KW classifier is reserved last: its warehouse is the last one.
        warehouses = _ints(state, WAREHOUSE)
        if warehouses:
            rules.append((rf'^warehouse_manager\.weights\.{warehouses[-1]}$',
                          'head.warehouse_manager.weights.0'))
    rules += KW_WAREHOUSE_RULES
    for i, (stage, block) in index.items():
        src = rf'^features\.{i}\.conv\.'
        dst = f'backbone.layer{stage}.{block}.conv.'
        expands = any(k.startswith(f'features.{i}.conv.3.') for k in state)
        if expands:
            pairs = [('0.0', '0.conv'), ('0.1', '0.bn'), ('1.0', '1.conv'),
                     ('1.1', '1.bn'), ('2', '2.conv'), ('3', '2.bn')]
        else:
            pairs = [('0.0', '0.conv'), ('0.1', '0.bn'), ('1', '1.conv'),
                     ('2', '1.bn')]
        for old, new in pairs:
            rules.append(
                (src + re.escape(old) + r'\.(.+)$', dst + new + r'.\1'))
    return rules


def convnext_rules(state: Dict) -> List[Rule]:
    """Rules for the official KW ConvNeXt (``downsample_layers``, ``stages``,
    final ``norm`` on the pooled features, ``head``)."""
    stages = _ints(state, r'^stages\.(\d+)\.')
    last = stages[-1] if stages else 3
    return [
        (r'^(downsample_layers\..+)$', r'backbone.\1'),
        (r'^(stages\..+)$', r'backbone.\1'),
        (r'^norm\.(weight|bias)$', rf'backbone.norm{last}.\1'),
        (r'^head\.(weight|bias)$', r'head.fc.\1'),
    ] + KW_WAREHOUSE_RULES


FAMILY_NAMES = dict(
    odconv='ODConv', kw='KernelWarehouse', ddf='DDF', dyconv='DyConv')


def family_of(state: Dict) -> Optional[str]:
    """The method whose layers the keys show, or None when unsure:

    KW warehouses, ODConv's four attention heads, DDF's two branches,
    DyConv's 1x1-conv attention (a 4-D ``attention.fc1.weight``).
    """
    if any(k.startswith('warehouse_manager.weights.') for k in state):
        return 'kw'
    if any('.attention.channel_fc.' in k for k in state):
        return 'odconv'
    if any('.spatial_branch.' in k for k in state):
        return 'ddf'
    if any(
            k.endswith('.attention.fc1.weight') and v.dim() == 4
            for k, v in state.items()):
        return 'dyconv'
    return None


def rules_for(family: str, state: Dict) -> List[Rule]:
    """Renaming rules for an official checkpoint of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f'family must be one of {FAMILIES}, got '
                         f'{family!r}')
    found = family_of(state)
    if found is not None and found != family:
        raise LayoutError(f'this is a {FAMILY_NAMES[found]} checkpoint, not '
                          f'{FAMILY_NAMES[family]}: convert it with python '
                          f'{CONVERTER_SCRIPTS[found]}')
    arch = architecture_of(state)
    if arch not in ARCHITECTURES[family]:
        raise LayoutError(
            f'this is a {arch} checkpoint, and mmdyn has no {family} '
            f'{arch} configs (it has {", ".join(ARCHITECTURES[family])}); '
            'is it a checkpoint of another method?')
    if arch == 'convnext':
        return convnext_rules(state)
    if arch == 'mobilenet_v2':
        return mbv2_rules(state)
    return RESNET_RULES + (KW_WAREHOUSE_RULES if family == 'kw' else [])


def rename_keys(state: Dict, rules: Sequence[Rule]) -> Dict[str, str]:
    """Official key -> mmdyn key, by the first matching rule.

    Raises:
        LayoutError: naming the keys no rule matches.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    names, unknown = {}, []
    for key in state:
        for pattern, replacement in compiled:
            if pattern.match(key):
                names[key] = pattern.sub(replacement, key)
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ', '.join(unknown[:6])
        more = f', ... ({len(unknown) - 6} more)' if len(unknown) > 6 else ''
        raise LayoutError(
            f'{len(unknown)} key(s) of the official checkpoint are not part '
            f'of the layout this converter knows: {shown}{more}')
    return names
