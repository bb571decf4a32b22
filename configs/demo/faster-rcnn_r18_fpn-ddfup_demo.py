# ./faster-rcnn_r18_fpn_demo.py with the DDF-Up FPN (guided DDF-Up in every
# top-down step).
_base_ = './faster-rcnn_r18_fpn_demo.py'

custom_imports = dict(
    imports=['mmdyn.models', 'mmdyn.engine'], allow_failed_imports=False)

model = dict(
    neck=dict(type='DDFUpFPN', upsample_cfg=dict(type='ddf_up', guided=True)))
