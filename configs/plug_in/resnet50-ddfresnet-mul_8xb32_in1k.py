# mmpretrain's stock ResNet-50 classifier with the DDF-ResNet backbone
# (DDF modules in place of every Bottleneck 3x3 conv, as the DDF paper).
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(backbone=dict(type='DDFResNet', combine='mul'))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=100,
    val_interval=1)
