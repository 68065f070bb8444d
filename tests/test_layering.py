"""The layering of design section 3, checked: what each layer may load, and no import cycles.

The solver mathematics knows neither MPI nor TensorFlow; the MPI layer knows no
TensorFlow; TensorFlow code knows no MPI; only the driver sees all.  Each check
imports in a fresh interpreter, so that nothing an earlier test loaded hides a
violation.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mpinewton"


def _loaded_after(imports, watched):
    code = (f"import sys\nimport {', '.join(imports)}\n"
            f"print(sorted(m for m in {watched!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("imports", "forbidden"), [
    (["mpinewton.solvers", "mpinewton.comm", "mpinewton.objective"], ["tensorflow", "keras"]),
    (["mpinewton.solvers"], ["tensorflow", "keras", "mpi4py", "h5py", "scipy"]),
    (["mpinewton.analysis"], ["tensorflow", "keras", "mpi4py", "h5py"]),
    (["mpinewton.solvers", "mpinewton.local", "mpinewton.models"], ["mpi4py"]),
    (["mpinewton.config", "mpinewton.train"], ["tensorflow", "keras", "mpi4py"]),
    (["mpinewton.data", "mpinewton.checkpoint", "mpinewton.durable"],
     ["tensorflow", "keras", "mpi4py", "cv2"]),
])
def test_layer_does_not_load(imports, forbidden):
    assert _loaded_after(imports, forbidden) == []


def test_the_check_sees_a_loaded_module():
    # The check above would pass vacuously if the probe could not see imports.
    assert _loaded_after(["mpinewton.local"], ["tensorflow"]) == ["tensorflow"]


def _module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _top_level_imports(tree):
    """Import statements outside function bodies (``if TYPE_CHECKING:`` blocks included)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def _imports(name, path, modules):
    """Modules of the package that ``name`` imports at module level."""
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _top_level_imports(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            anchor = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
            origin = (f"{anchor}.{node.module}" if node.module else anchor) if node.level \
                else node.module
            # "from pkg import sub" names the submodule, not the package.
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin
                       for a in node.names]
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycle(graph):
    """One import cycle of ``graph`` as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["mpinewton.solvers.newton"] >= {"mpinewton.solvers.cg"}  # the scan sees edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
