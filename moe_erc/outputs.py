"""Where commands write: output directories checked first, and replaced only once complete.

``export``, ``analyze``, ``report`` and ``study`` take ``--out``; a path that is an existing file is a one-line
error, never a ``FileExistsError``. :func:`staged_directory` writes a directory beside its destination and
moves it into place at the end, so a command that fails half-way leaves an earlier output untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from moe_erc.errors import UserError


def check_output_dir(path: str | Path, option: str = "--out", must_be_empty: bool = False,
                     force: bool = False) -> Path:
    """``path`` as a directory to write into: refuse a file, and (``must_be_empty``) a non-empty directory
    unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {path} is a file; give a directory")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{option} {path}: {parent} is a file, not a directory")
    if must_be_empty and not force and path.is_dir() and any(path.iterdir()):
        raise UserError(f"{option} {path} is not empty; give a new directory, or add --force to replace its "
                        f"contents")
    return path


@contextlib.contextmanager
def staged_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success it replaces ``final`` (whatever was
    there is removed only then), on failure it is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
