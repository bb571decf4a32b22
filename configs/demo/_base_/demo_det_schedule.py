# A short CPU schedule for the demo detectors (from scratch: AdamW, which
# converges faster than SGD without pretrained weights).
#
# A schedule base: it defines no hooks, so the runtime's stay: mmdet's
# default_runtime.py saves a checkpoint every epoch, so that
# `tools/train.py CONFIG --resume` continues an interrupted run.
# tools/misc/overlay_config.py --demo puts it in place of a stock
# detector's schedule.

max_epochs = 10
train_cfg = dict(
    type='ExactResumeEpochBasedTrainLoop',
    max_epochs=max_epochs,
    val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[8],
        gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4),
    clip_grad=dict(max_norm=10, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=8)
# Keep CPU runs repeatable.
randomness = dict(seed=0)
