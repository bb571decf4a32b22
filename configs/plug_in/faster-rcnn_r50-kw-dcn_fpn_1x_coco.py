# Stock ResNet's dcn= slot: KernelWarehouse as the Bottleneck 3x3 conv in
# stages 2-4. Each KWConv2d built there has a private warehouse (its own
# cells, nothing shared between layers); the paper's warehouses shared
# across a stage are mmpretrain.KWResNet (configs/kernelwarehouse/).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        dcn=dict(type='KWConv2d', cell_num_ratio=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
# KernelWarehouse's temperature: 1 -> 0 over the first 20 epochs.
custom_hooks = [dict(type='DynamicTemperatureHook')]

# Stock ImageNet weights: the new KernelWarehouse layers start from their init.
allow_partial_load = 'static_weights'

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
