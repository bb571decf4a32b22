# KW-MobileNetV2 x0.5, kw1x: 2,854,522 parameters. The paper's x0.5 kw1x JSON
# sets no label smoothing.
_base_ = './mobilenet-v2-kw1x_8xb32_in1k.py'

model = dict(
    backbone=dict(widen_factor=0.5),
    head=dict(
        loss=dict(_delete_=True, type='CrossEntropyLoss', loss_weight=1.0)))
