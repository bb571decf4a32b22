# Copyright (c) mmdyn contributors. All rights reserved.
"""Whole-model latency, throughput and peak memory of configs.

One or more models are measured in one process, their iterations
interleaved (A, B, A, B, ...), so that a noisy shared machine slows them
alike and their ratio stays meaningful. Each iteration is either

* ``infer``: the network forward without post-processing under
  ``torch.no_grad()`` (:func:`mmdyn.analysis.models.tensor_forward`), or
* ``train``: forward + loss (``mode='loss'``) + backward + optimiser step
  (the config's ``optim_wrapper`` optimiser, plain SGD if that cannot be
  built) on a fixed random batch prepared once by the data preprocessor.

Peak memory, measured after the timing in a separate pass (so that sampling
does not perturb the timings):

* CUDA: ``torch.cuda.max_memory_allocated`` during one iteration (absolute,
  weights and optimiser state included).
* CPU: the largest growth of the process' resident set during one
  iteration over its resident set just before it, sampled every 1 ms from
  ``/proc/self/statm`` by a background thread, after ``malloc_trim``: the
  activation/gradient working set of a step. Parameters (and optimiser
  state after the first step) are not included; their size is reported
  separately.
"""
import ctypes
import gc
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

MODES = ('infer', 'train')


@dataclass
class BenchResult:
    """Measurements of one model.

    Attributes:
        name (str): Label (usually the config name).
        mode (str): 'infer' or 'train'.
        batch_size (int): Images per iteration.
        times (list[float]): Seconds of each timed iteration.
        peak_mem_bytes (int): See the module docstring for the method.
        param_bytes (int): Bytes of the parameters.
    """
    name: str
    mode: str
    batch_size: int
    times: List[float] = field(default_factory=list)
    peak_mem_bytes: int = 0
    param_bytes: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.median


class RSSPeakSampler:
    """Samples this process' resident set size in a background thread.

    Use as a context manager; ``peak_growth`` is then the largest RSS seen
    minus the RSS at entry, in bytes.
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.page = _page_size()
        self.start = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _rss(self) -> int:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self):
        release_free_memory()
        self.start = self.peak = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def peak_growth(self) -> int:
        return max(0, self.peak - self.start)


def _page_size() -> int:
    import os
    return os.sysconf('SC_PAGE_SIZE')


def release_free_memory() -> None:
    """Collect garbage and give freed heap back to the OS (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: str) -> None:
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


class ModelStep:
    """One benchmark iteration of a model, ready to call.

    Args:
        model (nn.Module): Model (already on ``device``).
        batch (dict): ``dict(inputs, data_samples)`` from the preprocessor.
        mode (str): 'infer' or 'train'.
        device (str): 'cpu' or 'cuda[:i]'.
        amp (bool): Autocast (bfloat16 on CPU, float16 on CUDA with a grad
            scaler for training). Default: False.
        optim_cfg (dict, optional): The config's ``optim_wrapper``.
    """

    def __init__(self,
                 model: nn.Module,
                 batch: dict,
                 mode: str,
                 device: str,
                 amp: bool = False,
                 optim_cfg: Optional[dict] = None):
        if mode not in MODES:
            raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
        self.model = model
        self.batch = batch
        self.mode = mode
        self.device = str(device)
        self.amp = amp
        self.device_type = 'cuda' if self.device.startswith('cuda') else 'cpu'
        self.amp_dtype = (
            torch.float16 if self.device_type == 'cuda' else torch.bfloat16)
        self.optimizer = None
        self.scaler = None
        if mode == 'train':
            model.train()
            self.optimizer = build_optimizer(model, optim_cfg)
            if amp and self.device_type == 'cuda':
                self.scaler = torch.amp.GradScaler('cuda')
        else:
            model.eval()

    def __call__(self) -> None:
        from .models import loss_forward, tensor_forward
        autocast = torch.autocast(
            self.device_type, dtype=self.amp_dtype, enabled=self.amp)
        if self.mode == 'infer':
            with torch.no_grad(), autocast:
                tensor_forward(self.model, self.batch)
            return
        with autocast:
            loss = loss_forward(self.model, self.batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_optimizer(model: nn.Module,
                    optim_cfg: Optional[dict] = None) -> torch.optim.Optimizer:
    """The optimiser of a config's ``optim_wrapper`` (SGD if that fails)."""
    if optim_cfg is not None:
        try:
            import copy

            from mmengine.optim import build_optim_wrapper
            cfg = copy.deepcopy(dict(optim_cfg))
            # Loss scaling is done here, not by the wrapper.
            cfg['type'] = 'OptimWrapper'
            for key in ('loss_scale', 'dtype', 'use_fsdp'):
                cfg.pop(key, None)
            return build_optim_wrapper(model, cfg).optimizer
        except Exception as err:  # noqa: BLE001
            print(
                f'[benchmark] could not build the config optimiser '
                f'({err!r}); using SGD',
                flush=True)
    return torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)


