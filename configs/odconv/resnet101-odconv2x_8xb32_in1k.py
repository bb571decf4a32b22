# ResNet-101 + ODConv (2x, r=1/16). The official README gives no dropout for
# this model; 0.2 is the value of its multi-kernel example.
_base_ = './resnet101-odconv1x_8xb32_in1k.py'

model = dict(
    backbone=dict(dyconv_cfg=dict(kernel_num=2)), head=dict(dropout=0.2))
