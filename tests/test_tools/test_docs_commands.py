# Copyright (c) mmdyn contributors. All rights reserved.
"""The commands the README and docs show parse with the tools' own argument
parsers (a renamed or missing flag fails here), and a few statements of the
README that readers act on match the code."""
import fnmatch
import glob
import os.path as osp
import shlex

import pytest
from script_loading import load_script as load_tool

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DOCS = [osp.join(REPO, 'README.md'),
        osp.join(REPO, 'configs/demo/README.md')] + sorted(
            glob.glob(osp.join(REPO, 'docs', '*.md')))
# tools whose parse_args(argv) the commands are checked with
TOOLS = ('tools/train.py', 'tools/test.py',
         'tools/analysis_tools/get_flops.py',
         'tools/analysis_tools/benchmark.py',
         'tools/deployment/pytorch2onnx.py')


def shown_commands(path):
    """``python tools/...`` command lines of a markdown file's code blocks,
    continuation lines joined, comments dropped."""
    blocks, language, lines = [], None, []
    with open(path) as f:
        for line in f:
            if line.startswith('```'):
                if language is None:
                    language, lines = line[3:].strip(), []
                else:
                    if language in ('bash', 'shell', 'sh', ''):
                        blocks.append(''.join(lines))
                    language = None
            elif language is not None:
                lines.append(line)
    commands = []
    for block in blocks:
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split(' #')[0].strip()
            if line.startswith('python tools/'):
                commands.append(line)
    return commands


COMMANDS = [(osp.relpath(doc, REPO), cmd) for doc in DOCS
            for cmd in shown_commands(doc) if shlex.split(cmd)[1] in TOOLS]


def test_docs_show_tool_commands():
    assert len(COMMANDS) >= 10
    assert {shlex.split(c)[1] for _, c in COMMANDS} == set(TOOLS)


@pytest.mark.parametrize(
    'doc,command', COMMANDS, ids=[f'{d}:{c[:60]}' for d, c in COMMANDS])
def test_shown_command_parses(doc, command):
    argv = shlex.split(command)
    tool = load_tool(argv[1])
    try:
        tool.parse_args(argv[2:])
    except SystemExit as err:
        pytest.fail(f'{doc}: `{command}` does not parse ({err})')


def test_readme_flops_and_benchmark_commands_say_what_they_print():
    readme = [c for d, c in COMMANDS if d == 'README.md']
    flops = [c for c in readme if 'get_flops.py' in c]
    # "lists every layer" needs --per-layer
    assert flops and all('--per-layer' in c for c in flops)
    # the ratio column is time / the first config's time: the speed table's
    # ratios (dynamic / ResNet-50) come from the baseline listed first
    bench = [shlex.split(c) for c in readme if 'benchmark.py' in c]
    assert bench and all(argv[2].startswith('mmpretrain::resnet/')
                         for argv in bench)


def test_prediction_pickles_are_git_ignored():
    with open(osp.join(REPO, '.gitignore')) as f:
        patterns = [
            line.strip() for line in f
            if line.strip() and not line.startswith('#')
        ]
    for name in ('preds.pkl', 'work_dirs/x/results.pkl'):
        assert any(fnmatch.fnmatch(osp.basename(name), p) for p in patterns), \
            name
