"""The package's import graph has no cycle.

The graph is read from the source with ``ast``, so it holds every import that can run: module-level ones and
those inside functions (run on first call). Imports under ``if TYPE_CHECKING:`` never run and do not count.
Each import adds an edge from the importing module to every module whose code it may run:

- ``import a.b.c`` and ``from a.b.c import name``: ``a.b.c``, and the packages ``a`` and ``a.b`` whose
  ``__init__`` runs first, except the importer's own packages (they are initialised before the importer runs);
- ``from a.b import name`` (also ``from . import name``): the package ``a.b`` when ``name`` is defined in its
  ``__init__``; the submodule ``a.b.name`` when ``name`` is one, and then ``a.b`` only if it is not one of the
  importer's own packages (the import system loads a submodule of a package that is still initialising).

The Triton kernels (``kernels/``) are installed as ``promptkit.kernels`` and checked under that name.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# source folders and the package name each is installed as (kernels/: see CMakeLists.txt / pyproject.toml)
SOURCES = {REPO / "promptkit": "promptkit", REPO / "kernels": "promptkit.kernels"}
# compiled modules (no .py source): promptkit._C is built by CMakeLists.txt
EXTENSIONS = frozenset({"promptkit._C"})
# the modules of promptkit.clip in layer order: each imports only those before it (see promptkit/clip/__init__.py)
CLIP_LAYERS = ("promptkit.clip.errors", "promptkit.clip.text", "promptkit.clip.model", "promptkit.clip.prompts")


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``importer`` may run ``target``'s module code.

    ``where`` is ``path:line`` of the statement; ``lazy`` says it sits in a function (runs on its first call).
    """

    importer: str
    target: str
    where: str
    lazy: bool

    def describe(self) -> str:
        """``importer -> target (path:line[, in a function])``."""
        return f"{self.importer} -> {self.target} ({self.where}{', in a function' if self.lazy else ''})"


