# ResNet-18 + DyConv (K=4; block convs and shortcuts dynamic) on the
# synthetic demo classification data, same schedule as resnet18_demo_cls.py;
# temperature 30 -> 1 over the first 10 of the 30 epochs. (Annealed over one
# epoch, as the ODConv demo, training stalled at chance: at T = 1 the
# routing gradients of a from-scratch DyConv are 20-50x the static ones
# (ResNet-18 stem grad norm 54-114 vs ~2), at T = 30 they are not.)
_base_ = './resnet18_demo_cls.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='DynamicResNet',
        dyconv_cfg=dict(type='DyConv2d', kernel_num=4, ratio=0.25),
        dyconv_downsample=True))

custom_hooks = [dict(type='DynamicTemperatureHook', epochs=10)]
