"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The data goes to a temporary file in the same directory (so the rename
stays on one file system), is fsynced, then ``os.replace``d over ``path``;
on any failure the temporary file is removed and ``path`` is untouched.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path


def _file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask); mkstemp and
    safetensors give 0o600, which a server running as another user cannot read."""
    try:  # Linux says it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            mask = int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path, error=ValueError) -> dict:
    """A JSON file holding one object; anything else raises ``error`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, indent: int = 2) -> Path:
    """``obj`` as JSON (``indent``) plus a final newline."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


# --------------------------------------------------------------------------
# atomic directory writes (an adapter, a checkpoint)
# --------------------------------------------------------------------------
def fsync_dir(path) -> None:
    """Make a rename inside `path` durable (best effort where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the process that made the temp dir ``name`` (``<prefix><pid>-<token>``) still runs."""
    pid = name[len(prefix):].split("-", 1)[0]
    if not pid.isdigit():
        return False  # an older flora's name (no pid): long finished
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def recover_interrupted_save(path) -> None:
    """Undo what a killed save of directory ``path`` left next to it: when
    ``path`` is gone (killed between the two renames) the previous directory is
    moved back from ``.<name>.old-*``; unfinished ``.<name>.tmp-*`` and spent
    ``.old-*`` directories are removed. Directories of a save still running
    (its process alive) are left alone."""
    path = os.path.realpath(os.fspath(path))
    parent, base = os.path.split(path)
    if not os.path.isdir(parent):
        return
    dead = {"tmp": [], "old": []}
    for name in os.listdir(parent):
        for kind in dead:
            prefix = f".{base}.{kind}-"
            if name.startswith(prefix) and not _owner_alive(name, prefix):
                dead[kind].append(os.path.join(parent, name))
    olds = sorted(dead["old"], key=os.path.getmtime)
    if olds and not os.path.lexists(path):
        os.rename(olds.pop(), path)  # the directory that was live when the save was killed
        fsync_dir(parent)
    for d in dead["tmp"] + olds:
        shutil.rmtree(d, ignore_errors=True)


def atomic_write_dir(path, writers: dict, replaceable, what: str, superseded=()) -> None:
    """Create/replace directory ``path`` holding the files ``writers`` produce.

    ``writers``: file name -> fn(full_path). Everything is written and fsynced
    in a temporary sibling directory first. An existing ``path`` may hold only
    files named in ``replaceable`` (a set, or a predicate on a name): ``what``
    is saved there (we never delete foreign files); files there that this save
    does not write (a README.md) are carried over, so a save removes only
    files it writes and those named in ``superseded`` (a set or predicate:
    the replaced save's own files, e.g. its weights in another layout, which
    a reader could prefer to the new ones). The old directory is moved
    aside, the new one renamed in (with the old one's permissions), then the
    old one removed. On any failure the old directory is put back and the
    temporary one removed; a save killed outright is recovered by the next
    save or load (:func:`recover_interrupted_save`). A symlink ``path`` is
    written through (the link keeps pointing at the saved directory); a
    read-only ``path`` is refused.
    """
    path = os.path.realpath(os.fspath(path))  # write through a symlink, do not replace it
    parent, base = os.path.split(path)
    noun = what.split(" ", 1)[-1]  # "an adapter" -> "adapter"
    recover_interrupted_save(path)
    keep, mode = [], None
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise FileExistsError(f"{path} exists and is not a directory")
        ours = replaceable if callable(replaceable) else set(replaceable).__contains__
        foreign = sorted(n for n in os.listdir(path) if not ours(n))
        if foreign:
            raise FileExistsError(
                f"{path} holds files that are not part of {what} ({', '.join(foreign[:5])}); "
                f"save the {noun} into a new or empty directory so nothing else is replaced")
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode)
        if not os.access(path, os.W_OK) or not mode & 0o222:  # mode bits too: root passes os.access
            raise PermissionError(f"{path} is read-only; not replacing the {noun} in it "
                                  f"(make it writable or save elsewhere)")
        gone = superseded if callable(superseded) else set(superseded).__contains__
        keep = sorted(n for n in set(os.listdir(path)) - set(writers) if not gone(n))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(tmp)  # mode from the umask, unlike mkdtemp's 0700
    except PermissionError:
        raise PermissionError(f"cannot save to {path}: {parent} is not writable") from None
    old = None
    try:
        for name, write in writers.items():
            full = os.path.join(tmp, name)
            write(full)
            os.chmod(full, _file_mode())
            _fsync_file(full)
        for name in keep:
            src, dst = os.path.join(path, name), os.path.join(tmp, name)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        if mode is not None:
            os.chmod(tmp, mode)
        fsync_dir(tmp)
        if os.path.exists(path):
            old = os.path.join(parent, f".{base}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(path, old)
        os.rename(tmp, path)
        tmp = None
        fsync_dir(parent)
    except BaseException:
        if old is not None and not os.path.exists(path):
            os.rename(old, path)  # put the previous one back
            old = None
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def publish_dir(path, fill) -> bool:
    """A cache entry: directory ``path`` made by ``fill(tmp)`` in a temporary
    sibling and published with one rename, so a reader sees all of it or none.
    When another process published it first, ours is dropped. Returns False,
    leaving nothing behind, when the cache cannot be written (a cache is never
    worth failing the caller for)."""
    path = os.fspath(path)
    parent, base = os.path.split(path)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.makedirs(tmp)
        fill(tmp)
        os.rename(tmp, path)  # fails when path exists (and holds files): someone else's entry
        return True
    except OSError:
        return os.path.isdir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
