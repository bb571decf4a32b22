# ResNet-18 + ODConv (4x, r=1/16); dropout 0.2 as in the official README's
# ODConv 4x training command.
_base_ = './resnet18-odconv1x_8xb32_in1k.py'

model = dict(
    backbone=dict(dyconv_cfg=dict(kernel_num=4)), head=dict(dropout=0.2))
