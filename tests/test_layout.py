"""Which module imports which: ``import rowcol`` is the library alone; imports only run downwards."""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'rowcol'
# The library is every module outside rowcol/apps (layers, models, halve, counting, errors, detection);
# the apps (training, evaluation, data, files, the command line) live in rowcol/apps, built on it.
APPS = 'rowcol.apps'

_PROBE = r'''
import importlib.abc, json, sys, traceback
WATCHED = ('tqdm', 'matplotlib', 'onnx')
importers = {}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED and name not in importers:  # the file whose import statement asked for it
            frames = [f.filename for f in traceback.extract_stack() if '<frozen' not in f.filename]
            importers[name] = frames[-2]
        return None

sys.meta_path.insert(0, Watch())
import rowcol
print(json.dumps({'importers': importers, 'loaded': sorted(m for m in sys.modules if m in WATCHED),
                  'rowcol': sorted(m for m in sys.modules if m.split('.')[0] == 'rowcol')}))
'''


def test_import_rowcol_loads_the_library_and_no_app_dependency():
    """No matplotlib, onnx or tqdm from ``import rowcol``: torch itself imports tqdm (torch.hub),
    so for tqdm the test checks that no rowcol file asked for it."""
    out = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert 'matplotlib' not in res['loaded'] and 'onnx' not in res['loaded']
    assert not [f'{name} from {file}' for name, file in res['importers'].items()
                if Path(file).resolve().is_relative_to(PACKAGE)]
    apps = [m for m in res['rowcol'] if not _in_library(m)]
    assert not apps, f'import rowcol loads app modules: {apps}'
    assert {'rowcol.layers', 'rowcol.halve', 'rowcol.models', 'rowcol.stats'} <= set(res['rowcol'])


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path) -> set[str]:
    """The rowcol modules ``path`` imports anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split('.')[0] == 'rowcol'}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'rowcol':
            subs = {f'{node.module}.{a.name}' for a in node.names}
            found |= {m for m in subs if (PACKAGE.parent / (m.replace('.', '/') + '.py')).exists()
                      or (PACKAGE.parent / m.replace('.', '/')).is_dir()} or {node.module}
    return found


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) - {_module(p)} for p in sorted(PACKAGE.rglob('*.py'))}


def _in_library(module: str) -> bool:
    return module != 'rowcol.__main__' and module != APPS and not module.startswith(APPS + '.')


def test_library_modules_import_no_app_module():
    graph = _graph()
    wrong = {m: sorted(i for i in deps if not _in_library(i)) for m, deps in graph.items() if _in_library(m)}
    assert not {m: d for m, d in wrong.items() if d}


def test_imports_run_one_way():
    """No cycle among rowcol's modules (lazy imports inside functions count), and the training
    loop is imported only by what runs training: compare and the command line."""
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph.get(m, ())):
            if dep == 'rowcol' or dep not in graph:  # the package itself: the library
                continue
            assert state.get(dep) != 1, f'import cycle: {" -> ".join(path + [dep])}'
            if dep not in state:
                visit(dep, path + [dep])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])
    assert {m for m, deps in graph.items() if 'rowcol.apps.train' in deps} <= {'rowcol.apps.compare', 'rowcol.apps.cli'}


def test_readme_python_runs():
    """The README's Python lines run as written and do what they say."""
    text = (ROOT / 'README.md').read_text()
    code = text.split('```python\n', 1)[1].split('```', 1)[0]
    scope: dict = {}
    exec(compile(code, 'README.md', 'exec'), scope)
    rowcol = scope['rowcol']
    assert rowcol.pe_spec(scope['model'].pretrained_cfg['architecture']) is not None
    assert scope['mine'].halve_report.tied and rowcol.count_params(scope['mine']) < 0.6 * 28_288_354