def run_interleaved(steps: Sequence[Callable[[], None]],
                    names: Sequence[str],
                    mode: str,
                    batch_size: int,
                    repeat: int,
                    warmup: int,
                    device: str = 'cpu',
                    log: Optional[Callable[[str], None]] = print,
                    measure_memory: bool = True) -> List[BenchResult]:
    """Time ``steps`` alternately: ``warmup`` + ``repeat`` rounds.

    Args:
        steps (sequence[callable]): One iteration of each model.
        names (sequence[str]): Labels.
        mode (str): 'infer' or 'train' (recorded).
        batch_size (int): Images per iteration (recorded).
        repeat (int): Timed rounds (median reported).
        warmup (int): Untimed rounds first.
        device (str): Default: 'cpu'.
        log (callable, optional): Progress printer. Default: print.
        measure_memory (bool): Do the memory pass. Default: True.

    Returns:
        list[BenchResult]: one per step, in order.
    """
    if repeat < 1:
        raise ValueError(f'repeat must be >= 1, got {repeat}')
    if warmup < 0:
        raise ValueError(f'warmup must be >= 0, got {warmup}')
    results = [BenchResult(n, mode, batch_size) for n in names]
    total = warmup + repeat
    for it in range(total):
        # Alternate the order too, so neither model always runs right after
        # the other's cache-cold moment.
        order = range(len(steps)) if it % 2 == 0 else reversed(
            range(len(steps)))
        for i in order:
            _sync(device)
            start = time.perf_counter()
            steps[i]()
            _sync(device)
            elapsed = time.perf_counter() - start
            if it >= warmup:
                results[i].times.append(elapsed)
        if log is not None:
            phase = 'warmup' if it < warmup else 'timed'
            done = ', '.join(
                f'{r.name}: {statistics.median(r.times) * 1e3:.1f} ms'
                for r in results if r.times)
            log(f'[benchmark] {phase} round {it + 1}/{total}' +
                (f' (median so far: {done})' if done else ''))
    if measure_memory:
        for step, result in zip(steps, results):
            result.peak_mem_bytes = measure_peak_memory(step, device)
    return results


def measure_peak_memory(step: Callable[[], None],
                        device: str = 'cpu',
                        rounds: int = 2) -> int:
    """Peak memory of one iteration (max over ``rounds``), see module doc."""
    peak = 0
    for _ in range(rounds):
        if str(device).startswith('cuda'):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        else:
            with RSSPeakSampler() as sampler:
                step()
            peak = max(peak, sampler.peak_growth)
    return peak


def check_device(device: str) -> None:
    """Raise ``RuntimeError`` for a CUDA ``device`` where torch has none."""
    if str(device).startswith('cuda') and not torch.cuda.is_available():
        raise RuntimeError(
            f'device {device!r}: no CUDA GPU is available to torch here '
            '(torch.cuda.is_available() is False); run on a GPU machine or '
            'use --device cpu')


