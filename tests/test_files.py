"""Output files: atomic writes (a failed write keeps the old file and leaves no temporary
file), early checks of output paths and dump folders, and stale dumps removed."""

from __future__ import annotations

import errno
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import fxquant
from fxquant.cli import main
from fxquant.errors import OutputError
from fxquant.files import (
    atomic_open,
    atomic_output,
    atomic_write_bytes,
    atomic_write_text,
    check_output_dir,
    check_output_path,
)
from fxquant.pipeline import PassContext, PassManager, prepare_dump_dir
from fxquant.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture
def no_write_permission(monkeypatch):
    """Make folders read-only for this process: chmod is not enough when tests run as root."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).name == "readonly":
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


# ------------------------------------------------------------------------- atomic writes
def test_atomic_writes_replace_the_file_with_normal_permissions(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    path.chmod(0o640)
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert path.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode
    with atomic_open(path, "w") as f:
        f.write("third")
    assert path.read_text() == "third"
    assert _leftovers(tmp_path, {"a.txt"}) == []


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), RuntimeError("bug")])
def test_a_writer_that_fails_midway_keeps_the_old_file_and_no_temp(tmp_path, failure):
    path = tmp_path / "keep.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(failure)):
        with atomic_output(path) as tmp:
            tmp.write_bytes(b"half-writ")
            raise failure
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"keep.bin"}) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_an_oserror_while_writing_is_a_clear_error_and_keeps_the_old_file(tmp_path, code):
    path = tmp_path / "keep.txt"
    path.write_text("old")
    with pytest.raises(OutputError, match=r"cannot write report .*keep\.txt.*previous file is "
                                          r"unchanged"):
        with atomic_open(path, "w", "report") as f:
            f.write("new")
            raise OSError(code, os.strerror(code))
    assert path.read_text() == "old"
    assert _leftovers(tmp_path, {"keep.txt"}) == []


def test_a_file_size_limit_keeps_the_old_file_and_no_temp(tmp_path):
    """A real EFBIG: the child writes 200 kB under a 30 kB RLIMIT_FSIZE (SIGXFSZ ignored)."""
    path = tmp_path / "keep.bin"
    path.write_bytes(b"old")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    code = ("import sys; from fxquant.files import atomic_write_bytes\n"
            "from fxquant.errors import FxquantError\n"
            "try:\n    atomic_write_bytes(sys.argv[1], b'x' * 200_000, 'blob')\n"
            "except FxquantError as e:\n    print(e); sys.exit(2)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, preexec_fn=limit, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write blob" in proc.stdout and "file-size limit" in proc.stdout
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"keep.bin"}) == []


# ------------------------------------------------------------------ output path checks
def test_check_output_path_accepts_new_and_existing_files(tmp_path):
    assert check_output_path(tmp_path / "new.fxq") == tmp_path / "new.fxq"
    (tmp_path / "old.fxq").write_bytes(b"x")
    check_output_path(tmp_path / "old.fxq")
    assert _leftovers(tmp_path, {"old.fxq"}) == []  # the writability probe is removed


def test_check_output_path_names_what_is_wrong_and_what_is_valid(tmp_path,
                                                                 no_write_permission):
    with pytest.raises(OutputError, match=r"compiled model .*folder .*missing does not exist; "
                                          r"create it first"):
        check_output_path(tmp_path / "missing" / "m.fxq", "compiled model")
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_path(tmp_path / "afile" / "m.fxq")
    with pytest.raises(OutputError, match=r"is an existing folder; give a file path, e\.g\."):
        check_output_path(tmp_path)
    (tmp_path / "readonly").mkdir()
    with pytest.raises(OutputError, match="folder .*readonly is not writable"):
        check_output_path(tmp_path / "readonly" / "m.fxq")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(folder / "m.fxq")
    finally:
        folder.chmod(0o755)


def test_check_output_dir(tmp_path, no_write_permission):
    check_output_dir(tmp_path / "new")  # created later, inside an existing folder
    with pytest.raises(OutputError, match="does not exist"):
        check_output_dir(tmp_path / "a" / "b")
    (tmp_path / "f.txt").write_text("")
    with pytest.raises(OutputError, match=r"dump folder .*f\.txt is a file, not a folder"):
        check_output_dir(tmp_path / "f.txt", "dump folder")
    (tmp_path / "readonly").mkdir()
    with pytest.raises(OutputError, match="not writable"):
        check_output_dir(tmp_path / "readonly")


# ---------------------------------------------------------------- compile --out, save
@pytest.fixture
def no_prepare(monkeypatch):
    def prepare(*args, **kwargs):
        raise AssertionError("the output path must be checked before any work")

    monkeypatch.setattr("fxquant.workflow.prepare", prepare)


@pytest.mark.parametrize("out, dump, message", [
    ("missing/m.fxq", None, "folder .*missing does not exist"),
    ("readonly/m.fxq", None, "readonly is not writable"),
    (".", None, "is an existing folder"),
    ("m.fxq", "afile", r"dump folder \(--dump-dir\) .*afile is a file"),
    ("m.fxq", "missing/dumps", "folder .*missing does not exist"),
])
def test_compile_checks_out_and_dump_dir_before_compiling(tmp_path, capsys, no_prepare,
                                                          no_write_permission, out, dump,
                                                          message):
    (tmp_path / "readonly").mkdir()
    (tmp_path / "afile").write_text("")
    argv = ["compile", "--model", "fsrcnn", "--scale", "4", "--out", str(tmp_path / out)]
    if dump:
        argv += ["--dump-dir", str(tmp_path / dump)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxquant compile: error: ") and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("command", ["inspect", "report"])
def test_inspect_and_report_check_out_before_any_work(tmp_path, capsys, no_prepare, command,
                                                      monkeypatch):
    monkeypatch.setattr("fxquant.report.load_models", lambda **kwargs: 1 / 0)
    assert main([command, "--model", "fsrcnn", "--scale", "4", "--recipe", "minmax-w8a8",
                 "--out", str(tmp_path / "missing" / "x.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fxquant {command}: error: cannot write ") and "does not exist" in err


def test_save_image_is_atomic_and_keeps_the_format(tmp_path, monkeypatch):
    import numpy as np

    from fxquant.data.images import load_image, save_image

    path = tmp_path / "a.png"
    save_image(path, np.zeros((4, 4, 3), np.uint8))
    monkeypatch.setattr("fxquant.files.os.replace",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OutputError, match="cannot write image"):
        save_image(path, np.full((4, 4, 3), 255, np.uint8))
    monkeypatch.undo()
    assert load_image(path).max() == 0 and _leftovers(tmp_path, {"a.png"}) == []


def test_save_that_fails_midway_keeps_the_old_model(tiny_sr, calib, tmp_path, monkeypatch):
    gm = fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib)
    path = tmp_path / "keep.fxq"
    fxquant.save(gm, path)
    old = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("fxquant.files.os.fsync", full)
    with pytest.raises(OutputError, match="compiled model .*disk or quota full"):
        fxquant.save(gm, path)
    assert path.read_bytes() == old
    assert _leftovers(tmp_path, {"keep.fxq"}) == []
    monkeypatch.undo()
    fxquant.load(path, tiny_sr)  # still a valid compiled model


@pytest.mark.data
def test_compile_over_a_good_file_under_a_size_limit_keeps_it(data, tmp_path):
    """`ulimit -f 30; fxquant compile ... --out keep.fxq` over an existing good keep.fxq."""
    keep = tmp_path / "keep.fxq"
    argv = [sys.executable, "-m", "fxquant.cli", "compile", "--model", "fsrcnn", "--scale", "4",
            "--out", str(keep)]
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    good = keep.read_bytes()
    assert len(good) > 30 * 1024

    def limit():  # bash's ulimit -f 30 (1024-byte blocks); the CLI ignores SIGXFSZ itself
        resource.setrlimit(resource.RLIMIT_FSIZE, (30 * 1024, 30 * 1024))

    proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=limit, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fxquant compile: error: cannot write compiled model" in proc.stderr
    assert "previous file is unchanged" in proc.stderr and "Traceback" not in proc.stderr
    assert keep.read_bytes() == good
    assert _leftovers(tmp_path, {"keep.fxq"}) == []


# ----------------------------------------------------------------------------- dumps
def test_a_reused_dump_folder_loses_the_previous_runs_dumps_only(tiny_sr, calib, tmp_path):
    dumps = tmp_path / "dumps"
    ctx = PassContext(Recipe(), calib=calib)
    PassManager("trace,observe,calibrate,quantize,verify", dump_dir=dumps).run(tiny_sr, ctx)
    (dumps / "05-verify.dot").write_text("from a GraphDumper run")
    (dumps / "notes.txt").write_text("mine")
    (dumps / "01-mything.txt").write_text("not a pass name: not fxquant's")
    PassManager("trace,verify", dump_dir=dumps).run(tiny_sr, PassContext(Recipe()))
    assert sorted(p.name for p in dumps.iterdir()) == [
        "00-trace.txt", "01-mything.txt", "01-verify.txt", "notes.txt"]


def test_dump_dir_that_is_a_file_fails_before_any_pass(tiny_sr, tmp_path):
    (tmp_path / "dumps").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        prepare_dump_dir(tmp_path / "dumps")
    with pytest.raises(OutputError, match="does not exist"):
        PassManager("trace", dump_dir=tmp_path / "no" / "dumps").run(tiny_sr,
                                                                      PassContext(Recipe()))


def test_a_tools_recorded_command_is_quoted_for_the_shell():
    from fxquant.markdown import tool_command

    assert tool_command("train_heap.py", ["--steps", "12"]) == "python tools/train_heap.py --steps 12"
    # an argument with a space stays one argument when the recorded command is pasted back
    assert tool_command("bench.py", ["--variants", "fp32_eager,lowered cpu"]) == \
        "python tools/bench.py --variants 'fp32_eager,lowered cpu'"
    assert tool_command("train_layout.py", []) == "python tools/train_layout.py"
