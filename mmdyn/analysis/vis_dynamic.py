# Copyright (c) mmdyn contributors. All rights reserved.
"""Pictures of what the dynamic layers of a model do on given images.

Forward hooks on the layers' filter/attention submodules record, for every
image run through the model:

* **DDF** (``DDFConv2d``) and **DDF-Up** (``DDFUpsample``): the per-pixel
  spatial filters (outputs of ``spatial_branch``) and the per-sample
  channel filters (outputs of ``channel_branch``). For DDF-Up, the spatial
  filter of output pixel ``(Y, X)`` is that of phase ``(Y % s, X % s)`` at
  low-resolution pixel ``(Y // s, X // s)``.
* **ODConv**: its four attentions (outputs of ``attention``: channel,
  filter, spatial, kernel).
* **DyConv / CondConv**: the kernel attention, ``softmax`` (DyConv) or
  ``sigmoid`` (CondConv) of ``attention``'s logits over the layer's
  ``temperature``.
* **KernelWarehouse** (``KWConv2d``/``KWLinear``): the cell attentions,
  :func:`~mmdyn.ops.kernel_warehouse.contrasting_attention` of
  ``attention``'s logits with the layer's ``beta`` and ``temperature``.

From these, :func:`render` writes

* ``summary.png`` / ``summary.json``: per attention layer, the normalised
  entropy of its kernel attention (1 = uniform over the kernels or cells,
  0 = one kernel) and the variance of each attention over the images (how
  much the layer's kernel depends on the input);
* ``attention/<layer>.png``: each attention of the layer, images x entries;
* ``ddf/<layer>_img<i>.png``: the image with the chosen pixels, the k x k
  spatial filter (head 0) at each of them, and statistics of the channel
  filters (mean and std over channels per tap, histogram).

Layers under a RoI head (e.g. DDF-Up in a mask head) see RoIs, not images:
they enter the statistics (each RoI a sample) but get no pixel pictures.
"""
import json
import math
import os
import os.path as osp
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from mmdyn.ops.families import family_of

ATTENTION_KINDS = ('odconv', 'dyconv', 'kw')
FILTER_KINDS = ('ddf', 'ddf_up')
OD_ATTENTIONS = ('channel', 'filter', 'spatial', 'kernel')


