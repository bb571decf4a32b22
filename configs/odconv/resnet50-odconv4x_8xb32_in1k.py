# ResNet-50 + ODConv (4x, r=1/16).
_base_ = './resnet50-odconv1x_8xb32_in1k.py'

model = dict(
    backbone=dict(dyconv_cfg=dict(kernel_num=4)), head=dict(dropout=0.2))
