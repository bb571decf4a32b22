# Copyright (c) mmdyn contributors. All rights reserved.
"""The import structure of :mod:`mmdyn.ops`: no import cycle, and no ``import``
inside a function (the usual way to hide a cycle), except the lazy imports of
genuinely optional dependencies listed below.

Checked on the source (an AST scan and the module graph it gives) and in a
fresh interpreter (after ``import mmdyn.ops`` every ops module is loaded:
none waits for a function to import it). The math modules
(``mmdyn/ops/*.py``) may import the accelerators (``mmdyn/ops/accel/``);
the accelerators never import a layer module.
"""
import ast
import json
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
OPS = osp.join(ROOT, 'mmdyn', 'ops')

#: Imports allowed inside functions: (file, imported module) -> why.
OPTIONAL_IMPORTS = {
    ('accel/ddf_triton.py', 'triton'):
    'Triton is optional: imported when a Triton path is first asked for',
    ('accel/ddf_triton.py', 'triton.language'):
    'Triton is optional (as above)',
    ('accel/ddf_triton.py', 'torch.library'):
    "torch's Triton wrappers (triton_op, wrap_triton), used only once "
    'Triton imported',
    ('accel/ddf_triton.py', 'torch._subclasses.fake_tensor'):
    'reached only on the Triton path (fake-tensor launches)',
    ('accel/ddf_triton.py', 'torch._subclasses.functional_tensor'):
    'reached only on the Triton path (operators registered with Triton)',
}
#: Modules a plain ``import mmdyn.ops`` does not load: the Triton kernels
#: (they import triton at module level; loaded by ``ddf_triton`` only when
#: Triton is importable).
NOT_LOADED = {'mmdyn.ops.accel.ddf_triton_kernels'}
#: The layer modules, which the accelerators must not import.
LAYER_MODULES = {
    'mmdyn.ops.base', 'mmdyn.ops.dyconv', 'mmdyn.ops.odconv',
    'mmdyn.ops.kernel_warehouse', 'mmdyn.ops.warehouse_manager',
    'mmdyn.ops.ddf', 'mmdyn.ops.families'
}


def _sources():
    for directory, _, files in os.walk(OPS):
        for name in sorted(files):
            if name.endswith('.py'):
                path = osp.join(directory, name)
                yield osp.relpath(path, OPS).replace(os.sep, '/'), path


def _module_name(relpath: str) -> str:
    parts = relpath[:-3].split('/')
    if parts[-1] == '__init__':
        parts = parts[:-1]
    return '.'.join(['mmdyn', 'ops', *parts])


def _is_package(relpath: str) -> bool:
    return relpath.endswith('__init__.py')


def _imported(node, relpath):
    """The absolute names an import statement of ``relpath`` imports: the
    module, and for ``from X import y`` also ``X.y`` (a submodule or not)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = _module_name(relpath).split('.')
    if not _is_package(relpath):
        package = package[:-1]
    if node.level:
        base = package[:len(package) - node.level + 1]
        module = '.'.join(base + ([node.module] if node.module else []))
    else:
        module = node.module
    return [module] + [f'{module}.{alias.name}' for alias in node.names]


def test_no_import_inside_a_function():
    found = []
    for relpath, path in _sources():
        with open(path) as f:
            tree = ast.parse(f.read())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    module = _imported(node, relpath)[0]
                    if (relpath, module) not in OPTIONAL_IMPORTS:
                        found.append(f'{relpath}:{node.lineno} {func.name}:'
                                     f' {ast.unparse(node)}')
    assert found == [], 'imports inside functions:\n' + '\n'.join(found)


def _graph():
    """Module-level imports between the ops modules (a module importing its own
    parent package is how Python loads packages, not an edge)."""
    modules = {_module_name(rel): rel for rel, _ in _sources()}
    graph = {name: set() for name in modules}
    for relpath, path in _sources():
        name = _module_name(relpath)
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, relpath):
                if target in modules and target != name and \
                        not name.startswith(target + '.'):
                    graph[name].add(target)
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    graph = _graph()
    assert 'mmdyn.ops.accel.paths' in graph['mmdyn.ops.odconv']
    cycle = _cycle(graph)
    assert cycle is None, ' -> '.join(cycle)


def test_accelerators_do_not_import_layer_modules():
    for name, targets in _graph().items():
        if name.startswith('mmdyn.ops.accel'):
            assert not targets & LAYER_MODULES, (name, targets)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_import_loads_every_ops_module_at_once():
    """In a fresh interpreter, ``import mmdyn.ops`` loads every module of the
    package (nothing waits inside a function to be imported)."""
    expected = sorted(
        _module_name(rel) for rel, _ in _sources()
        if _module_name(rel) not in NOT_LOADED)
    code = ('import json, sys\nimport mmdyn.ops\n'
            'print(json.dumps(sorted(m for m in sys.modules '
            "if m.startswith('mmdyn.ops'))))")
    proc = subprocess.run([sys.executable, '-c', code],
                          cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(set(expected) - set(loaded)) == []
