# MobileNetV2 (1.0x) + ODConv (1x, r=1/16): the expansion 1x1, depthwise 3x3
# (no filter attention), projection 1x1 and the final 1x1 to 1280 channels are
# ODConv2d; the 3x3 stem and the classifier stay static.
# Official MobileNetV2 recipe: 150 epochs, SGD (momentum 0.9) lr 0.05 for
# batch 256, wd 4e-5, cosine LR evaluated once per epoch, dropout 0.2.
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='DynamicMobileNetV2',
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625)),
    head=dict(type='DropoutLinearClsHead', dropout=0.2))

optim_wrapper = dict(optimizer=dict(lr=0.05, weight_decay=4e-5))
param_scheduler = dict(
    _delete_=True,
    type='CosineAnnealingLR',
    T_max=150,
    eta_min=0.,
    by_epoch=True,
    begin=0,
    end=150)
# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=150,
    val_interval=1)

custom_hooks = [dict(type='DynamicTemperatureHook')]
