# Comparison point for ./faster-rcnn_r50_fpn-ddfup_1x_coco.py: mmdet's
# CARAFE FPN, unchanged (needs mmcv's CUDA carafe op to run).
_base_ = 'mmdet::carafe/faster-rcnn_r50_fpn-carafe_1x_coco.py'

custom_imports = dict(imports=['mmdyn.engine'], allow_failed_imports=False)

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
