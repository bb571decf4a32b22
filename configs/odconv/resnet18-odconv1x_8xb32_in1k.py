# ResNet-18 + ODConv (1x, r=1/16): every BasicBlock conv is an ODConv2d; the
# stem, shortcuts and classifier stay static. The official ResNet recipe is
# mmpretrain's ResNet recipe (100 epochs, SGD lr 0.1 for batch 256, wd 1e-4 on
# all parameters, x0.1 at epochs 30/60/90), so only the model changes:
# GAP -> Dropout -> Linear head and the temperature annealing (30 -> 1 over
# the first 10 epochs, updated every iteration).
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='DynamicResNet',
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625)),
    # OD_ResNet's own default dropout (the CLI default is 0).
    head=dict(type='DropoutLinearClsHead', dropout=0.1))

custom_hooks = [dict(type='DynamicTemperatureHook')]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=100,
    val_interval=1)
