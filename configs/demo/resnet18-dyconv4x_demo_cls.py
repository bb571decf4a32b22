# ResNet-18 + DyConv (K=4; block convs and shortcuts dynamic) on the
# synthetic demo classification data, same schedule as resnet18_demo_cls.py;
# temperature 30 -> 1 over the first epoch.
_base_ = './resnet18_demo_cls.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='DynamicResNet',
        dyconv_cfg=dict(type='DyConv2d', kernel_num=4, ratio=0.25),
        dyconv_downsample=True))

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=1)]
