"""The mutation check: plant each curated bug in a scratch copy of zflux and run the tests that must catch it.

    python scripts/mutations.py               # every entry of tests/mutations/*.toml; exit 1 if any survives
    python scripts/mutations.py -k qkv        # only the entries whose name contains "qkv"
    python scripts/mutations.py --list        # the entries, checked against the code, without running them

Each entry of tests/mutations/*.toml is one plausible, semantic bug in the product code and the
tests that must catch it; tests/mutations/README.md says how to write one.

For each entry, a forked child copies the package folders into a scratch `zflux` tree (as
pyproject's package-dir maps them), applies the edits there (the working tree is never touched),
puts that tree first on sys.path, and runs `pytest -x` on the entry's tests. The entry is *killed*
if the tests fail, *survived* if they pass, an *error* if they cannot run (no such test, a
collection error, a timeout) or if a module they imported came from outside the scratch copy or
none of the mutated modules was imported. The parent imports the heavy libraries the tests use
(torch, diffusers, transformers) once before forking, so each child starts in well under a second.
A baseline child first runs every named test on the unmutated copy: a test that already fails
would kill every mutation.

Exit status 1 if any entry survived or errored, if the baseline failed, or if the whole run took
longer than --budget seconds (CI allows 8 minutes on 2 cores).
"""

import argparse
import ast
import gc
import importlib
import json
import os
import runpy
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ROOT / "tests" / "mutations"


@dataclass(frozen=True)
class Edit:
    file: str  # relative to ROOT
    old: str
    new: str


@dataclass(frozen=True)
class Mutation:
    name: str
    why: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]
    source: str  # the .toml file it came from


@dataclass
class Outcome:
    name: str
    verdict: str  # killed, survived, error; passed / failed for the baseline
    seconds: float
    detail: str = ""
    log_tail: str = field(default="", repr=False)  # the end of the child's pytest output


