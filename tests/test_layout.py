"""The tree shows the architecture: the product (stt, live, viewer, protocol) never imports the
development tools or the benchmarks, no module imports itself back through others or is over 500
lines, the engine's interface loads without torch, and the Docker image (which leaves the tools
out) still runs."""

from __future__ import annotations

import ast
import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "captions"
TOOLS = ("captions.dev", "captions.bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> set[str]:
    """The captions modules `name` imports when it runs (at any depth, not under TYPE_CHECKING)."""
    tree = ast.parse(MODULES[name].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def is_tool(name: str) -> bool:
    return name.startswith(TOOLS)


def test_the_product_never_imports_the_tools_or_the_benchmarks():
    offenders = {name: sorted(filter(is_tool, deps)) for name, deps in GRAPH.items()
                 if not is_tool(name) and any(map(is_tool, deps))}
    assert not offenders, offenders


def test_the_engine_does_not_depend_on_livekit_or_the_viewer():
    offenders = {name: sorted(d for d in deps if d.startswith(("captions.live", "captions.viewer")))
                 for name, deps in GRAPH.items() if name.startswith("captions.stt")}
    assert not any(offenders.values()), offenders


def test_no_import_cycles():
    visiting, done, cycles = [], set(), []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append(visiting[visiting.index(name):] + [name])
            return
        visiting.append(name)
        for dep in sorted(GRAPH[name]):
            visit(dep)
        visiting.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)
    assert not cycles, cycles


MAX_MODULE_LINES = 500


def test_no_module_of_the_package_is_over_500_lines():
    """A module that long does several jobs: split it along them (as bench/latency and bench/meeting are)."""
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_the_engine_interface_and_the_queue_load_without_torch():
    code = ("import sys; import captions.stt.api, captions.live.slots, captions.live.segmenter, "
            "captions.protocol, captions.cli; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "!"))]


def test_the_image_leaves_the_tools_out():
    patterns = _dockerignore_patterns()
    for package in TOOLS:
        path = package.replace(".", "/")
        assert any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is not in .dockerignore"
    assert "COPY --chown=captions:captions captions ./captions" in (ROOT / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """The package as the Docker build context copies it (.dockerignore applied)."""
    patterns = _dockerignore_patterns()
    out = tmp_path_factory.mktemp("image")

    def ignored(directory: str, names: list[str]) -> list[str]:
        relative = Path(directory).relative_to(ROOT)
        return [n for n in names if any(fnmatch.fnmatch(str(relative / n), p) or fnmatch.fnmatch(n, p)
                                        for p in patterns)]

    shutil.copytree(PACKAGE, out / "captions", ignore=ignored)
    assert not (out / "captions" / "dev").exists()
    return out


def test_the_image_imports_every_product_module_and_says_what_the_tools_are(image_tree):
    code = """
import importlib, pkgutil, sys
import captions
assert captions.__file__.startswith(sys.argv[1]), captions.__file__
for m in pkgutil.walk_packages(captions.__path__, "captions."):
    importlib.import_module(m.name)
from captions.cli import main
sys.exit(main(["bench", "engine"]))
"""
    result = subprocess.run([sys.executable, "-c", code, str(image_tree)], capture_output=True, text=True, check=False,
                            cwd=image_tree, env={"PYTHONPATH": str(image_tree), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert "captions bench: a development tool, not installed here" in result.stderr