def benchmark_configs(configs: Sequence[str],
                      mode: str = 'infer',
                      batch_size: int = 8,
                      shape: Optional[Sequence[int]] = None,
                      device: str = 'cpu',
                      amp: bool = False,
                      repeat: int = 10,
                      warmup: int = 2,
                      cfg_options: Optional[dict] = None,
                      log: Optional[Callable[[str], None]] = print,
                      measure_memory: bool = True,
                      profile: bool = False) -> List[BenchResult]:
    """Build each config's model and benchmark them interleaved.

    Args:
        configs (sequence[str]): Config paths (1 or more).
        mode (str): 'infer' or 'train'. Default: 'infer'.
        batch_size (int): Default: 8.
        shape (sequence[int], optional): (H, W); default 224x224 for
            classifiers, 800x1333 for detectors.
        device (str): Default: 'cpu'.
        amp (bool): Autocast. Default: False.
        repeat (int): Timed rounds. Default: 10.
        warmup (int): Untimed rounds. Default: 2.
        cfg_options (dict, optional): Overrides applied to every config.
        log (callable, optional): Progress printer. Default: print.
        measure_memory (bool): Default: True.
        profile (bool): After the timing, print the top operators of one
            iteration of each model (torch profiler). Default: False.

    Returns:
        list[BenchResult]: one per config.
    """
    import os.path as osp

    from .models import (build_model, default_shape, load_config, make_batch,
                         task_of)
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    check_device(device)
    steps, names, param_bytes = [], [], []
    for config in configs:
        cfg = load_config(config, cfg_options)
        # Construction already initialises every layer; init_weights would
        # only add the (long) initialisation log.
        model = build_model(cfg, device=device)
        size = shape if shape is not None else default_shape(task_of(model))
        batch = make_batch(
            model, batch_size, size, training=(mode == 'train'), device=device)
        steps.append(
            ModelStep(model, batch, mode, device, amp,
                      cfg.get('optim_wrapper', None)))
        names.append(osp.splitext(osp.basename(str(config)))[0])
        param_bytes.append(
            sum(p.numel() * p.element_size() for p in model.parameters()))
        if log is not None:
            log(f'[benchmark] built {names[-1]}: input '
                f'{tuple(batch["inputs"].shape)}, '
                f'{param_bytes[-1] / 2**20:.1f} MiB of parameters')
    results = run_interleaved(steps, names, mode, batch_size, repeat, warmup,
                              device, log, measure_memory)
    for result, nbytes in zip(results, param_bytes):
        result.param_bytes = nbytes
    if profile and log is not None:
        for step, name in zip(steps, names):
            log(f'[benchmark] top operators of one {mode} iteration of '
                f'{name}:\n' + profile_step(step, device=device))
    return results


def paired_ratio(result: BenchResult, base: BenchResult) -> float:
    """Median over rounds of ``result`` time / ``base`` time in that round.

    Rounds ran back to back, so each ratio compares the two models under the
    same machine load; falls back to the ratio of medians.
    """
    if len(result.times) == len(base.times) and result.times:
        return statistics.median(a / b
                                 for a, b in zip(result.times, base.times))
    return result.median / base.median


def format_results(results: Sequence[BenchResult], device: str = 'cpu') -> str:
    """A markdown table; with 2+ results, the ratios to the first."""
    mem_label = ('peak alloc (MiB)' if str(device).startswith('cuda') else
                 'peak RSS growth (MiB)')
    lines = [
        f'| config | mode | batch | median (ms) | images/s | {mem_label} '
        '| time ratio vs first (paired median) |',
        '|---|---|---:|---:|---:|---:|---:|'
    ]
    base = results[0]
    for r in results:
        ratio = f'{paired_ratio(r, base):.2f}x'
        lines.append(f'| {r.name} | {r.mode} | {r.batch_size} | '
                     f'{r.median * 1e3:.1f} | {r.images_per_s:.3g} | '
                     f'{r.peak_mem_bytes / 2**20:.0f} | {ratio} |')
    return '\n'.join(lines)


def profile_step(step: Callable[[], None],
                 row_limit: int = 15,
                 device: str = 'cpu') -> str:
    """Top operators of one iteration by self time (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU]
    sort_by = 'self_cpu_time_total'
    if str(device).startswith('cuda'):
        activities.append(ProfilerActivity.CUDA)
        sort_by = 'self_cuda_time_total'
    with profile(activities=activities) as prof:
        step()
    return prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
