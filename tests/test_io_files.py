"""`sact.io.files.prepare_outputs`: the one place the output-folder rules are applied."""

import os
import subprocess
import sys

import pytest

from sact.errors import OutputExistsError
from sact.io.files import _HOST, atomic_write_bytes, prepare_outputs


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp(folder, pid, host=_HOST):
    path = folder / f".m.json.sact-tmp.{host}.{pid}.abc123.tmp"
    path.write_bytes(b"half")
    return path


def test_an_existing_file_is_refused_without_overwrite_and_nothing_is_touched(tmp_path):
    (tmp_path / "a.json").write_text("mine")
    stale = _temp(tmp_path, _dead_pid())
    with pytest.raises(OutputExistsError, match=r"--out file .*a\.json already exists; pass --overwrite"):
        with prepare_outputs(tmp_path, files=["a.json", "b.json"]):
            pytest.fail("the body must not run")
    assert (tmp_path / "a.json").read_text() == "mine" and stale.exists()  # refused before anything was removed
    with prepare_outputs(tmp_path, files=["a.json"], overwrite=True) as out:
        atomic_write_bytes(out / "a.json", b"new")
    assert (tmp_path / "a.json").read_text() == "new" and not stale.exists()


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(OutputExistsError, match="--out .*taken is an existing file, not a folder"):
        with prepare_outputs(tmp_path / "taken", files=["x.json"]):
            pass
    with pytest.raises(OutputExistsError, match="--out .*taken/x.json: folder .*taken is an existing file"):
        with prepare_outputs(None, files=[tmp_path / "taken" / "x.json"], what="--out"):  # one output file
            pass
    assert (tmp_path / "taken").read_text() == "mine"


def test_only_stale_temporaries_of_sact_processes_are_removed(tmp_path):
    dead = _dead_pid()
    stale = _temp(tmp_path, dead)
    live = _temp(tmp_path, os.getpid())  # this process: still writing
    other_host = _temp(tmp_path, dead, host="otherhost")  # cannot tell whether it runs
    stale_lock = tmp_path / ".sact-train.lock"
    stale_lock.write_text(f"{_HOST} {dead}\n")
    mine = [tmp_path / ".notes.tmp", tmp_path / "m.json", tmp_path / f".m.json.sact-tmp.x.{dead}.tmp"]
    for path in mine:
        path.write_text("not ours")
    with prepare_outputs(tmp_path):
        assert not stale.exists() and not stale_lock.exists()
    assert live.exists() and other_host.exists() and all(p.read_text() == "not ours" for p in mine)
    stale = _temp(tmp_path, dead)
    with prepare_outputs(tmp_path, stale=False):
        pass
    assert stale.exists()
    with prepare_outputs(None, files=[tmp_path / "out.json"]):  # one output file: its folder is cleaned
        pass
    assert not stale.exists()


def test_a_folder_it_created_is_removed_when_left_empty_and_others_are_kept(tmp_path):
    with pytest.raises(RuntimeError):
        with prepare_outputs(tmp_path / "a" / "b", files=["x.json"]):
            raise RuntimeError("failed before writing")
    assert list(tmp_path.iterdir()) == []  # a/b and a: created by the run, empty
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with prepare_outputs(tmp_path / "kept", lock="demo"):
            raise RuntimeError("failed before writing")
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []  # existed before: stays
    with prepare_outputs(tmp_path / "c" / "d") as out:
        atomic_write_bytes(out / "x.json", b"{}")
    assert (tmp_path / "c" / "d" / "x.json").read_bytes() == b"{}"


def test_the_lock_is_held_for_the_body_only(tmp_path):
    out = tmp_path / "run"
    with prepare_outputs(out, lock="train"):
        lock = out / ".sact-train.lock"
        assert lock.read_text().split() == [_HOST, str(os.getpid())]
        with pytest.raises(OutputExistsError, match="is being written by another `sact train`"):
            with prepare_outputs(out, lock="train"):
                pass
        assert lock.exists()  # the refused second writer leaves the first one's lock alone
        with prepare_outputs(out):  # no lock asked: only the checks
            pass
    assert not out.exists()  # lock released, and the folder it created for the lock removed
