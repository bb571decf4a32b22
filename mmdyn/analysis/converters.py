# Copyright (c) mmdyn contributors. All rights reserved.
"""Convert official ODConv / KernelWarehouse / DDF / DyConv checkpoints.

Pipeline (``tools/model_converters/<family>2mmdyn.py``):

1. read the file in the format its training script wrote
   (:mod:`mmdyn.analysis.checkpoint_formats`: training checkpoints with
   ``args``, EMA weights, ``module.`` prefixes; data only, no code run);
2. rename the keys (:mod:`mmdyn.analysis.official_layouts`);
3. check them against the model of an mmdyn config: the given one, or the
   one config of the family's folder whose model the weights fit exactly
   (models are built on the meta device for this: shapes only);
4. optionally (``--verify``) load the result strictly into the built model
   and print the logits of a fixed input, to compare with the official code;
5. save as an mmengine checkpoint, atomically (nothing is written when a
   step fails).

The only target entries not taken from the checkpoint are the temperature
buffers, which the official codes keep as plain attributes; they get the
model's construction value, the inference value (ODConv/DyConv T = 1, KW
tau = 0).
"""
import contextlib
import functools
import glob
import os
import os.path as osp
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .checkpoint_formats import (CheckpointFormatError, OfficialCheckpoint,
                                 read_official_checkpoint, unwrap_checkpoint)
from .converter_args import converter_parser
from .official_layouts import (CONFIG_FOLDERS, CONVERTER_SCRIPTS, FAMILIES,
                               LayoutError, architecture_of, config_pattern,
                               mbv2_block_index, rename_keys, resnet_depth,
                               rules_for)

__all__ = [
    'ConversionError', 'FAMILIES', 'candidate_configs', 'convert',
    'convert_file', 'converter_cli', 'load_official_state_dict',
    'match_target', 'mbv2_block_index', 'rules_for', 'save_checkpoint',
    'unwrap_state_dict', 'verify_input', 'verify_logits'
]

# Target entries that official checkpoints do not hold (see module doc).
FILLED_FROM_MODEL = (re.compile(r'(^|\.)temperature$'), )
REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
VERIFY_SHAPE = (1, 3, 224, 224)


class ConversionError(ValueError):
    """An official checkpoint does not fit the target model.

    Attributes:
        problems (int): Mismatching, unexpected and missing keys (0 when
            the error is not about keys).
    """
    problems = 0


def load_official_state_dict(path: str) -> 'OrderedDict[str, torch.Tensor]':
    """The weights of an official checkpoint file (see
    :func:`mmdyn.analysis.checkpoint_formats.read_official_checkpoint`)."""
    return read_official_checkpoint(path).state_dict


def unwrap_state_dict(ckpt) -> 'OrderedDict[str, torch.Tensor]':
    """The weights inside a loaded checkpoint object."""
    return unwrap_checkpoint(ckpt).state_dict


def _filled_from_model(key: str) -> bool:
    return any(p.search(key) for p in FILLED_FROM_MODEL)


def _shape(value) -> Tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else tuple(value.shape)


def check_fit(converted: Dict[str, torch.Tensor],
              target: Dict[str, torch.Tensor],
              origin: Optional[Dict[str, str]] = None,
              config: Optional[str] = None) -> None:
    """Raise :class:`ConversionError` unless ``converted`` has exactly the
    target's keys (less the temperatures) with the target's shapes.

    The message names the first mismatching key (its official name too,
    when ``origin`` maps it) with both shapes, then counts the rest.
    """
    origin = origin or {}

    def name(key):
        old = origin.get(key)
        return f'{old} (-> {key})' if old and old != key else key

    mismatched = [
        k for k in converted
        if k in target and _shape(converted[k]) != _shape(target[k])
    ]
    unexpected = [k for k in converted if k not in target]
    missing = [
        k for k in target if k not in converted and not _filled_from_model(k)
    ]
    if not (mismatched or unexpected or missing):
        return
    where = f' for {osp.basename(config)}' if config else ''
    if mismatched:
        key = mismatched[0]
        first = (f'first shape mismatch {name(key)}: checkpoint '
                 f'{_shape(converted[key])} vs model {_shape(target[key])}')
    elif unexpected:
        first = f'first key the model does not have: {name(unexpected[0])}'
    else:
        first = f'first model key missing from the checkpoint: {missing[0]}'
    counts = (f'{len(mismatched)} shape mismatch(es), {len(unexpected)} '
              f'key(s) the model does not have, {len(missing)} model key(s) '
              'missing')
    error = ConversionError(f'the checkpoint does not fit the model{where}: '
                            f'{first} ({counts})')
    error.problems = len(mismatched) + len(unexpected) + len(missing)
    raise error


