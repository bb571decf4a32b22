# ResNet-18 + ODConv (1x, r=1/16) on the synthetic demo classification data,
# with exactly the schedule of resnet18_demo_cls.py (the static baseline).
# The temperature anneals 30 -> 1 over the first epoch: the ImageNet recipe
# anneals over the first 10 % of training (10 of 100 epochs).
_base_ = './resnet18_demo_cls.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='DynamicResNet',
        dyconv_cfg=dict(type='ODConv2d', kernel_num=1, reduction=0.0625)),
    head=dict(type='DropoutLinearClsHead', dropout=0.1))

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=1)]
