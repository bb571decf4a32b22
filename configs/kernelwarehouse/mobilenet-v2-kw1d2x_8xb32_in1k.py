# KW-MobileNetV2 x1.0, kw1d2x: the paper's hard-wired 1/2x model. Plain 1x1
# convs in KW stages 1-5, reduction 1/32, 9 backbone warehouses plus a KW
# classifier (20 cells of [1000, 32]) in the head; 2,654,396 parameters.
# No label smoothing, classifier dropout 0 (the training script's default).
_base_ = './mobilenet-v2-kw1x_8xb32_in1k.py'

model = dict(
    backbone=dict(_delete_=True, type='KW1d2xMobileNetV2', widen_factor=1.0),
    head=dict(
        _delete_=True,
        type='KWLinearClsHead',
        num_classes=1000,
        in_channels=1280,
        dropout_ratio=0.,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5)))