def layer_kind(module: nn.Module) -> Optional[str]:
    """``'ddf'``, ``'ddf_up'``, ``'odconv'``, ``'dyconv'``, ``'kw'`` or None
    for a module that is not an mmdyn dynamic layer."""
    family = family_of(module)  # the table of layer families
    return None if family is None else family.kind


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of the distributions along the last dim, divided by ``log(n)``:
    1 for a uniform distribution, 0 for a one-hot one.

    ``probs`` is normalised first (``|p| / sum |p|``), so sigmoid routing
    weights (CondConv) and signed cell attentions (KernelWarehouse) are
    read as how their magnitude spreads over the kernels.
    """
    p = probs.abs().double()
    n = p.shape[-1]
    if n < 2:
        return torch.zeros(p.shape[:-1], dtype=torch.float64)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    plogp = torch.where(p > 0,
                        p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return -plogp.sum(-1) / math.log(n)


class Moments:
    """Running mean and (population) variance of samples of one shape."""

    def __init__(self):
        self.count = 0
        self.sum = None
        self.sumsq = None

    def add(self, samples: torch.Tensor) -> None:
        """Add a batch ``[B, ...]`` of samples."""
        x = samples.detach().double().reshape(samples.shape[0], -1).cpu()
        if self.sum is None:
            self.sum = x.sum(0)
            self.sumsq = (x * x).sum(0)
        else:
            self.sum += x.sum(0)
            self.sumsq += (x * x).sum(0)
        self.count += x.shape[0]

    def mean_variance(self) -> float:
        """Variance over the samples of each entry, averaged over entries."""
        if not self.count:
            return float('nan')
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp_min(0)
        return float(var.mean())


@dataclass
class LayerRecord:
    """What one dynamic layer did on the images run so far.

    Attributes:
        name (str): Module name in the model.
        kind (str): See :func:`layer_kind`.
        type (str): Class name.
        roi_level (bool): Whether the layer sees RoIs rather than images.
        profiles (dict): Per attention name, one ``[D]`` vector per sample
            (attention layers; KernelWarehouse: the mean ``|attention|`` of
            each cell over the mixtures), with ``images`` the image index of
            each sample.
        moments (dict): Per attention name, :class:`Moments` of the full
            attention.
        entropies (list[float]): Normalised entropy of the kernel attention
            per sample (mean over mixtures for KernelWarehouse).
        spatial_filters (dict): DDF/DDF-Up, image index -> spatial filters
            ``[P, head*k*k, H, W]`` (P = 1 for DDF, s*s phases for DDF-Up)
            of an image-level layer.
        channel_filters (list[Tensor]): DDF/DDF-Up, ``[P, C, k*k]`` per
            sample.
        scale_factor (int): DDF-Up's s (1 for DDF).
        kernel_size (int): DDF's k.
        num_kernels (int): Attention layers: the kernels (KernelWarehouse:
            cells) the kernel attention spreads over; 1 for a layer without
            kernel attention (ODConv 1x). 0 until recorded.
        spatial_shape (tuple[int, int]): ODConv: the ``(kh, kw)`` of its
            spatial attention.
    """
    name: str
    kind: str
    type: str
    roi_level: bool = False
    profiles: Dict[str, List[torch.Tensor]] = field(default_factory=dict)
    images: List[int] = field(default_factory=list)
    moments: Dict[str, Moments] = field(default_factory=dict)
    entropies: List[float] = field(default_factory=list)
    spatial_filters: Dict[int, torch.Tensor] = field(default_factory=dict)
    channel_filters: List[torch.Tensor] = field(default_factory=list)
    scale_factor: int = 1
    kernel_size: int = 0
    num_kernels: int = 0
    spatial_shape: Tuple[int, ...] = ()

    def add_attention(self,
                      name: str,
                      value: Optional[torch.Tensor],
                      profile: Optional[torch.Tensor] = None):
        """Record attention ``name`` ``[B, ...]`` (None: constant 1);
        ``profile`` is what the pictures show (default: ``value``)."""
        if value is None:
            return
        value = value.detach().float().cpu()
        self.moments.setdefault(name, Moments()).add(value)
        profile = value if profile is None else profile.detach().float()
        self.profiles.setdefault(name, []).extend(
            profile.reshape(value.shape[0], -1).cpu())

    def add_samples(self, batch: int, image: int) -> None:
        """Count ``batch`` samples seen while running image ``image``."""
        self.images.extend([image] * batch)


class DynamicLayerRecorder:
    """Context manager recording what the dynamic layers of ``model`` do.

    Args:
        model (nn.Module): The model.
        layers (str, optional): Regular expression; only layers whose name
            it matches (``re.search``) are recorded. Default: all.
        filter_images (int): DDF/DDF-Up spatial filter maps are kept for the
            first this many images (their pictures). Default: 1.

    Call :meth:`next_image` before running each image (one per forward).
    """

    def __init__(self,
                 model: nn.Module,
                 layers: Optional[str] = None,
                 filter_images: int = 1):
        pattern = re.compile(layers) if layers else None
        self.filter_images = filter_images
        self.records: 'OrderedDict[str, LayerRecord]' = OrderedDict()
        self._modules: Dict[str, nn.Module] = OrderedDict()
        for name, module in model.named_modules():
            kind = layer_kind(module)
            if kind is None or (pattern and not pattern.search(name)):
                continue
            self._modules[name] = module
            self.records[name] = LayerRecord(
                name=name,
                kind=kind,
                type=type(module).__name__,
                roi_level='roi_head' in name.split('.')[0])
        self._handles = []
        self.image = -1

    def next_image(self) -> int:
        """Start recording the next image; returns its index."""
        self.image += 1
        return self.image

    def __enter__(self) -> 'DynamicLayerRecorder':
        for name, module in self._modules.items():
            getattr(self,
                    f'_hook_{self.records[name].kind}')(self.records[name],
                                                        module)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module, fn, pre=False):
        register = (
            module.register_forward_pre_hook
            if pre else module.register_forward_hook)
        self._handles.append(register(fn))

    # -- attention layers --------------------------------------------------
    def _hook_odconv(self, record, layer):
        record.num_kernels = layer.kernel_num
        record.spatial_shape = tuple(layer.kernel_size)

        def hook(_, __, outputs):
            record.add_samples(outputs[0].shape[0], self.image)
            for name, value in zip(OD_ATTENTIONS, outputs):
                record.add_attention(name, value)
                if name == 'kernel' and value is not None:
                    record.entropies.extend(
                        normalized_entropy(value.float()).tolist())

        self._hook(layer.attention, hook)

    def _hook_dyconv(self, record, layer):

        def hook(_, __, logits):
            logits = logits.detach() / layer.temperature
            if layer.routing == 'softmax':
                weights = torch.softmax(logits, dim=1)
            else:
                weights = torch.sigmoid(logits)
            record.num_kernels = weights.shape[1]
            record.add_samples(weights.shape[0], self.image)
            record.add_attention('kernel', weights)
            record.entropies.extend(normalized_entropy(weights).tolist())

        self._hook(layer.attention, hook)

    def _hook_kw(self, record, layer):
        from mmdyn.ops.kernel_warehouse import contrasting_attention

        def hook(_, __, logits):
            att = contrasting_attention(logits.detach(), layer.beta,
                                        layer.temperature)  # [B, m, n]
            record.num_kernels = att.shape[-1]
            record.add_samples(att.shape[0], self.image)
            record.add_attention('kernel', att, profile=att.abs().mean(1))
            record.entropies.extend(normalized_entropy(att).mean(-1).tolist())

        self._hook(layer.attention, hook)

    # -- DDF ---------------------------------------------------------------
    def _keep_maps(self, record) -> bool:
        return not record.roi_level and self.image < self.filter_images

    def _hook_ddf(self, record, layer):
        record.kernel_size = layer.kernel_size[0]
        k2 = record.kernel_size**2

        def channel_hook(_, __, cf):
            record.channel_filters.extend(cf.detach().float().reshape(
                cf.shape[0], 1, -1, k2).cpu())

        def spatial_hook(_, __, sf):
            if self._keep_maps(record) and sf.shape[0] == 1:
                record.spatial_filters[self.image] = sf.detach().float().cpu(
                )  # [1 (phase), head*k*k, Ho, Wo]

        self._hook(layer.channel_branch, channel_hook)
        self._hook(layer.spatial_branch, spatial_hook)

    def _hook_ddf_up(self, record, layer):
        record.kernel_size = layer.kernel_size
        record.scale_factor = layer.scale_factor
        k2 = layer.kernel_size**2
        phases = layer.scale_factor**2
        call = {}

        def pre_hook(_, args):
            call.clear()
            call['x'] = args[0]
            call['cf'] = [None] * phases
            call['sf'] = [None] * phases

        def branch_hook(kind, index):

            def hook(_, __, out):
                if call:
                    call[kind][index] = out.detach().float()

            return hook

        def post_hook(module, args, _):
            if not call:
                return
            x = call['x']
            cfs = call['cf']
            if any(cf is None for cf in cfs):  # a path that batches them
                with torch.no_grad():
                    cfs = [b(x).float() for b in module.channel_branch]
            cf = torch.stack(cfs, 1)  # [B, P, C*k*k, 1, 1]
            record.channel_filters.extend(
                cf.reshape(x.shape[0], phases, -1, k2).cpu())
            if self._keep_maps(record) and x.shape[0] == 1:
                sfs = call['sf']
                if any(sf is None for sf in sfs):
                    # The unguided fast path runs the s*s spatial branches
                    # as one conv (same values); rerun each branch on x.
                    with torch.no_grad():
                        sfs = [
                            branch(x).float()
                            for branch in module.spatial_branch
                        ]
                record.spatial_filters[self.image] = torch.cat(
                    [sf.detach() for sf in sfs]).cpu()
            call.clear()

        self._hook(layer, pre_hook, pre=True)
        for index in range(phases):
            self._hook(layer.channel_branch[index], branch_hook('cf', index))
            self._hook(layer.spatial_branch[index], branch_hook('sf', index))
        self._hook(layer, post_hook)


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------
def layer_statistics(record: LayerRecord) -> dict:
    """Numbers of ``summary.json`` for one layer."""
    stats = dict(type=record.type, kind=record.kind)
    if record.kind in ATTENTION_KINDS:
        stats['samples'] = len(record.images)
        stats['kernel_entropy'] = (
            float(np.mean(record.entropies)) if record.entropies else None)
        stats['variance_over_images'] = {
            name: moments.mean_variance()
            for name, moments in record.moments.items()
        }
    else:
        cfs = torch.stack(record.channel_filters) if \
            record.channel_filters else torch.zeros(0)
        stats['samples'] = int(cfs.shape[0])
        if cfs.numel():
            stats['channel_filter_mean'] = float(cfs.mean())
            stats['channel_filter_std'] = float(cfs.std())
            stats['channel_filter_variance_over_images'] = float(
                cfs.var(0, unbiased=False).mean())
    return stats


def pixel_filters(record: LayerRecord, image: int, input_hw: Tuple[int, int],
                  pixels: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """The k x k spatial filter (head 0) at each pixel ``(x, y)`` of the
    network input of size ``input_hw`` (the padded batch).

    The layer's output map has the input's stride ``input_h / out_h``; the
    filter of output pixel ``(Y, X)`` is read from phase
    ``(Y % s, X % s)`` at ``(Y // s, X // s)`` for DDF-Up (s = 1 for DDF).
    """
    maps = record.spatial_filters[image]  # [P, head*k*k, H, W]
    s, k = record.scale_factor, record.kernel_size
    out_h, out_w = maps.shape[-2] * s, maps.shape[-1] * s
    filters = []
    for x, y in pixels:
        oy = min(int(y * out_h / input_hw[0]), out_h - 1)
        ox = min(int(x * out_w / input_hw[1]), out_w - 1)
        phase = (oy % s) * s + ox % s
        filters.append(maps[phase, :k * k, oy // s, ox // s].reshape(k, k))
    return filters


def spatial_filter_variation(record: LayerRecord, image: int) -> torch.Tensor:
    """Per output pixel, the L2 distance of its spatial filter (head 0) from
    the mean filter of the map (of its phase, for DDF-Up): where the layer
    filters differently.

    Returns ``[s*H, s*W]`` (DDF-Up phases interleaved as in the output).
    """
    maps = record.spatial_filters[image]  # [P, head*k*k, H, W]
    k2 = record.kernel_size**2
    s = record.scale_factor
    filters = maps[:, :k2]
    mean = filters.mean((2, 3), keepdim=True)
    dist = (filters - mean).norm(dim=1)  # [P, H, W]
    height, width = dist.shape[-2:]
    return dist.view(s, s, height,
                     width).permute(2, 0, 3, 1).reshape(s * height, s * width)


# --------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _safe(name: str) -> str:
    """File name for a module name ('model' for the root module)."""
    return re.sub(r'[^A-Za-z0-9_.-]', '_', name) or 'model'


def _integer_ticks(ax) -> None:
    """Ticks only at whole numbers (samples, kernels, kernel taps)."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _widen_to_fit(fig, text, margin: float = 0.2) -> None:
    """Widen ``fig`` until ``text`` (a centred title) fits in it with
    ``margin`` inches each side: a long layer name would otherwise lose its
    first and last letters at the figure's edges."""
    renderer = fig.canvas.get_renderer()
    needed = text.get_window_extent(renderer).width / fig.dpi + 2 * margin
    if needed > fig.get_figwidth():
        fig.set_figwidth(needed)


def _save(fig, path: str) -> None:
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)


