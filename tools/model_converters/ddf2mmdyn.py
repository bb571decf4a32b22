# Copyright (c) mmdyn contributors. All rights reserved.
"""Convert an official theFoxofSky/ddfnet DDF-ResNet checkpoint to mmdyn.

ddf_{mul,add}_resnet50/101, as timm's ``train.py`` saves them
(``state_dict``, ``state_dict_ema``, ``args``, ``arch``, ...) or as a
plain state dict. mul and add have the same weights, so --config is
required; without it the refusal lists the candidate configs with the
command for each (and the one the file's recorded model name points to).

    python tools/model_converters/ddf2mmdyn.py IN OUT --config CONFIG
        [--weights {auto,model,ema}] [--verify] [--trust-checkpoint]

The keys are renamed to mmdyn's ImageClassifier layout (backbone.*,
head.fc.*) and checked against the model of CONFIG; a mismatch is refused
naming the first mismatching key with both shapes, and nothing is written.
``--verify`` prints the top-5 logits and checksums of a fixed input
(README.md, "Model zoo").
"""
from mmdyn.analysis.converter_args import converter_parser

if __name__ == '__main__':
    # --help and usage errors answer before torch and mmengine are imported
    converter_parser(__doc__.splitlines()[0]).parse_args()
    import mmdyn.compat
    from mmdyn.analysis.converters import converter_cli
    mmdyn.compat.apply()  # see docs/compat.md
    converter_cli('ddf', __doc__.splitlines()[0])
