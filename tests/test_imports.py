"""Imports flow one way (../shared/design.md): the CLI at the top, then the model families, then `common/`,
whose math leaves the Triton kernels build on.

Every import of every module counts, those inside function bodies too. The rules:
- a family (zflux.zimg; zflux.flux's FLUX.1 modules; zflux.flux.flux2 when it exists) imports its own
  modules and zflux.common, never another family, the CLI or zflux.kernels;
- zflux.common imports nothing of a family or the CLI;
- zflux.common.ops is the one module that imports zflux.kernels;
- zflux.kernels imports only itself and common's plain-PyTorch math leaves;
- no cycle among modules.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"zflux": "zflux", "zimg": "zflux.zimg", "flux": "zflux.flux", "common": "zflux.common", "kernels": "zflux.kernels"}
MATH_LEAVES = {"zflux.common.norms", "zflux.common.rope", "zflux.common.attention", "zflux.common.embeddings",
               "zflux.common.quant"}
FAMILIES = ("zflux.flux.flux2", "zflux.zimg", "zflux.flux")  # most specific first: FLUX.2 is a family of its own


def module_files() -> dict[str, Path]:
    """Installed module name -> source file, for every .py file of the package folders."""
    modules = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The zflux modules (or packages) that module `name` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from zflux.common import ops` imports the module zflux.common.ops
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m == "zflux" or m.startswith("zflux.")}


def family(module: str) -> str | None:
    return next((f for f in FAMILIES if module == f or module.startswith(f + ".")), None)


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports(name, path, set(files)) for name, path in files.items()}


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that breaks one of the rules above, as 'importer -> imported: why'."""
    bad = []
    for src, targets in edges.items():
        for dst in targets:
            why = None
            if dst == "zflux.cli" and src != "zflux.cli":
                why = "nothing imports the CLI"
            elif family(src) and family(dst) and family(src) != family(dst):
                why = "a family imports another family"
            elif src.startswith("zflux.common") and family(dst):
                why = "common imports a family"
            elif dst.startswith("zflux.kernels") and not src.startswith("zflux.kernels") and src != "zflux.common.ops":
                why = "only zflux.common.ops imports the kernels"
            elif src.startswith("zflux.kernels") and not (dst.startswith("zflux.kernels") or dst in MATH_LEAVES):
                why = "kernels import only common's math leaves"
            if why:
                bad.append(f"{src} -> {dst}: {why}")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among modules (depth-first search; each reported once from where it was found)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_imports_flow_one_way():
    edges = graph()
    assert len(edges) > 20  # the walk found the package
    assert violations(edges) == []
    assert cycles(edges) == []


@pytest.mark.parametrize("src, dst, message", [
    ("zflux.zimg.pipeline", "zflux.flux.model", "a family imports another family"),
    ("zflux.flux.flux2.model", "zflux.flux.model", "a family imports another family"),
    ("zflux.common.pipeline", "zflux.zimg.model", "common imports a family"),
    ("zflux.flux.model", "zflux.kernels.attention", "only zflux.common.ops imports the kernels"),
    ("zflux.kernels.rmsnorm", "zflux.common.ops", "kernels import only common's math leaves"),
    ("zflux.common.weights", "zflux.cli", "nothing imports the CLI"),
])
def test_each_rule_catches_its_break(src, dst, message):
    """The checker itself: one planted import per rule is reported."""
    edges = graph()
    edges.setdefault(src, set()).add(dst)
    assert any(v.startswith(f"{src} -> {dst}: {message}") for v in violations(edges))


def test_a_planted_cycle_is_found():
    edges = graph()
    edges["zflux.common.norms"] = edges["zflux.common.norms"] | {"zflux.common.ops"}
    assert any("zflux.common.norms" in c and "zflux.common.ops" in c for c in cycles(edges))