def module_files(sources: dict[Path, str]) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under each source folder (``__init__.py`` is
    its package's module)."""
    modules = {}
    for folder, prefix in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((prefix, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(nodes: Iterable[ast.AST], lazy: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement among ``nodes`` and inside them that can run, with whether it sits in a function."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.orelse, lazy)
        else:
            inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            yield from _statements(ast.iter_child_nodes(node), inner)


def _own_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _initialised(target: str, importer: str) -> list[str]:
    """``target`` and the packages above it whose ``__init__`` an import of it runs (not the importer's own)."""
    parts = target.split(".")
    chain = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return [name for name in chain
            if name == target or not (importer == name or importer.startswith(name + "."))]


def _absolute(importer: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    """The absolute module a ``from ... import`` names (resolving ``from . import`` / ``from ..x import``)."""
    if node.level == 0:
        return node.module or ""
    package = importer if _own_package(importer, modules) else importer.rpartition(".")[0]
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _in_package(name: str, modules: dict[str, Path]) -> bool:
    return name in modules or name in EXTENSIONS


def imports_of(importer: str, modules: dict[str, Path], root: Path = REPO) -> list[Import]:
    """The edges of ``importer``'s import statements to modules of the package (see the module docstring);
    their ``where`` is relative to ``root``."""
    path = modules[importer]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    edges = []
    for node, lazy in _statements(tree.body):
        where = f"{path.relative_to(root)}:{node.lineno}"
        targets: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _in_package(alias.name, modules):
                    targets += _initialised(alias.name, importer)
        else:
            base = _absolute(importer, node, modules)
            if not _in_package(base, modules):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if _in_package(submodule, modules):
                    targets += _initialised(submodule, importer)
                else:
                    targets += _initialised(base, importer)
        for target in dict.fromkeys(targets):
            if target != importer and target in modules:
                edges.append(Import(importer, target, where, lazy))
    return edges


def import_graph(modules: dict[str, Path], root: Path = REPO) -> dict[str, list[Import]]:
    """Module -> its import edges, for every module in ``modules`` (see :func:`imports_of`)."""
    return {name: imports_of(name, modules, root) for name in modules}


def _components(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                target = step.target
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(graph[target])))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _shortest_cycle(graph: dict[str, list[Import]], component: list[str]) -> list[Import]:
    """A shortest cycle through the first module of ``component``, as its edges."""
    start, members = component[0], set(component)
    came_from: dict[str, Import] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for edge in graph[node]:
            if edge.target == start:
                path = [edge]
                while path[0].importer != start:
                    path.insert(0, came_from[path[0].importer])
                return path
            if edge.target in members and edge.target not in came_from:
                came_from[edge.target] = edge
                queue.append(edge.target)
    raise AssertionError(f"no cycle through {start} in its component")


def import_cycles(graph: dict[str, list[Import]]) -> list[tuple[list[str], list[Import], list[Import]]]:
    """Each group of modules that import each other: ``(modules, a shortest cycle, every import among them)``."""
    result = []
    for component in _components(graph):
        members = set(component)
        inside = [edge for name in component for edge in graph[name] if edge.target in members]
        result.append((component, _shortest_cycle(graph, component), inside))
    return result


def format_cycles(cycles: list[tuple[list[str], list[Import], list[Import]]]) -> str:
    """A readable report of :func:`import_cycles`."""
    lines = []
    for number, (component, cycle, inside) in enumerate(cycles, 1):
        lines.append(f"cycle {number}: {len(component)} modules import each other: {', '.join(component)}")
        lines.append("  shortest: " + " -> ".join([cycle[0].importer] + [edge.target for edge in cycle]))
        lines += [f"    {edge.describe()}" for edge in cycle]
        lines.append("  every import among them:")
        lines += [f"    {edge.describe()}" for edge in inside]
    return "\n".join(lines)


def test_package_has_no_import_cycle() -> None:
    modules = module_files(SOURCES)
    assert "promptkit.clip.model" in modules and "promptkit.kernels" in modules
    cycles = import_cycles(import_graph(modules))
    assert not cycles, "import cycles in the package:\n" + format_cycles(cycles)


def test_clip_modules_import_one_way() -> None:
    modules = module_files(SOURCES)
    assert set(CLIP_LAYERS) == {name for name in modules if name.startswith("promptkit.clip.")}
    graph = import_graph(modules)
    for rank, name in enumerate(CLIP_LAYERS):
        upward = {"promptkit.clip", *CLIP_LAYERS[rank + 1 :]}
        wrong = [edge.describe() for edge in graph[name] if edge.target in upward]
        assert not wrong, f"{name} may import only {', '.join(CLIP_LAYERS[:rank]) or 'no promptkit.clip module'}: " \
            + "; ".join(wrong)


def _package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    """Write a throwaway package ``pkg`` under ``root``; its modules."""
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return module_files({root / "pkg": "pkg"})


def _cycles_of(root: Path, files: dict[str, str]) -> list[list[str]]:
    return [component for component, _, _ in import_cycles(import_graph(_package(root, files), root))]


def test_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    files = {"__init__.py": "", "a.py": "from pkg.b import g\n",
             "b.py": "def g():\n    from . import a\n    return a\n"}
    cycles = import_cycles(import_graph(_package(tmp_path, files), tmp_path))
    assert [component for component, _, _ in cycles] == [["pkg.a", "pkg.b"]]
    report = format_cycles(cycles)
    assert "pkg.a -> pkg.b (pkg/a.py:1)" in report and "pkg.b -> pkg.a (pkg/b.py:2, in a function)" in report


def test_type_checking_imports_do_not_count(tmp_path: Path) -> None:
    files = {"__init__.py": "", "a.py": "from pkg.b import g\n",
             "b.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.a import x\nelse:\n    import os\n"}
    assert _cycles_of(tmp_path, files) == []
    files["b.py"] += "if not typing.TYPE_CHECKING:\n    import pkg.a\n"
    assert _cycles_of(tmp_path / "2", files) == [["pkg.a", "pkg.b"]]


def test_names_from_a_package_count_as_its_init(tmp_path: Path) -> None:
    files = {"__init__.py": "from pkg.sub.c import C\n", "sub/__init__.py": "", "sub/c.py": "from pkg import D\n"}
    assert _cycles_of(tmp_path, files) == [["pkg", "pkg.sub.c"]]
    # a submodule taken from the importer's own package does not run that package's __init__ again
    files["sub/c.py"] = "from pkg import other\nfrom .. import other as again\n"
    files["other.py"] = ""
    assert _cycles_of(tmp_path / "2", files) == []
    # another package's __init__ runs before its submodules: a -> pkg.sub -> pkg.sub.c -> a
    files |= {"a.py": "import pkg.sub.c\n", "sub/__init__.py": "from pkg.a import A\n", "sub/c.py": ""}
    assert _cycles_of(tmp_path / "3", files) == [["pkg.a", "pkg.sub"]]
