# KW-MobileNetV2 x1.0, kw1x (KernelWarehouse, ICML 2024): every conv is a KW
# conv; sharing (layer, pwconv) gives 13 warehouses; 5,168,146 parameters.
# Recipe of the paper's MobileNetV2 JSONs: 150 epochs, SGD (Nesterov) lr 0.05
# for a batch of 256, wd 4e-5 (not on 1-D parameters and biases), cosine per
# iteration down to 1e-6, RandomResizedCrop + flip only, temperature 1 -> 0
# over 15 epochs. Label smoothing 0.1 (the JSON leaves the CLI default).
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='KWMobileNetV2',
        widen_factor=1.0,
        reduction=1 / 16,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=('layer', 'pwconv')),
    head=dict(
        loss=dict(
            type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')))

optim_wrapper = dict(
    optimizer=dict(
        type='SGD', lr=0.05, momentum=0.9, weight_decay=4e-5, nesterov=True),
    paramwise_cfg=dict(
        norm_decay_mult=0., bias_decay_mult=0., flat_decay_mult=0.))

param_scheduler = [
    dict(
        type='CosineAnnealingLR',
        eta_min=1e-6,
        by_epoch=True,
        begin=0,
        end=150,
        convert_to_iter_based=True)
]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=150,
    val_interval=1)

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=15)]
