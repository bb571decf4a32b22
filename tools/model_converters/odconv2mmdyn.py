"""Convert an official OSVAI/ODConv checkpoint to mmdyn.

od_resnet18/50/101 and od_mobilenetv2_050/075/100, any kernel number.

    python tools/model_converters/odconv2mmdyn.py IN OUT [--config CONFIG]

The keys are renamed to mmdyn's ImageClassifier layout (backbone.*,
head.fc.*) and checked against the model of CONFIG (default: the one mmdyn
config the checkpoint fits exactly); unknown keys, missing keys and shape
mismatches are refused with a list of them. OUT is an mmengine checkpoint
(load it with ``load_from`` or ``init_cfg=dict(type='Pretrained')``).
"""
from mmdyn.analysis.converters import converter_cli

if __name__ == '__main__':
    converter_cli('odconv', __doc__.splitlines()[0])
