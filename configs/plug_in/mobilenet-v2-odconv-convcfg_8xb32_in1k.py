# mmpretrain's stock MobileNetV2 with conv_cfg: every conv (stem, expand,
# depthwise, project, final 1x1) becomes ODConv; a depthwise ODConv drops
# its filter attention by itself. The paper's OD-MobileNetV2 (stem static)
# is DynamicMobileNetV2 (configs/odconv/).
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(backbone=dict(conv_cfg=dict(type='ODConv2d', kernel_num=1)))

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume (_delete_:
# mmengine refuses the base's by_epoch=True beside a loop type).
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(
    _delete_=True,
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=300,
    val_interval=1)
