# Copyright (c) mmdyn contributors. All rights reserved.
"""Config preparation shared by ``tools/train.py`` and ``tools/test.py``.

The tools stay task-agnostic: whether a config is an mmdet or an mmpretrain
one is read from its ``default_scope`` (inferred from the model type when a
config has none), and everything else is mmengine's ``Runner``.
"""
import datetime
import gc
import os.path as osp

import torch
import torch.distributed as torch_dist
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from mmdyn.datasets import ensure_demo_data
from mmdyn.tool_args import add_runtime_arguments  # noqa: F401
from .checkpoint import checked_path, find_resume_checkpoint
from .config_bases import load_config as read_config
from .malloc import MALLOC_TUNING_ENV, tune_malloc
from .sanity import check_annotation_files

__all__ = [
    'load_config', 'configure_cpu_distributed', 'init_cpu_process_group',
    'close_process_group', 'infer_default_scope', 'enable_amp', 'set_resume',
    'add_checkpoint_check', 'build_runner', 'add_runtime_arguments',
    'apply_runtime_arguments'
]

_KNOWN_SCOPES = ('mmdet', 'mmpretrain')


def load_config(path, cfg_options=None, launcher='none', work_dir=None):
    """Read a config and apply the command-line settings common to tools.

    Args:
        path (str): config file, or ``package::relative`` name.
        cfg_options (dict, optional): ``--cfg-options`` overrides.
        launcher (str): ``none``, ``pytorch``, ``slurm`` or ``mpi``.
            Defaults to ``'none'``.
        work_dir (str, optional): ``--work-dir``; else the config's
            ``work_dir``; else ``./work_dirs/<config name>``.

    Returns:
        mmengine.Config: the prepared config.
    """
    cfg = read_config(path, cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(path))[0])
    if cfg.get('default_scope') is None:
        scope = infer_default_scope(cfg)
        if scope is not None:
            cfg.default_scope = scope
    if launcher != 'none' and not torch.cuda.is_available():
        configure_cpu_distributed(cfg)
    return cfg


def configure_cpu_distributed(cfg):
    """Settings for PyTorch DDP on CPU: gloo, no device ids.

    ``nccl`` (the configs' default) needs GPUs, and DDP refuses
    ``device_ids`` for a CPU module while mmengine passes
    ``[LOCAL_RANK]`` unless the wrapper config says otherwise. The process
    group itself is started by :func:`init_cpu_process_group`.
    """
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper


def init_cpu_process_group(cfg):
    """Start the process group of a ``pytorch``-launched run without CUDA.

    mmengine 0.10's ``init_dist('pytorch')`` calls ``torch.cuda.set_device``
    unconditionally ("Found no NVIDIA driver" on a CPU-only machine). The
    Runner only calls it when no process group exists, so the tools start
    the group here, with the config's ``env_cfg.dist_cfg`` (gloo, see
    :func:`configure_cpu_distributed`), from torchrun's environment.

    Returns:
        bool: whether a process group was started.
    """
    if cfg.get('launcher', 'none') != 'pytorch' or \
            torch.cuda.is_available() or not torch_dist.is_available() or \
            torch_dist.is_initialized():
        return False
    kwargs = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = kwargs.pop('backend', 'gloo')
    if kwargs.get('timeout') is not None:
        kwargs['timeout'] = datetime.timedelta(seconds=kwargs['timeout'])
    torch_dist.init_process_group(backend=backend, **kwargs)
    return True


def close_process_group(cfg, synchronize: bool = False):
    """End the process group of a distributed run (``launcher`` other than
    ``'none'``) when the tool's work is done.

    A gloo group left to the interpreter's exit can abort a rank after the work
    has finished ("terminate called without an active exception", SIGABRT),
    which turns a completed run into a failed one. So: with ``synchronize``
    (the work finished on this rank) a barrier first, so that no rank tears
    its connections down while another still uses them; then the group is
    destroyed, and a garbage collection frees what still references it (the
    runner's DDP wrapper and its reducer sit in reference cycles) while the
    interpreter is alive. The caller drops its runner before calling this.
    Without that, one two-process run in about 50 aborted on this machine
    (torch 2.14, gloo).
    """
    if cfg.get('launcher', 'none') != 'none' and \
            torch_dist.is_available() and torch_dist.is_initialized():
        if synchronize:
            torch_dist.barrier()
        torch_dist.destroy_process_group()
        gc.collect()