def match_target(converted: Dict[str, torch.Tensor],
                 target: Dict[str, torch.Tensor],
                 origin: Optional[Dict[str, str]] = None,
                 config: Optional[str] = None
                 ) -> 'OrderedDict[str, torch.Tensor]':
    """Check ``converted`` against the target state dict (see
    :func:`check_fit`) and return the dict to load: every target key, in target
    order, the temperatures taken from ``target``."""
    check_fit(converted, target, origin, config)
    out = OrderedDict()
    for key, value in target.items():
        out[key] = converted[key] if key in converted else value.clone()
    return out


def candidate_configs(family: str,
                      state: Dict[str, torch.Tensor],
                      config_root: Optional[str] = None) -> List[str]:
    """Mmdyn configs that may fit an official checkpoint (architecture and
    depth from the keys; the exact variant is then found by shapes)."""
    root = config_root or osp.join(REPO_ROOT, 'configs')
    pattern = config_pattern(architecture_of(state), state)
    return sorted(glob.glob(osp.join(root, CONFIG_FOLDERS[family], pattern)))


INIT_FUNCTIONS = ('uniform_', 'normal_', 'trunc_normal_', 'constant_', 'ones_',
                  'zeros_', 'xavier_uniform_', 'xavier_normal_',
                  'kaiming_uniform_', 'kaiming_normal_', 'orthogonal_')


@contextlib.contextmanager
def _skipped_init():
    """``torch.nn.init`` functions as no-ops: on meta tensors they only cost
    time (their values are never read)."""
    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name in INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


@functools.lru_cache(maxsize=128)
def meta_model_summary(config: str
                       ) -> Tuple['OrderedDict[str, Tuple[int, ...]]', int]:
    """(key -> shape of the state dict, number of parameters) of the config's
    model, built on the meta device without initialisation (shapes without
    memory or time)."""
    from .models import build_model
    with torch.device('meta'), _skipped_init():
        model = build_model(config, device='meta')
    shapes = OrderedDict(
        (k, tuple(v.shape)) for k, v in model.state_dict().items())
    return shapes, sum(p.numel() for p in model.parameters())


def target_shapes(config: str) -> 'OrderedDict[str, Tuple[int, ...]]':
    """Key -> shape of the config's model state dict (see
    :func:`meta_model_summary`)."""
    return meta_model_summary(osp.abspath(config))[0]


def _relative(path: str) -> str:
    path = osp.abspath(path)
    return osp.relpath(path, REPO_ROOT) if path.startswith(REPO_ROOT) \
        else path


def supported_models(family: str,
                     config_root: Optional[str] = None) -> List[str]:
    """The models the converter of ``family`` has configs for: the names of the
    family's ImageNet configs up to their schedule (e.g.
    ``resnet18-odconv4x``)."""
    root = config_root or osp.join(REPO_ROOT, 'configs')
    configs = glob.glob(osp.join(root, CONFIG_FOLDERS[family], '*_in1k.py'))
    return sorted({osp.basename(c).split('_')[0] for c in configs})


def _no_config_for(family: str, state: Dict[str, torch.Tensor],
                   config_root: Optional[str]) -> ConversionError:
    """The error for weights whose architecture no config of the family has
    (e.g. an ODConv ResNet-34)."""
    arch = architecture_of(state)
    model = f'ResNet-{resnet_depth(state)}' if arch == 'resnet' else {
        'mobilenet_v2': 'MobileNetV2',
        'convnext': 'ConvNeXt'
    }.get(arch, arch)
    supported = ', '.join(supported_models(family, config_root)) or 'none'
    return ConversionError(
        f'no {family} config has the architecture of the checkpoint '
        f'({model}; looked for {CONFIG_FOLDERS[family]}/'
        f'{config_pattern(arch, state)}). The {family} models with a config '
        f'are: {supported}. Write a config for this model and pass it with '
        '--config')


