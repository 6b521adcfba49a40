#!/usr/bin/env python
"""The project's module-to-module imports, and the rules the layout keeps.

    python scripts/import_graph.py            # every edge, grouped by importing module; exit 1 on a violation

Read from the source with `ast` (nothing is imported or run). Modules are the root's .py files (the original's
files and the entry points), the packages (distil/, distil/distributed/, tasks/, bench/, demo/), scripts/*.py,
experiments/*.py and, listed apart, tests/*.py. The rules:
    1. no circle among the project's modules;
    2. no import of a command (scripts/*, experiments/*) from anywhere but a test, which may load one by path
       to call its main() in-process (those show as `tests/x -> scripts/y (by path)`);
    3. imports point down the layers (LAYERS): commands -> entry points -> tasks/bench/demo -> the loop
       (distiller.py) -> the library (distil) -> the original's base modules (utils, the dataset, the sampler).
       A module may import its own layer (tasks.training imports tasks.models; demo reads tasks.glue).
"""
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("distil", "distil/distributed", "tasks", "bench", "demo")
COMMAND_FOLDERS = ("scripts", "experiments")
# The layer of each module (higher imports lower); a package's modules share its layer.
BASE = ("utils", "lm_seqs_dataset", "grouped_batch_sampler")
ENTRY_POINTS = ("train", "run_squad_w_distillation", "run_glue_w_distillation", "run_ner_w_distillation")
LAYER_NAMES = ["base modules", "library (distil)", "loop (distiller)", "tasks/bench/demo", "entry points",
               "commands"]


def layer(module):
    """The layer of a module (index into LAYER_NAMES), or None for tests and anything unknown."""
    top = module.split("/")[0]
    if top in COMMAND_FOLDERS:
        return 5
    if top == "tests":
        return None
    if module in ENTRY_POINTS:
        return 4
    if top in ("tasks", "bench", "demo"):
        return 3
    if module == "distiller":
        return 2
    if top == "distil":
        return 1
    if module in BASE:
        return 0
    return None


def project_modules(root=REPO):
    """{module name: path} for the root, the packages, the command folders and tests/ (names as `distil/losses`,
    `scripts/demo`, `tests/conftest`; a package's __init__ is left out: it only documents the package)."""
    out = {}
    for folder in ("",) + PACKAGES + COMMAND_FOLDERS + ("tests",):
        directory = os.path.join(root, folder)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            if name.endswith(".py") and name != "__init__.py":
                out[os.path.join(folder, name[:-3]) if folder else name[:-3]] = os.path.join(directory, name)
    return out


def imported_names(path):
    """Names a file imports (`import a.b` gives `a/b`; `from a.b import c` gives `a/b` and `a/b/c`, for when c
    is a module), and commands it loads by path with a `load_script("name")` call (the tests' helper: a bare
    name is in scripts/, others name their folder)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names, by_path = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.name.replace(".", "/"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            base = node.module.replace(".", "/")
            names.add(base)
            names.update(f"{base}/{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_script" and node.args
              and isinstance(node.args[0], ast.Constant)):
            name = node.args[0].value
            by_path.add(name if "/" in name else "scripts/" + name)
    return names, by_path


def graph(root=REPO):
    """{module: [(imported project module, how)]}, how being 'import' or 'by path'."""
    modules = project_modules(root)
    packages = {p for p in PACKAGES if os.path.isdir(os.path.join(root, p))}
    edges = {}
    for module, path in modules.items():
        names, by_path = imported_names(path)
        folder = os.path.dirname(module)
        targets = set()
        for name in sorted(names):
            if name in packages:  # `from distil import losses` also names distil/losses, which is the module
                continue
            # `import x` finds the root or a package's module, or a sibling in a command folder or tests/ (a
            # script's own folder is on its sys.path), or a command when some sys.path edit put its folder there
            sibling = os.path.join(folder, name) if folder in COMMAND_FOLDERS + ("tests",) else None
            for candidate in (name, sibling) + tuple(os.path.join(f, name) for f in COMMAND_FOLDERS):
                if candidate in modules and candidate != module:
                    targets.add((candidate, "import"))
                    break
        targets.update((name, "by path") for name in by_path if name in modules)
        edges[module] = sorted(targets)
    return edges


def find_cycle(edges):
    """One import circle among non-test modules, as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target, _ in edges.get(node, ()):
            if target.startswith("tests/"):
                continue
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target, stack)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in edges:
        if not node.startswith("tests/") and node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def violations(edges):
    """The broken rules of an import graph, as sentences."""
    found = [f"{module} imports the script {target}" for module, targets in sorted(edges.items())
             for target, _ in targets if target.split("/")[0] in COMMAND_FOLDERS and not module.startswith("tests/")]
    for module, targets in sorted(edges.items()):
        here = layer(module)
        for target, how in targets:
            there = layer(target)
            if here is None or there is None or how != "import" or there <= here:
                continue
            found.append(f"{module} ({LAYER_NAMES[here]}) imports {target} ({LAYER_NAMES[there]}): "
                         "an import that points up the layers")
    cycle = find_cycle(edges)
    if cycle:
        found.append("import circle: " + " -> ".join(cycle))
    return found


def main(root=REPO):
    edges = graph(root)
    for module in sorted(edges, key=lambda m: (m.startswith("tests/"), m.split("/")[0] in COMMAND_FOLDERS, m)):
        targets = edges[module]
        print(f"{module:<32} -> " + (", ".join(t + (" (by path)" if how == "by path" else "") for t, how in targets)
                                      if targets else "(none)"))
    print()
    broken = violations(edges)
    if broken:
        print("\n".join(f"VIOLATION: {v}" for v in broken))
        return 1
    print("no circle; no project module imports a command; every import points down the layers ("
          + " -> ".join(reversed(LAYER_NAMES)) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
