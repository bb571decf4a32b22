# Copyright (c) mmdyn contributors. All rights reserved.
"""The model-zoo pages of the docs, generated from the model index.

``write_pages(root, out_dir)`` reads ``model-index.yml`` and the metafiles it
imports and writes one Markdown page per collection (method) plus nothing
else: the tables (params, MAdds, official results, config, official
checkpoint) come from the metafiles, and the convert command of each
checkpoint from the table of the method's model-zoo README
(``configs/<method>/README.md``), so the site and the READMEs cannot
disagree. Called by ``docs/conf.py`` at build time.
"""
import os
import os.path as osp
import re
from typing import Dict, List

import yaml

CONVERT_RE = re.compile(r'`(python tools/model_converters/\S+\.py [^`]+)`')


def load_index(root: str) -> List[dict]:
    """The metafiles named by ``root/model-index.yml``, parsed."""
    with open(osp.join(root, 'model-index.yml')) as f:
        imports = yaml.safe_load(f)['Import']
    metas = []
    for path in imports:
        with open(osp.join(root, path)) as f:
            meta = yaml.safe_load(f)
        meta['_path'] = path
        metas.append(meta)
    return metas


def convert_commands(readme: str) -> Dict[str, str]:
    """``{config basename: convert command}`` from a model-zoo README: the
    converter commands it shows, keyed by the config each passes with
    ``--config`` (or, without one, by the output file's stem)."""
    commands = {}
    with open(readme) as f:
        for line in f:
            for command in CONVERT_RE.findall(line):
                argv = command.split()
                if '--config' in argv:
                    config = argv[argv.index('--config') + 1]
                    commands.setdefault(osp.basename(config), command)
                else:
                    stem = osp.splitext(osp.basename(argv[3]))[0]
                    commands.setdefault(stem + '.py', command)
    return commands


def _number(value, scale: float, digits: int) -> str:
    return '-' if value is None else f'{value / scale:.{digits}f}'


def _table(models: List[dict], commands: Dict[str, str]) -> List[str]:
    """The Markdown table of some models of one metafile."""
    metrics: List[str] = []
    for model in models:
        for result in model.get('Results', []):
            for name in result['Metrics']:
                if name not in metrics:
                    metrics.append(name)
    header = ['Model', 'Params (M)', 'MAdds (G)'
              ] + metrics + ['Config', 'Official checkpoint']
    lines = [
        '| ' + ' | '.join(header) + ' |',
        '|' + '|'.join([':---'] + ['---:'] *
                       (2 + len(metrics)) + [':---', ':---:']) + '|'
    ]
    for model in models:
        values = {}
        for result in model.get('Results', []):
            values.update(result['Metrics'])
        weights = (model.get('Converted From') or {}).get('Weights')
        cells = [
            model['Name'],
            _number(model['Metadata'].get('Parameters'), 1e6, 2),
            _number(model['Metadata'].get('FLOPs'), 1e9, 3),
        ] + [str(values.get(m, '-')) for m in metrics] + [
            f'`{model["Config"]}`',
            f'[download]({weights})' if weights else '-'
        ]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def collection_page(root: str, meta: dict) -> str:
    """The Markdown page of one metafile."""
    [collection] = meta['Collections']
    commands = convert_commands(osp.join(root, collection['README']))
    lines = [
        f'# {collection["Name"]}', '',
        f'[{collection["Paper"]["Title"]}]({collection["Paper"]["URL"]})', '',
        'Generated from `' + meta['_path'] + '` (the model index that '
        '`mim` reads) and the convert commands of `' + collection['README'] +
        '`. No model was trained for mmdyn: the results are the official '
        "code's for the official checkpoints. To use one, download the "
        'official checkpoint (link in the table), convert it with the '
        'command given below, then pass the converted file to '
        '`tools/test.py` or `init_cfg` with the config of its row. MAdds: one '
        '224x224 image for classifiers; detectors at 800x1333 with their RoI '
        'heads on a fixed number of proposals (see `docs/flops.md`).'
    ]
    groups: Dict[str, List[dict]] = {}
    for model in meta['Models']:
        data = model['Metadata'].get('Training Data', 'other')
        groups.setdefault(data, []).append(model)
    for data, models in groups.items():
        lines += ['', f'## {data}', ''] + _table(models, commands)
    converted = [(m, commands[osp.basename(m['Config'])])
                 for m in meta['Models']
                 if osp.basename(m['Config']) in commands]
    if converted:
        lines += ['', '## Convert the official checkpoints', '']
        for model, command in converted:
            weights = (model.get('Converted From') or {}).get('Weights')
            source = (f'[official checkpoint]({weights})' if weights else
                      'no published checkpoint: one trained with the '
                      'official code')
            lines += [
                f'{model["Name"]} ({source}):', '', '```bash', command, '```',
                ''
            ]
    return '\n'.join(lines).rstrip() + '\n'


def page_name(meta: dict) -> str:
    return osp.basename(osp.dirname(meta['_path']))


def write_pages(root: str, out_dir: str) -> List[str]:
    """Write one page per metafile into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for meta in load_index(root):
        path = osp.join(out_dir, page_name(meta) + '.md')
        text = collection_page(root, meta)
        old = None
        if osp.isfile(path):
            with open(path) as f:
                old = f.read()
        if old != text:  # unchanged pages keep their time stamp
            with open(path, 'w') as f:
                f.write(text)
        paths.append(path)
    return paths
