# KW-ConvNeXt-Tiny, kw1x (KernelWarehouse, ICML 2024): every conv (stem,
# downsample, depthwise, both pointwise) is a KW conv with a bias, LayerNorm
# attention; 12 warehouses; 39,370,674 parameters. Recipe of the ConvNeXt
# code base: 300 epochs, AdamW lr 4e-3 for a batch of 4096, wd 0.05 (not on
# 1-D parameters and biases), 20 warm-up epochs then cosine per iteration to
# 1e-6, RandAugment, mixup 0.8, cutmix 1.0, label smoothing 0.1, random
# erasing 0.25, EMA 0.9999; drop path 0.3; temperature 1 -> 0 over 20 epochs.
_base_ = 'mmpretrain::convnext/convnext-tiny_32xb128_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='KWConvNeXt',
        arch='tiny',
        drop_path_rate=0.3,
        reduction=1 / 16,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'pwconv'),
        attention_norm='ln'))

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=1e-3,
        by_epoch=True,
        end=20,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-6,
        by_epoch=True,
        begin=20,
        end=300,
        convert_to_iter_based=True)
]

custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='DynamicTemperatureHook'),
]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=300,
    val_interval=1)
