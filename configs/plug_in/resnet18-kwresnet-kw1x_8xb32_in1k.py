# mmpretrain's stock ResNet-18 classifier with KernelWarehouse (1x,
# warehouses shared within each stage, as the paper): the KWResNet
# backbone.
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(backbone=dict(type='KWResNet', kw_cfg=dict(cell_num_ratio=1)))
custom_hooks = [dict(type='DynamicTemperatureHook')]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=100,
    val_interval=1)
