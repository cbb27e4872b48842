"""MSDSegmentLib: the Qt-free MSDSegment engine.

Volume(s) in, an integer label map on exactly the input grid out. Used by the Slicer module
(`MSDSegment.py`), the command line (`python -m MSDSegmentLib`) and `Training/`.
Heavy dependencies (torch, MONAI) are imported lazily so that importing this package is cheap.
"""

__version__ = "0.1.0"


def reload_modules():
    """Re-execute this package's loaded modules (Slicer's Reload), each after the modules it imports at its top
    level: `engine` takes `MSDSegmentError` from `errors`, so `errors` must be reloaded first, or the engine would
    raise a class that the other modules' handlers no longer catch."""
    import importlib
    import sys
    from graphlib import TopologicalSorter

    loaded = {name: module for name, module in sys.modules.items()
              if name.startswith(__name__ + ".") and module is not None}
    graph = {name: top_level_imports(module) & set(loaded) for name, module in loaded.items()}
    for name in TopologicalSorter(graph).static_order():
        importlib.reload(loaded[name])


def top_level_imports(module):
    """The package's modules that `module` imports when it runs (imports inside functions run later)."""
    import ast

    with open(module.__file__, encoding="utf-8") as stream:
        tree = ast.parse(stream.read())
    package = module.__name__.rpartition(".")[0]
    found = set()
    statements = list(tree.body)
    while statements:
        statement = statements.pop()
        if isinstance(statement, (ast.If, ast.Try)):  # `try: import x` still runs at import time
            statements += statement.body + statement.orelse + getattr(statement, "finalbody", [])
            statements += [line for handler in getattr(statement, "handlers", []) for line in handler.body]
        elif isinstance(statement, ast.ImportFrom) and statement.level == 1:
            if statement.module:
                found.add(f"{package}.{statement.module}")
            else:
                found.update(f"{package}.{alias.name}" for alias in statement.names)
        elif isinstance(statement, ast.Import):
            found.update(alias.name for alias in statement.names if alias.name.startswith(package + "."))
    return found
