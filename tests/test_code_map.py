"""The map a newcomer draws must match the files: every name is imported from the module that
defines it, and train.py's helpers follow in the order its story uses them."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {path.stem: path for path in ROOT.glob("*.py")}


def top_level_names(tree):
    """-> (names a module defines: functions, classes, assignments; names it imports)."""
    defined, imported = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {alias.asname or alias.name for alias in node.names}
    return defined, imported


def test_every_name_is_imported_from_the_module_that_defines_it():
    defines = {name: top_level_names(ast.parse(path.read_text(encoding="utf-8")))[0]
               for name, path in MODULES.items()}
    files = [*MODULES.values(), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")]
    wrong = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in defines:
                wrong += [f"{path.relative_to(ROOT)}: from {node.module} import {alias.name}"
                          for alias in node.names if alias.name not in defines[node.module]]
    assert not wrong, "imported from a module that only imports it:\n" + "\n".join(wrong)