def package_dirs() -> dict[str, str]:
    """pyproject's setuptools package-dir: installed package -> repository folder."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-dir"]


def module_name(file: str) -> str:
    """The installed module name of a repository file, e.g. zimg/model.py -> zflux.zimg.model."""
    path = Path(file).with_suffix("")
    for package, folder in sorted(package_dirs().items(), key=lambda item: -len(Path(item[1]).parts)):
        if path.parts[: len(Path(folder).parts)] == Path(folder).parts:
            rest = path.parts[len(Path(folder).parts):]
            rest = rest[:-1] if rest and rest[-1] == "__init__" else rest
            return ".".join([package, *rest])
    raise ValueError(f"{file} is in no package folder of pyproject.toml")


def load_entries(folder: Path = ENTRIES) -> list[Mutation]:
    """Every entry of folder/*.toml, each checked: fields, the edits apply exactly once, the test functions exist."""
    mutations, problems = [], []
    for path in sorted(folder.glob("*.toml")):
        for i, raw in enumerate(tomllib.loads(path.read_text()).get("mutation", [])):
            where = f"{path.relative_to(ROOT)} entry {i + 1} ({raw.get('name', 'no name')})"
            try:
                mutations.append(parse_entry(raw, path.relative_to(ROOT).as_posix()))
            except ValueError as e:
                problems.append(f"{where}: {e}")
    names = [m.name for m in mutations]
    problems += [f"name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if problems:
        raise ValueError("bad mutation entries:\n  " + "\n  ".join(problems))
    return mutations


def parse_entry(raw: dict, source: str) -> Mutation:
    """One [[mutation]] table -> a Mutation, or ValueError naming what is wrong with it."""
    allowed = {"name", "why", "file", "old", "new", "also", "tests"}
    missing = [k for k in ("name", "why", "file", "old", "new", "tests") if k not in raw]
    if missing or set(raw) - allowed:
        raise ValueError(f"missing {missing}, unknown {sorted(set(raw) - allowed)}; fields: {sorted(allowed)}")
    also = raw.get("also", [])
    if any(not isinstance(e, dict) or set(e) != {"file", "old", "new"} for e in also):
        raise ValueError("each edit in `also` holds exactly file, old and new")
    edits = tuple(Edit(e["file"], e["old"], e["new"]) for e in [raw, *also])
    for edit in edits:
        path = ROOT / edit.file
        if not path.is_file():
            raise ValueError(f"no file {edit.file}")
        module_name(edit.file)  # raises unless the file is in a package folder
        count = path.read_text().count(edit.old)
        if count != 1 or edit.old == edit.new:
            raise ValueError(f"the old text must occur exactly once in {edit.file} and differ from the new "
                             f"(found {count} times): update the entry to the current code")
    tests = tuple(raw["tests"])
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError("tests must be a non-empty list of pytest node ids")
    for test in tests:
        file, _, rest = test.partition("::")
        if not (ROOT / file).is_file():
            raise ValueError(f"no test file {file}")
        function = rest.split("[")[0].split("::")[-1]
        defined = {node.name for node in ast.walk(ast.parse((ROOT / file).read_text()))
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        if function and function not in defined:
            raise ValueError(f"{file} defines no {function}")
    return Mutation(name=raw["name"], why=raw["why"], edits=edits, tests=tests, source=source)


def build_scratch(dest: Path, edits: tuple[Edit, ...]) -> Path:
    """A `zflux` package tree under dest (as pyproject maps the folders) with `edits` applied; return dest."""
    for package, folder in sorted(package_dirs().items(), key=lambda item: item[0].count(".")):
        shutil.copytree(ROOT / folder, dest / package.replace(".", "/"), dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for edit in edits:
        target = dest / module_name(edit.file).replace(".", "/")
        target = target / "__init__.py" if target.is_dir() else target.with_suffix(".py")
        text = target.read_text()
        if text.count(edit.old) != 1:
            raise ValueError(f"{edit.file}: the old text does not occur exactly once")
        target.write_text(text.replace(edit.old, edit.new))
    return dest


def warm_imports(test_files: set[str]) -> None:
    """Import, in this (parent) process, the third-party modules and names the test files import.

    The tests' conftest.py runs first (its environment: HF_HUB_OFFLINE, TRITON_INTERPRET before
    triton is imported). zflux and the tests' own helper modules are left alone: each child must
    import those from its scratch copy.
    """
    runpy.run_path(str(ROOT / "tests" / "conftest.py"))
    local = {p.stem: p for p in (ROOT / "tests").glob("*.py")}
    wanted: dict[str, set[str]] = {}
    files, seen = [ROOT / f for f in sorted(test_files)], set()
    while files:  # the test files and the helper modules they import (tiny_pipelines.py, ...)
        file = files.pop()
        if file in seen:
            continue
        seen.add(file)
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    wanted.setdefault(alias.name, set())
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                wanted.setdefault(node.module, set()).update(alias.name for alias in node.names)
        files += [local[m] for m in wanted if m in local]
    for module, names in wanted.items():
        if module.split(".")[0] in {*local, "zflux"}:
            continue
        try:
            imported = importlib.import_module(module)
            for name in names:  # diffusers and transformers load their classes lazily, on attribute access
                getattr(imported, name, None)
        except Exception:  # noqa: BLE001 (a module this machine lacks: the child's collection will say so)
            continue
    for plugin in entry_points(group="pytest11"):  # pytest's installed plugins, which each child would load
        plugin.load()
    # What is imported now lives on in every child: out of the collector's sight, so that pytest's gc.collect()
    # at exit (1.5 s over torch's and diffusers' objects) skips it and the pages stay shared.
    gc.freeze()


def child(edits: tuple[Edit, ...], tests: tuple[str, ...], workdir: Path) -> None:
    """In a forked child: build the scratch tree, run pytest -x on `tests` there, write result.json, exit."""
    log = os.open(workdir / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    result = {"rc": None, "outside": [], "imported": [], "error": ""}
    try:
        scratch = build_scratch(workdir / "src", edits)
        sys.path.insert(0, str(scratch))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(scratch), *filter(None, [os.environ.get("PYTHONPATH")])])
        os.chdir(ROOT)
        import pytest

        # The warning filter: pytest cannot rewrite the asserts of plugins the parent imported before it.
        options = ["-x", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning", f"--basetemp={workdir / 'tmp'}"]
        result["rc"] = int(pytest.main([*options, *tests]))
        loaded = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items()) if name.split(".")[0] == "zflux"}
        result["outside"] = sorted(n for n, f in loaded.items() if f and not Path(f).is_relative_to(scratch))
        result["imported"] = sorted({module_name(e.file) for e in edits} & set(loaded))
    except BaseException as e:  # noqa: BLE001 (reported by the parent)
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        (workdir / "result.json").write_text(json.dumps(result))
        os._exit(0)


def verdict(result: dict, mutated: bool) -> tuple[str, str]:
    """(verdict, detail) of one child's result.json."""
    if result["error"]:
        return "error", result["error"]
    if result["outside"]:
        return "error", f"imported from outside the scratch copy: {', '.join(result['outside'][:3])}"
    rc = result["rc"]
    if not mutated:
        return ("passed", "") if rc == 0 else ("failed", f"pytest exit code {rc}")
    if not result["imported"]:
        return "error", "the tests never imported the mutated module(s)"
    outcomes = {0: ("survived", "every named test passed"), 1: ("killed", "")}
    return outcomes.get(rc, ("error", f"pytest exit code {rc} (not a test failure)"))


def run_all(jobs: list[tuple[str, tuple[Edit, ...], tuple[str, ...]]], scratch: Path, workers: int,
            timeout: float) -> list[Outcome]:
    """Run each (name, edits, tests) job in a forked child, `workers` at a time; the outcomes in job order."""
    pending, running, outcomes = list(enumerate(jobs)), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            index, (name, edits, tests) = pending.pop(0)
            workdir = scratch / f"{index:03d}"
            workdir.mkdir()
            pid = os.fork()
            if pid == 0:
                child(edits, tests, workdir)
            running[pid] = (index, name, bool(edits), workdir, time.monotonic())
        time.sleep(0.05)
        for pid, (index, name, mutated, workdir, start) in list(running.items()):
            done, _ = os.waitpid(pid, os.WNOHANG)
            elapsed = time.monotonic() - start
            if not done and elapsed < timeout:
                continue
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            del running[pid]
            result_file = workdir / "result.json"
            if result_file.is_file():
                kind, detail = verdict(json.loads(result_file.read_text()), mutated)
            else:
                kind, detail = "error", f"timed out after {timeout:.0f} s" if not done else "the child died without a result"
            log = workdir / "log.txt"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.is_file() else ""
            outcomes[index] = Outcome(name, kind, elapsed, detail, tail)
            print(f"{kind:>8}  {elapsed:6.1f} s  {name}", flush=True)
    return [outcomes[i] for i in sorted(outcomes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="select", help="run only the entries whose name contains this")
    parser.add_argument("--list", action="store_true", help="check and list the entries, run nothing")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="children at a time (default 2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one entry's tests may take")
    parser.add_argument("--budget", type=float, default=480, help="fail if the whole run takes longer (seconds; 0: no limit)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies and logs (their folder is printed)")
    args = parser.parse_args(argv)

    mutations = [m for m in load_entries() if not args.select or args.select in m.name]
    if not mutations:
        print(f"no entry's name contains {args.select!r}")
        return 1
    if args.list:
        for m in mutations:
            print(f"{m.name}  ({m.source})\n    {m.why}\n    " + "\n    ".join(m.tests))
        print(f"{len(mutations)} entries")
        return 0

    start = time.monotonic()
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    warm_imports({t.partition("::")[0] for t in tests})
    scratch = Path(tempfile.mkdtemp(prefix="zflux-mutations-"))
    jobs = [("baseline: the named tests on the unmutated code", (), tests)] + [(m.name, m.edits, m.tests) for m in mutations]
    try:
        outcomes = run_all(jobs, scratch, workers=args.workers, timeout=args.timeout)
    finally:
        gc.unfreeze()  # let the interpreter's exit free those objects (triton's bindings complain of leaks otherwise)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    took = time.monotonic() - start

    bad = [o for o in outcomes if o.verdict not in ("killed", "passed")]
    for o in bad:
        print(f"\n{o.verdict.upper()}: {o.name}: {o.detail}")
        if o.log_tail:
            print("    " + o.log_tail.replace("\n", "\n    "))
    killed = sum(o.verdict == "killed" for o in outcomes)
    print(f"\n{killed} of {len(mutations)} mutations killed, {len(bad)} problems; {took:.0f} s with {args.workers} workers"
          + (f" (scratch copies kept in {scratch})" if args.keep else ""))
    if args.budget and took > args.budget:
        print(f"the run took {took:.0f} s, over the budget of {args.budget:.0f} s: make the named tests faster or fewer")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
