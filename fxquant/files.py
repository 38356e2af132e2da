"""Writing output files safely: check the destination first, write atomically.

Every file fxquant writes (compiled models, result stores, Markdown, reports, graph dumps)
goes through :func:`atomic_output` or one of its wrappers: the data is written to a
temporary file in the destination's folder and renamed over the destination only once it
is complete. A write that fails half-way (disk full, file-size limit, Ctrl-C) leaves the
previous file as it was and no temporary file behind.

:func:`check_output_path` (and :func:`check_output_dir` for folders) fail early, before any
work starts, when the destination cannot be written: its folder is missing, is not a folder,
is not writable, or the path names an existing folder.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from fxquant.errors import OutputError

_TMP_SUFFIX = ".fxquant-tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _folder_writable(folder: Path) -> bool:
    """Whether files can be created in ``folder``: permission bits, then (for read-only
    mounts, which ``os.access`` does not always see) a probe file that is removed again."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fxquant-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _check_folder(folder: Path, what: str, target: Path) -> None:
    shown = str(folder) if str(folder) else "."
    if not folder.exists():
        raise OutputError(f"cannot write {what} {target}: folder {shown} does not exist; "
                          f"create it first or give a path in an existing folder")
    if not folder.is_dir():
        raise OutputError(f"cannot write {what} {target}: {shown} is a file, not a folder; "
                          f"give a path in an existing folder")
    if not _folder_writable(folder):
        raise OutputError(f"cannot write {what} {target}: folder {shown} is not writable; "
                          f"give a path in a folder you can write to")


def check_output_path(path: str | os.PathLike, what: str = "output file") -> Path:
    """Fail with :class:`OutputError` unless a file can be written at ``path``: its folder
    exists and is writable, and ``path`` is not an existing folder. An existing file is
    fine (it is replaced). Returns ``path`` as a :class:`Path`."""
    path = Path(path)
    if str(path) in ("", ".") or path.is_dir():
        raise OutputError(f"cannot write {what} {path}: it is an existing folder; give a file "
                          f"path, e.g. {path / ('out' + (path.suffix or '.txt'))}")
    _check_folder(path.parent, what, path)
    return path


def check_format_suffix(path: str | os.PathLike, chosen: str, suffixes: dict[str, str]) -> None:
    """Refuse an ``--out`` named for another ``--format`` (``suffixes``: format → file suffix):
    ``m.svg`` for a dot graph would hold dot text. Other suffixes are the user's choice."""
    suffix = Path(path).suffix.lower()
    others = {ending: name for name, ending in suffixes.items() if name != chosen}
    if suffix in others:
        raise OutputError(f"--out {path} ends in {suffix}, the suffix of --format "
                          f"{others[suffix]}; give a {suffixes[chosen]} path for --format "
                          f"{chosen}, or --format {others[suffix]}")


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail with :class:`OutputError` unless ``path`` is a writable folder or can be created
    as one (its parent folder exists and is writable); it is not created here."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{what} {path} is a file, not a folder; give a folder (it is "
                              f"created if missing, inside an existing folder)")
        if not _folder_writable(path):
            raise OutputError(f"{what} {path} is not writable; give a folder you can write to")
        return path
    _check_folder(path.parent, what, path)
    return path


def _describe(exc: OSError) -> str:
    if exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
        return f"{exc.strerror} (file-size limit, disk or quota full)"
    return exc.strerror or str(exc)


@contextmanager
def atomic_output(path: str | os.PathLike, what: str = "output file", *,
                  fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block finishes, the temporary file
    replaces ``path``. If the block (or the rename) fails, for any reason including
    KeyboardInterrupt, the temporary file is removed and ``path`` is left untouched. An
    :class:`OSError` while writing becomes an :class:`OutputError` naming ``what``::

        with atomic_output("model.fxq", "compiled model") as tmp:
            torch.save(payload, tmp)
    """
    path = check_output_path(path, what)
    existed = path.exists()
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                    suffix=_TMP_SUFFIX)
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {_describe(exc)}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        mode = path.stat().st_mode & 0o7777 if existed else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            kept = "the previous file is unchanged" if existed else "nothing was written"
            raise OutputError(f"cannot write {what} {path}: {_describe(exc)}; {kept}") from None
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", what: str = "output file", *,
                encoding: str | None = "utf-8") -> Iterator[IO]:
    """:func:`atomic_output` with the temporary file opened in ``mode`` ('w' or 'wb')."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    with atomic_output(path, what) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "output file") -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_open(path, "wb", what) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "output file", *,
                      encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_open(path, "w", what, encoding=encoding) as f:
        f.write(text)


def save_payload(path: str | os.PathLike, payload: dict, what: str) -> None:
    """``torch.save`` of plain tensors/numbers/strings, serialized in memory first (a failed
    write is then a plain OSError that :func:`atomic_write_bytes` reports, the old file kept)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue(), what)


def load_failure(exc: Exception, pickle_remedy: str) -> str:
    """A one-line reason for a failed ``torch.load(..., weights_only=True)`` (torch's own
    messages run to a page and suggest ``weights_only=False``, which fxquant never uses);
    ``pickle_remedy`` says what to do when the file holds pickled Python objects."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return (f"it holds a pickled Python object ({match.group(1)}), not just tensors and "
                f"plain data; {pickle_remedy} (files are read with weights_only=True: nothing "
                "in them is executed)")
    if "Weights only load failed" in text or isinstance(exc, (EOFError, pickle.UnpicklingError)):
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        extra = f" ({detail.group(1).strip()[:120]})" if detail else ""
        return f"not a torch.save file of tensors, or the file is corrupt or truncated{extra}"
    if "PytorchStreamReader" in text or isinstance(exc, (RuntimeError, OSError)):
        return "corrupt or truncated torch.save archive"
    # legacy-format reads of arbitrary bytes fail deep inside the unpickler (KeyError,
    # IndexError, ...): say what the file is not rather than echo that
    return f"not a torch.save file ({type(exc).__name__}: {text.strip()[:80]})"


def load_payload(path: str | os.PathLike, fmt: str, error: type[Exception], what: str, *,
                 missing_hint: str = "", written_by: str = "") -> dict:
    """A dict saved by :func:`save_payload` with ``"format": fmt``, read with
    ``weights_only=True``; ``error`` (naming ``what`` and the path) when the file is missing,
    unreadable or of another format."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist{missing_hint}")
    if path.stat().st_size == 0:
        raise error(f"cannot read {what} {path}: the file is empty (0 bytes){written_by}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, foreign pickle, ...
        remedy = f"it is not an fxquant {what}{written_by}"
        raise error(f"cannot read {what} {path}: {load_failure(exc, remedy)}") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise error(f"{path} is not an fxquant {what} (expected format '{fmt}'{written_by})")
    return payload
