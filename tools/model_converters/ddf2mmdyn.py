"""Convert an official theFoxofSky/ddfnet DDF-ResNet checkpoint to mmdyn.

ddf_{mul,add}_resnet50/101: mul and add have the same weights, so pass
--config (e.g. configs/ddf/resnet50-ddf-add_8xb128-130e_in1k.py).

    python tools/model_converters/ddf2mmdyn.py IN OUT [--config CONFIG]

The keys are renamed to mmdyn's ImageClassifier layout (backbone.*,
head.fc.*) and checked against the model of CONFIG (default: the one mmdyn
config the checkpoint fits exactly); unknown keys, missing keys and shape
mismatches are refused with a list of them. OUT is an mmengine checkpoint
(load it with ``load_from`` or ``init_cfg=dict(type='Pretrained')``).
"""
from mmdyn.analysis.converters import converter_cli

if __name__ == '__main__':
    converter_cli('ddf', __doc__.splitlines()[0])
