"""Where commands write: output directories checked first, and replaced only once complete.

``export``, ``analyze``, ``report`` and ``study`` take ``--out``; a path that is an existing file is a one-line
error, never a ``FileExistsError``. :func:`staged_directory` writes a directory beside its destination and
moves it into place at the end, so a command that fails half-way leaves an earlier output untouched.
:class:`WriterLock` keeps one writer per directory (training's run directory, an export's ``--out``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import socket
import time
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


# ------------------------------------------------------------------------------------------ full disks

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, an exhausted quota


def no_space_message(exc: OSError) -> str:
    """One line for a full disk or quota: which file, how much is free there, and that outputs are staged."""
    where = Path(exc.filename) if exc.filename else None
    free = ""
    for folder in ([where, *where.parents] if where else []):
        if folder.exists():
            free = f" ({shutil.disk_usage(folder).free / 2**30:.2f} GiB free on {folder})"
            break
    return (f"{exc.strerror.lower()} writing {where or 'the output'}{free}; the command wrote into a staging "
            f"place that was removed, so earlier outputs are as they were: free space or write elsewhere")


# --------------------------------------------------------------------------------------------- one writer


def process_running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def output_lock(out: str | Path, command: str) -> "WriterLock":
    """The writer lock of a command's ``--out`` directory, beside it (the directory itself is replaced whole)."""
    out = Path(out)
    try:
        return WriterLock(out.parent / f".{out.name}.lock", f"--out {out}",
                          "give another --out").acquire(say=lambda text: print(f"{command}: {text}"))
    except OSError as exc:
        raise UserError(f"cannot write --out {out} ({exc.strerror}); give a writable --out") from None

class WriterLock:
    """One writer for a directory (a run directory, an export's ``--out``), on any shared filesystem.

    The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local disks, NFSv3+ and Lustre, unlike
    ``flock``, which NFS may not honour across clients) holding the writer's host, pid, start time and job id; a
    thread touches it every :attr:`HEARTBEAT_S` seconds. Another writer is refused in one line naming the holder,
    unless the holder is gone: a pid no longer running on this host, or on another host no heartbeat for
    :attr:`STALE_AFTER_S` seconds; then the lock is taken over with a notice. A holder with this process's job id
    (torchrun's ``TORCHELASTIC_RUN_ID``, SLURM's ``SLURM_JOB_ID``) that is not a live process on this host is an
    earlier attempt of the same job (a torchrun restart, perhaps on another node): it is taken over silently.
    """

    HEARTBEAT_S = 30.0
    STALE_AFTER_S = 600.0
    _open: list = []  # held by this process (release_all)

    def __init__(self, path: str | Path, what: str, fix: str):
        self.path = Path(path)
        self.what, self.fix = what, fix  # "run directory runs/x", "give a new logging.run_dir"
        self._stop = None
        self._held = False

    @staticmethod
    def identity() -> dict:
        job = os.environ.get("TORCHELASTIC_RUN_ID")
        job = job if job not in (None, "", "none") else os.environ.get("SLURM_JOB_ID")
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "job": job}

    def acquire(self, say=print) -> "WriterLock":
        me = self.identity()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._holder()
                verdict = self._judge(holder, age, me)
                if verdict == "alive":
                    raise UserError(f"{self.what} is being written by another process ({self._describe(holder)}); "
                                    f"one directory has one writer: wait for it or stop it, or {self.fix} "
                                    f"(lock {self.path})")
                if verdict != "same job" and say is not None:
                    say(f"note: taking over the lock of {self.what} from {self._describe(holder)}: {verdict}")
                try:  # rename, not unlink: of two processes taking over one stale lock, one wins
                    os.replace(self.path, self.path.with_name(f"{self.path.name}.stale-{os.getpid()}"))
                    os.unlink(self.path.with_name(f"{self.path.name}.stale-{os.getpid()}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(me))
            self._held = True
            self._start_heartbeat()
            atexit.register(self.release)
            WriterLock._open.append(self)
            return self
        raise UserError(f"cannot take the lock {self.path} of {self.what} (other processes keep taking it); {self.fix}")

    def _holder(self) -> tuple[dict, float]:
        age = 0.0
        try:
            age = time.time() - self.path.stat().st_mtime
            return json.loads(self.path.read_text() or "{}"), age
        except FileNotFoundError:
            return {}, 0.0
        except (ValueError, OSError):
            return {}, age

    def _judge(self, holder: dict, age: float, me: dict) -> str:
        """``alive``, ``same job`` or why the holder is gone."""
        if not holder:  # being written this instant, or damaged
            return "alive" if age < self.STALE_AFTER_S else f"an unreadable lock {age:.0f} s old"
        if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
            return "same job"
        if holder.get("host") == me["host"]:  # a live process here holds it, whatever its job
            try:
                running = process_running(int(holder["pid"]))
            except (KeyError, ValueError, TypeError):
                running = True  # no pid to judge by
            if running:
                return "alive"
            return "same job" if self._same_job(holder, me) else \
                f"no process {holder['pid']} runs on this host any more"
        if self._same_job(holder, me):  # an earlier attempt on another node (torchrun moved rank 0)
            return "same job"
        if age > self.STALE_AFTER_S:
            return f"no heartbeat from {holder.get('host')} for {age:.0f} s"
        return "alive"

    @staticmethod
    def _same_job(holder: dict, me: dict) -> bool:
        return bool(holder.get("job")) and holder.get("job") == me["job"]

    @staticmethod
    def _describe(holder: dict) -> str:
        if not holder:
            return "holder unknown"
        job = f", job {holder['job']}" if holder.get("job") else ""
        return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}{job}"

    def _start_heartbeat(self) -> None:
        import threading

        self._stop = threading.Event()

        def beat(stop=self._stop, path=self.path, every=self.HEARTBEAT_S):
            while not stop.wait(every):
                with contextlib.suppress(OSError):
                    os.utime(path)

        threading.Thread(target=beat, name="moe-erc-lock-heartbeat", daemon=True).start()

    @classmethod
    def release_all(cls) -> None:
        """Release every lock this process holds (a run that failed before it could close)."""
        while cls._open:
            cls._open.pop().release()

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        if self in WriterLock._open:
            WriterLock._open.remove(self)
        if not self._held:
            return
        self._held = False
        if self._stop is not None:
            self._stop.set()
        with contextlib.suppress(OSError, ValueError):
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
