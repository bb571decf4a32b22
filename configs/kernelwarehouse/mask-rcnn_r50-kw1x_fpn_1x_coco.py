# Mask R-CNN 1x + FPN with KW-ResNet-50 (KernelWarehouse 1x), following the
# KW paper's COCO setting: AdamW (lr 1e-4, wd 0.05, no decay on norms), LR
# steps at epochs 8 and 11, the DETR-style multi-scale + crop augmentation,
# norm_eval, frozen stem + stage 1 (DDP without find_unused_parameters:
# every other parameter gets a gradient). The backbone
# starts from an ImageNet checkpoint of ./resnet50-kw1x_8xb128-300e_in1k.py.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(
    imports=['mmpretrain.models', 'mmdyn.models', 'mmdyn.engine'],
    allow_failed_imports=False)

pretrained = 'work_dirs/resnet50-kw1x_8xb128-300e_in1k/epoch_300.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='mmpretrain.KWResNet',
        depth=50,
        kw_cfg=dict(cell_num_ratio=1),
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.')))

# DETR / Sparse R-CNN augmentation: flip, then either a multi-scale resize or
# resize -> random crop -> multi-scale resize.
multi_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333),
                (608, 1333), (640, 1333), (672, 1333), (704, 1333),
                (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[[
            dict(
                type='RandomChoiceResize',
                scales=multi_scales,
                keep_ratio=True)
        ],
                    [
                        dict(
                            type='RandomChoiceResize',
                            scales=[(400, 1333), (500, 1333), (600, 1333)],
                            keep_ratio=True),
                        dict(
                            type='RandomCrop',
                            crop_type='absolute_range',
                            crop_size=(384, 600),
                            allow_negative_crop=True),
                        dict(
                            type='RandomChoiceResize',
                            scales=multi_scales,
                            keep_ratio=True)
                    ]]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

optim_wrapper = dict(
    optimizer=dict(
        _delete_=True,
        type='AdamW',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.05),
    paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)}))

# Fine-tuning keeps the inference temperature tau=0 (the official detection
# backbones set it at init): no annealing.
custom_hooks = [dict(type='DynamicTemperatureHook', start=0.0, end=0.0)]

# mmdyn.engine: atomic hashed checkpoints, exact mid-epoch resume.
default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))
train_cfg = dict(type='ExactResumeEpochBasedTrainLoop')
