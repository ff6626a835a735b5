"""The repository's shape: scripts (files that are run) import only library modules (lib/, model.py,
a data folder's own helpers), never another script, and the import graph of the repository's files
has no cycle. Imports inside functions count too (a deferred import is still an import). In tests/,
no file imports a test module: what several test modules share lives in tests/conftest.py."""
import ast
import glob
import os

from conftest import REPO


def is_script(path):
    """A file that is run: it has an `if __name__ == "__main__":` block."""
    tree = ast.parse(open(path).read())
    return any(isinstance(n, ast.If) and "__name__" in ast.unparse(n.test) for n in tree.body)


def repo_files():
    """Every Python file of the repository but the tests and the benchmarks (which exist
    to call scripts)."""
    files = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "lib", "*.py"))
    return sorted(files + glob.glob(os.path.join(REPO, "data", "*", "*.py")))


def imported_files(path):
    """The repository files `path` imports: top-level modules, lib.X, and siblings in
    its own folder."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for candidate in (os.path.join(REPO, *parts) + ".py",
                              os.path.join(os.path.dirname(path), *parts) + ".py"):
                candidate = os.path.abspath(candidate)
                if os.path.isfile(candidate) and candidate != os.path.abspath(path):
                    found.add(candidate)
    return found


def test_scripts_import_library_modules_only():
    files = repo_files()
    scripts = {f for f in files if is_script(f)}
    assert {os.path.basename(f) for f in scripts} >= {"sft.py", "reward.py", "ppo.py", "sample.py",
                                                      "label.py", "evaluate.py", "export.py",
                                                      "pipeline.py", "prepare.py"}
    lib = os.path.join(REPO, "lib")
    assert not any(f.startswith(lib) for f in scripts), "lib/ holds no scripts"
    wrong = [(os.path.relpath(f, REPO), os.path.relpath(g, REPO))
             for f in files for g in imported_files(f) if g in scripts]
    assert not wrong, f"these files import a script (move what they share into lib/): {wrong}"


def test_import_graph_has_no_cycle():
    graph = {f: imported_files(f) for f in repo_files()}
    state = {}  # file -> "visiting" or "done"

    def visit(f, trail):
        if state.get(f) == "done":
            return
        cycle = " -> ".join(os.path.relpath(g, REPO) for g in trail + [f])
        assert state.get(f) != "visiting", "import cycle: " + cycle
        state[f] = "visiting"
        for g in graph.get(f, ()):
            visit(g, trail + [f])
        state[f] = "done"

    for f in graph:
        visit(f, [])


def test_the_layout_test_sees_a_script_importing_a_script(tmp_path):
    """The checks above can fail: a file importing ppo is reported as importing a script."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    import ppo\n    from reward import preference_loss\n")
    assert imported_files(str(bad)) >= {os.path.join(REPO, "ppo.py"),
                                        os.path.join(REPO, "reward.py")}


def imported_test_modules(path):
    """The test modules (`test_*`) `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module else [a.name for a in node.names]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0].startswith("test_"))
    return found


def test_no_test_module_imports_another_test_module():
    """Shared test set-up lives in tests/conftest.py: no file of tests/ imports a test module."""
    files = sorted(glob.glob(os.path.join(REPO, "tests", "*.py")))
    assert len([f for f in files if os.path.basename(f).startswith("test_")]) >= 15
    wrong = {os.path.basename(f): sorted(imported_test_modules(f)) for f in files}
    wrong = {f: names for f, names in wrong.items() if names}
    assert not wrong, ("these test files import a test module (move what they share into "
                       f"tests/conftest.py): {wrong}")


def test_the_layout_test_sees_a_test_module_importing_a_test_module(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import os\nimport test_ppo as t\n\n\n"
                   "def f():\n"
                   "    from test_reward import write_jsonl\n"
                   "    from conftest import REPO\n")
    assert imported_test_modules(str(bad)) == {"test_ppo", "test_reward"}
