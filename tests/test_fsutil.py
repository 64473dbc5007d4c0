import os
import stat

import pytest

from genlab.fsutil import atomic_dir, atomic_file, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_get_the_umask_mode_not_tempfiles_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "b.txt").write_text("y")
        with atomic_file(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"z")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o644 and _mode(tmp_path / "c.bin") == 0o644
    assert _mode(tmp_path / "folder") == 0o755
    assert (tmp_path / "folder" / "b.txt").read_text() == "y"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path  # writers that go by the extension work
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
