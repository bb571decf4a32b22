# ResNet-18 + DyConv (K=4) with the placement of the common unofficial
# implementation (kaijieshi7/Dynamic-convolution-Pytorch, dy_resnet): every
# block conv AND the 1x1 downsample shortcut are DyConv2d, with attention
# width floor(C_in / 4) + 1; the stem and the classifier stay static.
# The unofficial code only ships a CIFAR recipe, so this uses the ImageNet
# ResNet recipe of the DyConv/ODConv papers (mmpretrain's: 100 epochs, SGD lr
# 0.1 for batch 256, wd 1e-4, x0.1 at 30/60/90) and the DyConv paper's
# temperature annealing, 30 -> 1 over the first 10 epochs.
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='DynamicResNet',
        dyconv_cfg=dict(type='DyConv2d', kernel_num=4, ratio=0.25),
        dyconv_downsample=True))

custom_hooks = [dict(type='DynamicTemperatureHook')]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=100,
    val_interval=1)
