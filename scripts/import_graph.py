#!/usr/bin/env python
"""The project's module-to-module imports, and the two rules the layout keeps.

    python scripts/import_graph.py            # every edge, grouped by importing module; exit 1 on a violation

Read from the source with `ast` (nothing is imported or run). Modules are the top-level .py files (the
library and the entry points), scripts/*.py and, listed apart, tests/*.py. The rules:
    1. no circle among the library modules and scripts;
    2. no import of a script (scripts/*) from anywhere but a test, which may load one by path to call its
       main() in-process (those show as `tests/x -> scripts/y (by path)`).
"""
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_modules(root=REPO):
    """{module name: path} for the top level, scripts/ and tests/ (names as `scripts/demo`, `tests/conftest`)."""
    out = {}
    for folder in ("", "scripts", "tests"):
        directory = os.path.join(root, folder)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            if name.endswith(".py"):
                out[os.path.join(folder, name[:-3]) if folder else name[:-3]] = os.path.join(directory, name)
    return out


def imported_names(path):
    """Top-level names a file imports (`import a.b` and `from a.b import c` give `a` and `a/b`), and scripts it
    loads by path with a `load_script("name")` call (the tests' helper)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names, by_path = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.name.replace(".", "/"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.replace(".", "/"))
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "load_script" and node.args
              and isinstance(node.args[0], ast.Constant)):
            by_path.add("scripts/" + node.args[0].value)
    return names, by_path


def graph(root=REPO):
    """{module: [(imported project module, how)]}, how being 'import' or 'by path'."""
    modules = project_modules(root)
    edges = {}
    for module, path in modules.items():
        names, by_path = imported_names(path)
        folder = os.path.dirname(module)
        targets = []
        for name in sorted(names):
            # `import x` finds the top level, or a sibling in scripts/ or tests/, or a script when some sys.path
            # edit put scripts/ on the path
            for candidate in (name, os.path.join(folder, name) if folder else None, "scripts/" + name):
                if candidate in modules and candidate != module:
                    targets.append((candidate, "import"))
                    break
        targets += [(name, "by path") for name in sorted(by_path) if name in modules]
        edges[module] = targets
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
             for target, _ in targets if target.startswith("scripts/") and not module.startswith("tests/")]
    cycle = find_cycle(edges)
    if cycle:
        found.append("import circle: " + " -> ".join(cycle))
    return found


def main(root=REPO):
    edges = graph(root)
    for module in sorted(edges, key=lambda m: (m.startswith("tests/"), m.startswith("scripts/"), m)):
        targets = edges[module]
        print(f"{module:<28} -> " + (", ".join(t + (" (by path)" if how == "by path" else "") for t, how in targets)
                                      if targets else "(none)"))
    print()
    broken = violations(edges)
    if broken:
        print("\n".join(f"VIOLATION: {v}" for v in broken))
        return 1
    print("no circle; no project module imports a script (tests load scripts by path only to test them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
