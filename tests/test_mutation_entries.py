"""The mutation check's entries (tests/mutations/*.toml) still fit the code: each old text occurs exactly once
in its file and each named test exists. Running them is scripts/mutations.py's job (CI runs it after the suite);
this keeps an entry from going stale unnoticed when the code it mutates changes."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("mutations", ROOT / "scripts" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entries_fit_the_code():
    mutations = load_script().load_entries()  # raises ValueError naming every entry that does not fit
    assert len(mutations) >= 11  # the nine bugs of issue 20 (adapted) and two of issue 10, at least


def test_scratch_copy_is_a_zflux_tree_with_the_edits(tmp_path):
    script = load_script()
    mutation = next(m for m in script.load_entries() if m.name == "pixels-truncated-not-rounded")
    scratch = script.build_scratch(tmp_path, mutation.edits)
    assert script.module_name("common/images.py") == "zflux.common.images"
    assert mutation.edits[0].new in (scratch / "zflux" / "common" / "images.py").read_text()
    assert (scratch / "zflux" / "zimg" / "model.py").read_text() == (ROOT / "zimg" / "model.py").read_text()
    assert (scratch / "zflux" / "cli.py").is_file()
