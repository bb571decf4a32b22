# ResNet-18 + KernelWarehouse (1/4x): cells of half the 1x channels (32x32 ..
# 256x256) and a quarter of the mixtures' cell count; 4,031,768 parameters.
# The paper and README publish 4.08M for this model, but their shipped
# setting (cell_num_ratio 1/4, in/out ratios 1/2, r=1/16) gives 4,031,768;
# see README.md. Its JSON turns drop path, mixup and cutmix off.
_base_ = './resnet18-kw1x_8xb128-300e_in1k.py'

model = dict(
    backbone=dict(
        drop_path_rate=0.0,
        kw_cfg=dict(
            cell_num_ratio=1 / 4,
            cell_inplane_ratio=1 / 2,
            cell_outplane_ratio=1 / 2)),
    train_cfg=None)