def summary_figure(records: Sequence[LayerRecord]):
    """The figure of :func:`plot_summary` (None without attention layers)."""
    layers = [r for r in records if r.kind in ATTENTION_KINDS and r.images]
    if not layers:
        return None
    plt = _pyplot()
    names = [r.name for r in layers]
    x = np.arange(len(layers))
    width = max(6.0, 0.35 * len(layers))
    fig, axes = plt.subplots(2, 1, figsize=(width, 7), sharex=True)
    entropy = [np.mean(r.entropies) if r.entropies else np.nan for r in layers]
    axes[0].bar(x, entropy, color='tab:blue')
    for i, record in enumerate(layers):
        if record.num_kernels == 1:  # no bar: say why
            axes[0].text(
                i,
                0.03,
                'one kernel',
                rotation=90,
                ha='center',
                va='bottom',
                fontsize=7,
                color='tab:gray')
    axes[0].set_ylim(0, 1.05)
    axes[0].set_ylabel('kernel attention\nnormalised entropy')
    axes[0].set_title('1 = uniform over kernels/cells, 0 = one kernel')
    attention_names = [
        n for n in OD_ATTENTIONS if any(n in r.moments for r in layers)
    ]
    bar = 0.8 / max(1, len(attention_names))
    for i, name in enumerate(attention_names):
        values = [
            r.moments[name].mean_variance() if name in r.moments else np.nan
            for r in layers
        ]
        axes[1].bar(
            x + (i - (len(attention_names) - 1) / 2) * bar,
            values,
            bar,
            label=name)
    axes[1].set_yscale('symlog', linthresh=1e-6)
    axes[1].set_ylabel('variance over images\n(mean over entries)')
    # Outside the axes, right of the last bars, never over them.
    axes[1].legend(
        fontsize=8,
        loc='upper left',
        bbox_to_anchor=(1.01, 1.0),
        borderaxespad=0.0)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


