# Copyright (c) mmdyn contributors. All rights reserved.
"""The CUDA modes of the DDF benchmark and of the model benchmark tool:
without a GPU they stop with one clear line; the DDF benchmark rewrites
only its own section of its output file."""
import os.path as osp

import pytest
import torch
from script_loading import load_script

from mmdyn.analysis.benchmark import benchmark_configs, check_device

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)


def test_ddf_benchmark_cuda_mode_needs_a_gpu(no_gpu, tmp_path):
    bench = load_script('benchmarks/ddf.py')
    out = tmp_path / 'ddf.md'
    with pytest.raises(SystemExit, match='--device cuda: no CUDA GPU'):
        bench.main(['--device', 'cuda', '--out', str(out)])
    assert not out.exists()


def test_model_benchmark_cuda_mode_needs_a_gpu(no_gpu):
    tool = load_script('tools/analysis_tools/benchmark.py')
    config = osp.join(ROOT, 'configs/ddf/faster-rcnn_r50_fpn-ddfup_1x_coco.py')
    with pytest.raises(SystemExit, match="--device: device 'cuda': no CUDA"):
        tool.main([
            config, '--compare',
            'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '--mode',
            'train', '--device', 'cuda'
        ])
    with pytest.raises(RuntimeError, match="device 'cuda:1': no CUDA GPU"):
        benchmark_configs([config], device='cuda:1')
    check_device('cpu')


def test_each_mode_rewrites_only_its_section(tmp_path):
    bench = load_script('benchmarks/ddf.py')
    path = str(tmp_path / 'ddf.md')
    bench.write_section(path, 'DDF on CPU', 'cpu table\n\ncpu notes')
    bench.write_section(path, 'DDF on CUDA', 'pending')
    bench.write_section(path, 'DDF on CPU', 'new cpu table')
    with open(path) as f:
        assert f.read() == ('## DDF on CPU\n\nnew cpu table\n\n'
                            '## DDF on CUDA\n\npending\n')
    bench.write_section(path, 'DDF on CUDA', 'numbers')
    with open(path) as f:
        assert f.read() == ('## DDF on CPU\n\nnew cpu table\n\n'
                            '## DDF on CUDA\n\nnumbers\n')