def _several_fit(family: str, fits: Sequence[str], arch: Optional[str],
                 src: str) -> ConversionError:
    """The error for weights that fit several configs (DDF mul and add)."""
    hint = ''
    if arch:
        named = [
            c for c in fits if all(
                part in osp.basename(c)
                for part in re.findall(r'mul|add', arch))
        ]
        if len(named) == 1:
            hint = (f'; the file records the model {arch!r}, which is '
                    f'{osp.basename(named[0])}')
            fits = named + [c for c in fits if c != named[0]]
    commands = ' or '.join(
        f'python {CONVERTER_SCRIPTS[family]} {src} OUT.pth --config '
        f'{_relative(c)}' for c in fits)
    return ConversionError(
        f'the weights fit several configs ({len(fits)}) that differ only in '
        f'what the weights cannot tell (e.g. DDF mul vs add){hint}: pass '
        '--config, '
        f'run {commands}')


def convert(state: Dict[str, torch.Tensor],
            family: str,
            config: Optional[str] = None,
            config_root: Optional[str] = None,
            build: Optional[Callable[[str], torch.nn.Module]] = None,
            log: Optional[Callable[[str], None]] = None,
            arch: Optional[str] = None,
            src: str = 'IN.pth'
            ) -> Tuple['OrderedDict[str, torch.Tensor]', str]:
    """Convert an official state dict to an mmdyn model's state dict.

    Args:
        state (dict): Official state dict (already unwrapped).
        family (str): 'odconv', 'kw', 'ddf' or 'dyconv'.
        config (str, optional): Target mmdyn config. Default: the one config
            of the family's folder whose model the checkpoint fits exactly.
        config_root (str, optional): mmdyn's ``configs`` folder. Default:
            the repository's.
        build (callable, optional): config path -> model, used for the
            values of the temperature buffers; default
            :func:`mmdyn.analysis.models.build_model`.
        log (callable, optional): Progress printer.
        arch (str, optional): Model name the checkpoint records, used in
            the message when several configs fit.
        src (str): Source file name, for the commands in messages.

    Returns:
        tuple: (state dict to save, config it was checked against).

    Raises:
        ConversionError: unknown keys, no or several fitting configs, or a
            mismatch with ``config``.
    """
    if build is None:
        from .models import build_model
        build = build_model
    try:
        names = rename_keys(state, rules_for(family, state))
    except LayoutError as err:
        raise ConversionError(str(err)) from None
    converted = OrderedDict((names[k], v) for k, v in state.items())
    origin = {new: old for old, new in names.items()}
    if config is None:
        try:
            candidates = candidate_configs(family, state, config_root)
        except LayoutError as err:
            raise ConversionError(str(err)) from None
        fits, reasons = [], []
        for candidate in candidates:
            if log is not None:
                log(f'trying {_relative(candidate)}')
            try:
                check_fit(converted, target_shapes(candidate), origin,
                          candidate)
                fits.append(candidate)
            except ConversionError as err:
                reasons.append(err)
        if not candidates:
            raise _no_config_for(family, state, config_root)
        if not fits:
            tried = ', '.join(osp.basename(c) for c in candidates)
            closest = min(reasons, key=lambda e: e.problems)
            raise ConversionError(
                f'the checkpoint fits none of the {family} configs tried '
                f'({tried or "none found"}); pass --config to compare with '
                f'one; closest: {closest}')
        if len(fits) > 1:
            raise _several_fit(family, fits, arch, src)
        config = fits[0]
    else:
        check_fit(converted, target_shapes(config), origin, config)
    return match_target(converted,
                        build(config).state_dict(), origin, config), config


def verify_input(shape: Sequence[int] = VERIFY_SHAPE) -> torch.Tensor:
    """The fixed input of ``--verify``: ``sin(0.7 * i)`` over the flat index
    ``i``, computed in float64 and cast to float32 (no random generator, so any
    PyTorch reproduces it)."""
    count = 1
    for size in shape:
        count *= int(size)
    index = torch.arange(count, dtype=torch.float64)
    return (index * 0.7).sin().float().reshape(*shape)


@torch.no_grad()
def verify_logits(model: torch.nn.Module,
                  shape: Sequence[int] = VERIFY_SHAPE) -> torch.Tensor:
    """Logits [1, classes] of an mmpretrain classifier in eval mode for
    :func:`verify_input` (the network only: no data preprocessor)."""
    model.eval()
    logits = model(verify_input(shape), mode='tensor')
    if isinstance(logits, (tuple, list)):
        logits = logits[-1]
    return logits


