# mmpretrain's stock ResNet-50 classifier with conv_cfg: every conv (stem,
# block 1x1s and 3x3s, shortcuts) becomes ODConv. mmpretrain's ResNet has
# no dcn= slot; the paper's OD-ResNet (block convs only) is DynamicResNet,
# see ./resnet50-dynamicresnet-odconv4x_8xb32_in1k.py.
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='ODConv2d', kernel_num=1)))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=100,
    val_interval=1)