def plot_summary(records: Sequence[LayerRecord], path: str) -> bool:
    """Bar charts of kernel-attention entropy and of the attentions' variance
    over images, one bar (group) per attention layer; a layer with one kernel
    (ODConv 1x: no kernel attention) is marked ``one kernel`` instead of a bar.

    Returns False (and writes nothing) when there is no attention layer.
    """
    fig = summary_figure(records)
    if fig is None:
        return False
    _save(fig, path)
    return True


def attention_figure(record: LayerRecord):
    """The figure of :func:`plot_attentions`."""
    plt = _pyplot()
    names = [n for n in OD_ATTENTIONS if n in record.profiles]
    fig, axes = plt.subplots(
        1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
    labels = dict(kernel='cell (mean |att| over mixtures)' if record.kind ==
                  'kw' else 'kernel')
    for ax, name in zip(axes[0], names):
        values = torch.stack(record.profiles[name])
        if name == 'spatial' and record.spatial_shape:
            # One weight per kernel tap: drawn as the k x k kernel.
            image = ax.imshow(
                values.mean(0).reshape(record.spatial_shape).numpy(),
                cmap='viridis',
                interpolation='nearest')
            ax.set_title(
                f'spatial attention (mean of {len(values)} '
                'samples)',
                fontsize=9)
            ax.set_xlabel('kernel column', fontsize=8)
            ax.set_ylabel('kernel row', fontsize=8)
        else:
            image = ax.imshow(
                values.numpy(),
                aspect='auto',
                cmap='viridis',
                interpolation='nearest')
            ax.set_title(f'{name} attention', fontsize=9)
            ax.set_xlabel(labels.get(name, name), fontsize=8)
            ax.set_ylabel('sample', fontsize=8)
        _integer_ticks(ax)
        fig.colorbar(image, ax=ax, fraction=0.046)
    title = f'{record.name or "model"} ({record.type})'
    if record.num_kernels == 1:
        title += ': one kernel, no kernel attention'
    _widen_to_fit(fig, fig.suptitle(title, fontsize=9))
    fig.tight_layout()
    return fig


def plot_attentions(record: LayerRecord, path: str) -> None:
    """Each attention of one layer as a samples x entries heatmap; ODConv's
    spatial attention as its k x k kernel (mean over the samples)."""
    _save(attention_figure(record), path)


def plot_ddf(record: LayerRecord, image: int, picture: np.ndarray,
             input_hw: Tuple[int, int], pixels: Sequence[Tuple[int, int]],
             path: str) -> None:
    """The image with the pixels, their spatial filters, and the channel
    filters' statistics (this image's, all phases together)."""
    plt = _pyplot()
    filters = pixel_filters(record, image, input_hw, pixels)
    cols = max(3, len(pixels))
    fig, axes = plt.subplots(2, cols + 1, figsize=(2.4 * (cols + 1), 5))
    ax = axes[0, 0]
    ax.imshow(picture)
    for i, (x, y) in enumerate(pixels):
        ax.plot(x, y, 'o', ms=6, mfc='none', mec='yellow', mew=2)
        ax.annotate(
            str(i), (x, y),
            color='yellow',
            fontsize=9,
            xytext=(4, -4),
            textcoords='offset points')
    ax.set_title('input (pixels)', fontsize=9)
    ax.axis('off')
    bound = max(float(max(f.abs().max() for f in filters)), 1e-12)
    for i in range(cols):
        ax = axes[0, i + 1]
        if i < len(filters):
            im = ax.imshow(
                filters[i].numpy(), cmap='RdBu_r', vmin=-bound, vmax=bound)
            ax.set_title(f'spatial filter @ {i}', fontsize=9)
        ax.axis('off')
    fig.colorbar(im, ax=axes[0, -1], fraction=0.046)
    # An image-level layer sees one sample per image.
    cf = record.channel_filters[image]
    k = record.kernel_size
    flat = cf.reshape(-1, cf.shape[-1])  # [P*C, k*k]
    panels = ((flat.mean(0).reshape(k, k), 'channel filters: mean'),
              (flat.std(0).reshape(k, k), 'channel filters: std'))
    for ax, (values, title) in zip(axes[1, :2], panels):
        im = ax.imshow(values.numpy(), cmap='viridis')
        ax.set_title(title, fontsize=9)
        ax.axis('off')
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[1, 2]
    ax.hist(flat.flatten().numpy(), bins=40, color='tab:gray')
    ax.set_title('channel filter values', fontsize=9)
    ax = axes[1, 3]
    im = ax.imshow(
        spatial_filter_variation(record, image).numpy(), cmap='magma')
    ax.set_title(
        'per pixel: spatial filter\ndistance from the mean', fontsize=9)
    ax.axis('off')
    fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes[1, 4:]:
        ax.axis('off')
    fig.suptitle(f'{record.name} ({record.type}), image {image}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def default_pixels(height: int, width: int) -> List[Tuple[int, int]]:
    """Centre and two diagonal quarter points of an image."""
    return [(width // 2, height // 2), (width // 4, height // 4),
            (3 * width // 4, 3 * height // 4)]


def render(records: Sequence[LayerRecord],
           out_dir: str,
           pictures: Sequence[np.ndarray],
           input_hw: Tuple[int, int],
           pixels: Optional[Sequence[Tuple[int, int]]] = None) -> List[str]:
    """Write the PNGs and ``summary.json`` of module docstring into
    ``out_dir``; return the paths written.

    Args:
        records: From :class:`DynamicLayerRecorder`.
        out_dir (str): Output folder (created).
        pictures (list[ndarray]): RGB uint8 network inputs (unpadded), one
            per image, for the DDF pictures.
        input_hw (tuple[int, int]): Size of the padded network input the
            layers ran on.
        pixels (list[tuple[int, int]], optional): ``(x, y)`` pixels of the
            network input for the DDF spatial filters. Default: see
            :func:`default_pixels`.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = []
    summary = OrderedDict((r.name, layer_statistics(r)) for r in records)
    path = osp.join(out_dir, 'summary.json')
    with open(path, 'w') as f:
        json.dump(summary, f, indent=1)
    written.append(path)
    path = osp.join(out_dir, 'summary.png')
    if plot_summary(records, path):
        written.append(path)
    for record in records:
        if record.kind in ATTENTION_KINDS and record.profiles:
            folder = osp.join(out_dir, 'attention')
            os.makedirs(folder, exist_ok=True)
            path = osp.join(folder, f'{_safe(record.name)}.png')
            plot_attentions(record, path)
            written.append(path)
        elif record.kind in FILTER_KINDS:
            for image in sorted(record.spatial_filters):
                picture = pictures[image]
                chosen = pixels or default_pixels(*picture.shape[:2])
                folder = osp.join(out_dir, 'ddf')
                os.makedirs(folder, exist_ok=True)
                path = osp.join(folder, f'{_safe(record.name)}_img{image}.png')
                plot_ddf(record, image, picture, input_hw, chosen, path)
                written.append(path)
    return written


# --------------------------------------------------------------------------
# Running a config + checkpoint on images
# --------------------------------------------------------------------------
def build_model(config,
                checkpoint: Optional[str] = None,
                device: str = 'cpu',
                cfg_options: Optional[dict] = None):
    """Model (eval mode) and test pipeline of an mmdet/mmpretrain config.

    Returns:
        tuple: ``(model, pipeline, cfg)``.
    """
    from mmengine.dataset import Compose
    from mmengine.registry import MODELS, init_default_scope

    from mmdyn.engine.checkpoint import load_model_weights
    from mmdyn.engine.config_bases import load_config
    cfg = load_config(config, cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    if checkpoint:
        load_model_weights(model, checkpoint)  # refuses a partial load
    model.to(device).eval()
    pipeline_cfg = cfg.test_dataloader.dataset.get('pipeline')
    if pipeline_cfg is None:
        raise ValueError('the config has no test_dataloader.dataset.pipeline '
                         'to prepare the images; add one')
    # Images come without annotations: drop the annotation loaders.
    pipeline = Compose(
        [t for t in pipeline_cfg if 'LoadAnnotations' not in t['type']])
    return model, pipeline, cfg


def _network_picture(packed: dict) -> np.ndarray:
    """RGB uint8 picture of the packed (resized, unpadded) input."""
    img = packed['inputs']
    array = img.permute(1, 2, 0).cpu().numpy() if torch.is_tensor(img) \
        else np.asarray(img)
    if array.shape[-1] == 3:
        array = array[..., ::-1]  # loaded as BGR
    return np.ascontiguousarray(array).clip(0, 255).astype(np.uint8)


def record_images(model: nn.Module,
                  pipeline,
                  images: Sequence[str],
                  layers: Optional[str] = None,
                  filter_images: int = 1,
                  progress: bool = True):
    """Run ``images`` one by one through ``model`` with a
    :class:`DynamicLayerRecorder`.

    Returns:
        tuple: ``(records, pictures, input_hw)`` for :func:`render`;
        ``input_hw`` is the padded input size of the first image.
    """
    from mmengine.dataset import pseudo_collate
    from mmengine.utils import ProgressBar

    recorder = DynamicLayerRecorder(model, layers, filter_images)
    if not recorder.records:
        raise ValueError('the model has no mmdyn dynamic layer' + (
            f' whose name matches --layers {layers!r}' if layers else ''))
    pictures, input_hw = [], None
    bar = ProgressBar(len(images)) if progress else None
    with recorder, torch.no_grad():
        for path in images:
            if not osp.isfile(path):
                raise FileNotFoundError(f'image {path!r} does not exist')
            packed = pipeline(dict(img_path=path))
            pictures.append(_network_picture(packed))
            recorder.next_image()
            data = model.data_preprocessor(pseudo_collate([packed]), False)
            if input_hw is None:
                input_hw = tuple(data['inputs'].shape[-2:])
            model(**data, mode='predict')
            if bar is not None:
                bar.update()
    return list(recorder.records.values()), pictures, input_hw


def visualize(config,
              checkpoint: Optional[str],
              images: Sequence[str],
              out_dir: str,
              pixels=None,
              layers: Optional[str] = None,
              filter_images: int = 1,
              device: str = 'cpu',
              cfg_options: Optional[dict] = None,
              progress: bool = True) -> List[str]:
    """Everything of the module docstring for a config + checkpoint and images;
    returns the files written."""
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    model, pipeline, _ = build_model(config, checkpoint, device, cfg_options)
    records, pictures, input_hw = record_images(model, pipeline, images,
                                                layers, filter_images,
                                                progress)
    kinds = sorted({r.kind for r in records})
    logger.info(f'recorded {len(records)} dynamic layers ({", ".join(kinds)})'
                f' on {len(images)} image(s)')
    written = render(records, out_dir, pictures, input_hw, pixels)
    logger.info(f'wrote {len(written)} files under {out_dir}')
    return written
