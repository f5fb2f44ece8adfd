"""The dependency rules of docs/ARCHITECTURE.md, checked on the source (``ast``, nothing imported):

* the science core (``addiff_core``) imports neither ``server`` nor ``client``;
* a hospital's code (``client``) does not import the coordinator's (``server``);
* no import cycle among the project's modules (imports inside functions count too; imports under
  ``if TYPE_CHECKING:``, never executed, do not);
* no source file outside bench/ and tests/ has more than MAX_LINES lines;
* only the two fence modules (FLOWER_FENCES) import Flower's non-public modules: everything else,
  tests and bench included, imports Flower's public API (FLOWER_PUBLIC) only.
"""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("addiff_core", "server", "client")
MAX_LINES = 500
# Flower's public API: these packages and the names their __all__ lists (``import flwr`` for its
# version included); anything else under flwr. goes through a fence module
FLOWER_PUBLIC = ("flwr", "flwr.app", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.clientapp",
                 "flwr.clientapp.mod", "flwr.simulation", "flwr.common")
FLOWER_FENCES = ("server/flower_compat.py", "client/flower_compat.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def nearest(target: str) -> str | None:  # the module itself, or the package it lies in
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # never executed: for annotations only
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import sub" imports the module pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        out |= {t for t in map(nearest, targets) if t is not None and t != name}
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    src = _sources()
    modules = set(src)
    return {name: _imports(name, path, modules) for name, path in src.items()}


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def test_the_graph_sees_the_known_imports(graph):
    # a sanity check of the parser itself: relative, absolute, "from . import x" and in-function imports
    assert "addiff_core.contract" in graph["addiff_core.preprocessing"]
    assert "addiff_core.diffusion" in graph["addiff_core.training"]  # from . import diffusion as diff
    assert "addiff_core.run_folder" in graph["server.federation"]
    assert "addiff_core.synth" in graph["addiff_core.phantom_calibration"]  # imported inside a function


def test_the_core_imports_no_flower_glue(graph):
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if _top(m) == "addiff_core"
                 for d in deps if _top(d) in ("server", "client"))
    assert not bad, "addiff_core must not import server/ or client/:\n" + "\n".join(bad)


def test_the_client_imports_nothing_of_the_server(graph):
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if _top(m) == "client" for d in deps if _top(d) == "server")
    assert not bad, "client/ must not import server/ (a hospital's code):\n" + "\n".join(bad)


def test_no_import_cycle(graph):
    # Tarjan's strongly connected components: a component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_federation_commands_are_entry_points_of_the_command_line():
    # addiff_core.cli finds them through importlib.metadata, never by importing server/ or client/
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    eps = doc["project"]["entry-points"]["addiff.commands"]
    assert sorted(eps.values()) == ["client.commands:register", "server.commands:register"]
    from importlib.metadata import entry_points

    installed = {ep.value for ep in entry_points(group="addiff.commands")}
    assert set(eps.values()) <= installed, "entry points not installed: run `pip install -e .` again"


def test_no_source_file_is_too_long():
    files = [p for p in ROOT.rglob("*.py")
             if not {".venv", "bench", "tests", "build", "dist"} & set(p.relative_to(ROOT).parts[:1])
             and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    long = sorted(f"{p.relative_to(ROOT)}: {n} lines" for p in files
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES)
    assert not long, f"files over {MAX_LINES} lines (split them):\n" + "\n".join(long)


def _flower_all(module: str) -> set[str]:
    """The names ``__all__`` lists in the installed Flower package ``module`` (read, not imported)."""
    import importlib.util

    root = Path(importlib.util.find_spec("flwr").submodule_search_locations[0])
    init = root.joinpath(*module.split(".")[1:], "__init__.py")
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def _non_public_flower_imports(tree: ast.AST, public: dict[str, set[str]]) -> list[str]:
    """Each import of a Flower module or name outside ``public`` (package -> its public names)."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"import {a.name}" for a in node.names
                    if a.name.split(".")[0] == "flwr" and a.name not in public]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "flwr":
            names = public.get(node.module or "")
            if names is None:
                bad.append(f"from {node.module} import ...")
            else:
                bad += [f"from {node.module} import {a.name}" for a in node.names if a.name not in names]
    return bad


@pytest.fixture(scope="module")
def flower_public() -> dict[str, set[str]]:
    # the lazily exported "simulation" is public too (flwr/__init__.py's _LAZY_EXPORTS)
    return {m: _flower_all(m) | ({"simulation", "__version__"} if m == "flwr" else set()) for m in FLOWER_PUBLIC}


def test_only_the_fences_import_flowers_non_public_modules(flower_public):
    files = [p for d in (*PACKAGES, "tests", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    bad = [f"{p.relative_to(ROOT)}: {imp}" for p in files if str(p.relative_to(ROOT)) not in FLOWER_FENCES
           for imp in _non_public_flower_imports(ast.parse(p.read_text(encoding="utf-8"), str(p)), flower_public)]
    assert not bad, ("Flower's non-public modules are imported through server/flower_compat.py or "
                     "client/flower_compat.py only:\n" + "\n".join(bad))


def test_the_flower_rule_sees_non_public_imports(flower_public):
    # a sanity check of the rule itself, on code it must refuse and code it must let through
    refused = ("from flwr.common.constant import ErrorCode\n"
               "from flwr.app.message_type import MessageType\n"
               "import flwr.server.superlink\n"
               "from flwr.common import TOTALLY_PRIVATE\n"
               "def f():\n    from flwr.supercore.task_identity import TaskIdentity\n")
    allowed = ("import flwr\nfrom flwr.app import Message, MessageType\nfrom flwr.serverapp.strategy import FedAvg\n"
               "from flwr.common import bytes_to_ndarray\nfrom flwr.simulation import run_simulation\n"
               "from flwr.clientapp.mod import LocalDpMod\nfrom flwrx import y\n")
    assert len(_non_public_flower_imports(ast.parse(refused), flower_public)) == 5
    assert _non_public_flower_imports(ast.parse(allowed), flower_public) == []
