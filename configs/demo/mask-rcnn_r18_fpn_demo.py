# Mask R-CNN, ResNet-18 + FPN, trained from scratch on the synthetic demo
# set (boxes + polygon masks) on a CPU. Composed of the same mmdet bases as
# mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py, with the demo data and
# schedule in place of COCO's; narrow neck and heads for speed (as in
# faster-rcnn_r18_fpn_demo.py).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/demo_ins_data.py',
    './_base_/demo_det_schedule.py',
]

# mmdyn's checkpoint hook and training loop (registered by mmdyn.engine).
custom_imports = dict(imports=['mmdyn.engine'], allow_failed_imports=False)

# A checkpoint every epoch (the last one kept), so that
# `tools/train.py CONFIG --resume` continues an interrupted run.
default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(type='AtomicCheckpointHook', interval=1, max_keep_ckpts=1))

neck_channels = 64
model = dict(
    backbone=dict(depth=18, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512], out_channels=neck_channels),
    rpn_head=dict(
        in_channels=neck_channels,
        feat_channels=neck_channels,
        # Objects are 15-60 px at this scale: 16 px anchors at stride 4.
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=neck_channels),
        bbox_head=dict(
            in_channels=neck_channels, fc_out_channels=256, num_classes=3),
        mask_roi_extractor=dict(out_channels=neck_channels),
        mask_head=dict(
            in_channels=neck_channels,
            conv_out_channels=neck_channels,
            num_classes=3)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=500),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=300), rcnn=dict(max_per_img=50)))