def infer_default_scope(cfg):
    """Guess ``'mmdet'`` or ``'mmpretrain'`` for a config without a scope.

    Args:
        cfg (mmengine.Config): the config.

    Returns:
        str | None: the scope whose model registry knows ``cfg.model.type``.
    """
    model_type = cfg.get('model', {}).get('type')
    if not isinstance(model_type, str):
        return None
    if '.' in model_type and model_type.split('.')[0] in _KNOWN_SCOPES:
        return model_type.split('.')[0]
    import mmdet.registry
    import mmpretrain.registry
    for scope, registry in (('mmdet', mmdet.registry.MODELS),
                            ('mmpretrain', mmpretrain.registry.MODELS)):
        registry.import_from_location()
        if model_type in registry.module_dict:
            return scope
    return None


def enable_amp(cfg):
    """Switch the config's optimizer wrapper to mixed precision.

    On CUDA: mmengine's ``AmpOptimWrapper`` with dynamic loss scaling. On
    CPU: :class:`~mmdyn.engine.amp.CPUAmpOptimWrapper` (bfloat16).
    """
    optim_wrapper = cfg.get('optim_wrapper')
    if optim_wrapper is None:
        raise ValueError('--amp needs an optim_wrapper in the config')
    if optim_wrapper.get('type', 'OptimWrapper') in ('AmpOptimWrapper',
                                                     'CPUAmpOptimWrapper'):
        return
    if torch.cuda.is_available():
        optim_wrapper.type = 'AmpOptimWrapper'
        optim_wrapper.loss_scale = 'dynamic'
    else:
        optim_wrapper.type = 'CPUAmpOptimWrapper'
        optim_wrapper.dtype = 'bfloat16'


def apply_runtime_arguments(args, cfg):
    """Apply :func:`add_runtime_arguments`' options to the process and
    ``cfg``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.allow_partial_load:
        cfg.allow_partial_load = True


def set_resume(cfg, resume):
    """``--resume``: ``'auto'`` (latest in the work dir) or a file path."""
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume


def add_checkpoint_check(cfg):
    """Add mmdyn's safety hooks (:class:`CheckpointShapeCheckHook`,
    :class:`EmptyDatasetCheckHook`, :class:`ExactResumeHook`) unless the config
    has them.

    The config key ``allow_partial_load`` (``True`` with
    ``--allow-partial-load``) becomes the shape check's
    ``allow_partial_load``.
    """
    hooks = list(cfg.get('custom_hooks', None) or [])
    for name in ('CheckpointShapeCheckHook', 'EmptyDatasetCheckHook',
                 'ExactResumeHook'):
        if not any(h.get('type') == name for h in hooks):
            hooks.append(dict(type=name))
    if cfg.get('allow_partial_load', False):
        for hook in hooks:
            if hook.get('type') == 'CheckpointShapeCheckHook':
                hook.setdefault('allow_partial_load', cfg.allow_partial_load)
    cfg.custom_hooks = hooks
    # load_from and --resume go through mmdyn's checked loader.
    if cfg.get('resume', False) and not cfg.get('load_from'):
        cfg.load_from = find_resume_checkpoint(cfg.work_dir)
    cfg.load_from = checked_path(cfg.get('load_from'))


def build_runner(cfg):
    """Tune ``malloc`` (see :mod:`mmdyn.engine.malloc`), generate missing demo
    data, then build the config's runner."""
    malloc_tuned = tune_malloc()
    ensure_demo_data(cfg)
    check_annotation_files(cfg)
    add_checkpoint_check(cfg)
    init_cpu_process_group(cfg)
    if 'runner_type' in cfg:
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    if malloc_tuned:
        runner.logger.info('glibc malloc tuned to reuse freed memory '
                           f'({MALLOC_TUNING_ENV}=0 to disable)')
    else:
        runner.logger.info('malloc left at its defaults')
    return runner
