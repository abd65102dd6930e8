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


def story_order(functions, name, order):
    """The module's own functions in the order `name`'s body first calls them, each called
    function's body walked where it is first called (main calls run, run calls its helpers)."""
    calls = [node for node in ast.walk(functions[name])
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    for call in sorted(calls, key=lambda node: (node.lineno, node.col_offset)):
        if call.func.id in functions and call.func.id not in order:
            order.append(call.func.id)
            story_order(functions, call.func.id, order)
    return order


def test_train_py_helpers_follow_in_the_order_the_story_uses_them():
    # train.py's docstring: "run() reads top to bottom ... The helpers follow in the order it
    # uses them." main first, run next, then each helper where main's and run's story reaches it.
    tree = ast.parse(MODULES["train"].read_text(encoding="utf-8"))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    helpers = [name for name in story_order(functions, "main", []) if name != "run"]
    assert list(functions) == ["main", "run", *helpers]
