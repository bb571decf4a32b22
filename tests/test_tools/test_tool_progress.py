# Copyright (c) mmdyn contributors. All rights reserved.
"""The tools log their progress through mmengine's MMLogger (as mmdet's tools
do) and print their results."""
import logging
import os.path as osp

import pytest
import torch
from test_flops import load_tool

from mmdyn.analysis.progress import TOOL_LOGGER, tool_logger

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.fixture
def logged():
    """The messages of the tools' logger during the test."""
    messages = []

    class Recorder(logging.Handler):

        def emit(self, record):
            messages.append(record.getMessage())

    logger = tool_logger()
    handler = Recorder(level=logging.INFO)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_tool_logger_is_an_mmlogger_at_info(capsys):
    from mmengine.logging import MMLogger
    logger = tool_logger()
    assert isinstance(logger, MMLogger) and logger.instance_name == TOOL_LOGGER
    assert logger.isEnabledFor(logging.INFO)
    # the console handler follows the current sys.stdout
    logger.info('hello from the tools')
    assert 'hello from the tools' in capsys.readouterr().out


def test_get_flops_logs_one_line_per_config(tmp_path, capsys, logged):
    configs = []
    for name in ('a', 'b'):
        cfg = tmp_path / f'{name}.py'
        cfg.write_text(
            "_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'\n")
        configs.append(str(cfg))
    load_tool('tools/analysis_tools/get_flops.py').main(
        configs + ['--shape', '32', '--markdown'])
    assert logged == [
        f'[1/2] counting {configs[0]}', f'[2/2] counting {configs[1]}'
    ]
    out = capsys.readouterr().out
    assert '| a |' in out and '| b |' in out


def test_converter_logs_progress_and_prints_the_verification(
        tmp_path, capsys, logged):
    from mmdyn.analysis.converters import converter_cli
    config = osp.join(ROOT, 'configs/odconv/resnet18-odconv1x_8xb32_in1k.py')
    # a checkpoint in the official layout, from the converter tests
    from test_converters import od_layer, plain_conv, resnet_official

    def od(prefix, name, ci, co, k, s, d):
        if name.startswith('downsample'):
            return plain_conv(prefix, name, ci, co, k, s, d)
        od_layer(prefix + name + '.', ci, co, k, 1, 1, d)

    src, dst = tmp_path / 'od.pth', tmp_path / 'out.pth'
    torch.save({'state_dict': resnet_official(18, od)}, src)
    converter_cli('odconv', 'test',
                  [str(src),
                   str(dst), '--config', config, '--verify'])
    assert logged[0].startswith(f'read {src}')
    assert logged[-1].startswith('converted ') and logged[-1].endswith(
        str(dst))
    # the logits are the result: printed, not logged
    assert 'top-5 logits' in capsys.readouterr().out
    assert not any('top-5' in message for message in logged)