def format_verification(logits: torch.Tensor) -> List[str]:
    """Top-5 (class, logit) and the checksums printed by ``--verify``."""
    values, indices = logits[0].double().topk(min(5, logits.shape[1]))
    top5 = ', '.join(f'{int(i)}: {float(v):.6f}'
                     for i, v in zip(indices, values))
    flat = logits.double()
    return [
        f'top-5 logits (class: logit): {top5}',
        f'checksum: sum {float(flat.sum()):.6f}, '
        f'sum of squares {float((flat**2).sum()):.6f}',
    ]


def verify_state(config: str,
                 state: Dict[str, torch.Tensor],
                 log: Callable[[str], None] = print,
                 model: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """Load ``state`` strictly into ``model`` (default: built from ``config``),
    print the logits of the fixed input; returns them."""
    if model is None:
        from .models import build_model
        model = build_model(config)
    model.load_state_dict(state, strict=True)
    logits = verify_logits(model)
    log(f'verify: {_relative(config)}, input {tuple(VERIFY_SHAPE)} = '
        'sin(0.7 * arange(N)) (float64 -> float32), eval mode')
    for line in format_verification(logits):
        log(line)
    return logits


def save_checkpoint(state: Dict[str, torch.Tensor], path: str, source: str,
                    config: str) -> None:
    """Save as an mmengine checkpoint (``state_dict`` + ``meta``) with mmdyn's
    checkpoint writer: through a temporary file in the same folder renamed into
    place (an interrupted or failed save leaves no partial ``path``), with the
    content hash that mmdyn's loader verifies."""
    from mmdyn.engine.checkpoint_io import \
        save_checkpoint as save_verified_checkpoint
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    save_verified_checkpoint(
        dict(
            state_dict=state,
            meta=dict(
                converted_from=osp.basename(source),
                config=osp.basename(config))), path)


def convert_file(family: str,
                 src: str,
                 dst: str,
                 config: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = print,
                 weights: str = 'auto',
                 trust: bool = False,
                 verify: bool = False) -> str:
    """Read, convert, check, optionally verify, and save; returns the config
    used. Nothing is written when any step fails.

    Args:
        family (str): 'odconv', 'kw', 'ddf' or 'dyconv'.
        src (str): Official checkpoint.
        dst (str): Output mmengine checkpoint.
        config (str, optional): Target config (default: found by shapes).
        log (callable, optional): Printer. Default: print.
        weights (str): 'auto', 'model' or 'ema' (see
            :func:`mmdyn.analysis.checkpoint_formats.unwrap_checkpoint`).
        trust (bool): Allow any pickled object (runs code named in the
            file). Default: False.
        verify (bool): Load into the built model and print the logits of
            the fixed input. Default: False.
    """
    log = log or (lambda msg: None)
    ckpt: OfficialCheckpoint = read_official_checkpoint(src, weights, trust)
    log(f'read {src}: {ckpt.source}, {len(ckpt.state_dict)} tensors' +
        (f', model {ckpt.arch!r}' if ckpt.arch else ''))
    if ckpt.ema_available and weights == 'auto':
        log('the file also holds EMA weights: --weights ema converts those')
    from .models import build_model
    built = {}

    def build_once(path):
        built[path] = build_model(path)
        return built[path]

    out, used = convert(
        ckpt.state_dict,
        family,
        config,
        build=build_once,
        log=log,
        arch=ckpt.arch,
        src=src)
    if verify:
        # The logits are the command's result: printed, not logged.
        verify_state(used, out, print, model=built.get(used))
    save_checkpoint(out, dst, src, used)
    log(f'converted {len(ckpt.state_dict)} tensors of {src} for '
        f'{_relative(used)} -> {dst}')
    return used


def converter_cli(family: str,
                  description: str,
                  argv: Optional[Sequence[str]] = None) -> None:
    """Command line of ``tools/model_converters/<family>2mmdyn.py``.

    ``IN OUT [--config CONFIG] [--weights {auto,model,ema}] [--verify]
    [--trust-checkpoint]``; exits with a one-line refusal instead of a
    traceback.
    """
    import sys
    parser = converter_parser(description)
    args = parser.parse_args(argv)
    from .progress import tool_logger
    try:
        convert_file(
            family,
            args.src,
            args.dst,
            args.config,
            log=tool_logger().info,
            weights=args.weights,
            trust=args.trust_checkpoint,
            verify=args.verify)
    except (ConversionError, CheckpointFormatError) as err:
        sys.exit(f'conversion refused: {err}')
