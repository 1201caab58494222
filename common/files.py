"""Files on disk, without torch: which files make up a checkpoint, and writing outputs whole or not at all.

Reading a checkpoint's header (`zflux info`) and checking a request (`zflux generate` before it loads
anything) import only this, so that they take milliseconds, not the seconds torch's import takes.

Only safetensors checkpoints are read. A pickle (`.bin`, `.ckpt`, `.pt`, `.pth`) can run any code
when it is loaded, so it is refused with a line saying how to convert it.

Outputs (images, converted checkpoints) are written to a temporary file in the target folder and
renamed into place: an error or Ctrl-C part way leaves the old file (or none), never half a file,
and the new file gets the usual permissions (0666 less the umask), not a temporary file's 0600.
"""

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

COMFY_PREFIX = "model.diffusion_model."  # ComfyUI's prefix on every transformer key of an official-layout file
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
TO_SAFETENSORS = ("zflux reads only .safetensors (loading a pickle can run any code in it): convert it once in a trusted "
                  "environment, e.g. safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys or shapes do not fit the model."""


def refuse_pickles(path: Path, found: list[Path]) -> None:
    """Raise CheckpointError when `found` (the files at `path`) are pickled checkpoints."""
    pickles = [p.name for p in found if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(f"{path} is a pickled checkpoint ({', '.join(pickles[:3])}); {TO_SAFETENSORS}")


def safetensors_files(path: str | Path) -> list[Path]:
    """The .safetensors files that make up the checkpoint at `path` (file, index file or folder)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        files = sorted(path.glob("*.safetensors"))
        if len(indexes) == 1:
            path = indexes[0]
        elif len(indexes) > 1:
            raise CheckpointError(f"{path} holds several index files: {', '.join(p.name for p in indexes)}")
        elif len(files) == 1:
            return files
        else:
            if not files:
                refuse_pickles(path, sorted(path.iterdir()))
            found = ", ".join(p.name for p in files) or "none"
            raise CheckpointError(f"{path} must hold one .safetensors file or an index; found {found}")
    refuse_pickles(path, [path])
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{path} is not a safetensors index (no readable 'weight_map')") from e
        shards = [path.parent / name for name in sorted(set(weight_map.values()))]
        refuse_pickles(path, shards)
        missing = [str(s) for s in shards if not s.exists()]
        if missing:
            raise CheckpointError(f"{path} names shards that are not there: {', '.join(missing)}")
        return shards
    return [path]


def check_writable(path: str | Path) -> Path:
    """Raise ValueError unless a file can be written at `path`: not a folder, and its folder exists or can be made."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a file name")
    folder = path.parent
    while not folder.exists():  # the first existing ancestor is where the missing folders would be made
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {folder} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it becomes `path`, on any error or Ctrl-C it is removed.

    The folder is created if needed; the file gets the permissions a new file gets (0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: no partial output stays behind
        tmp.unlink(missing_ok=True)
        raise
