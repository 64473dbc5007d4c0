"""Version registry: lineage, promotion, rejection, rollback, audit log, two processes at once."""

from __future__ import annotations

import sqlite3
import os
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path

import pytest

from genlab.errors import DataError, InvalidParameterError
from genlab.feedback.registry import Registry
from genlab.feedback.store import FeedbackStore


@pytest.fixture
def folders(tmp_path):
    """A base model folder and three adapter folders (the registry only needs them to exist)."""
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    adapters = []
    for i in range(1, 4):
        (tmp_path / "runs" / f"a{i}").mkdir(parents=True)
        adapters.append(tmp_path / "runs" / f"a{i}")
    return base, adapters


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "registry.db") as r:
        yield r


def chain(reg, base, adapters, n):
    """v1 serving the base, then n candidates each trained from the one before."""
    parent = reg.ensure_initial(base)["id"]
    out = []
    for a in adapters[:n]:
        v = reg.register(base, adapter=a, parent=parent, method="dpo")
        out.append(v)
        parent = v["id"]
    return out


def test_ensure_initial_registers_v1_once(reg, folders):
    base, _ = folders
    assert reg.current() is None and reg.serving_id() is None and reg.list() == []
    v1 = reg.ensure_initial(base)
    assert (v1["id"], v1["name"], v1["status"], v1["adapter"], v1["parent"]) == (1, "v1", "promoted", None, None)
    assert v1["base"] == str(base.resolve())
    assert reg.serving_id() == 1 and reg.current() == v1
    assert reg.ensure_initial(base) == v1 and len(reg.list()) == 1  # second call: nothing new


def test_register_stores_absolute_paths_and_decodes_json(reg, folders, tmp_path, monkeypatch):
    base, adapters = folders
    reg.ensure_initial(base)
    monkeypatch.chdir(tmp_path)
    data = {"feedback_ids": [3, 97], "train": 60, "heldout": 20, "sha256": "ab" * 32}
    v = reg.register(Path("models/base"), adapter=Path("runs/a1"), parent="v1", method="kto", data=data,
                     metrics={"win_rate": 0.71, "reward_margin": 1.5}, note="trained on 60 ratings")
    assert v["name"] == "v2" and v["status"] == "candidate" and v["parent"] == 1 and v["method"] == "kto"
    assert v["adapter"] == str(adapters[0].resolve()) and Path(v["adapter"]).is_absolute()
    assert v["base"] == str(base.resolve())
    assert v["data"] == data and v["metrics"] == {"win_rate": 0.71, "reward_margin": 1.5}
    assert reg.get(2) == reg.get("v2") == reg.get("2") == v
    assert reg.serving_id() == 1  # a candidate does not serve
    with pytest.raises(LookupError, match="v9"):
        reg.get("v9")
    with pytest.raises(LookupError):
        reg.register(base, parent=42)


def test_paths_must_exist_and_parameters_are_checked(reg, folders, tmp_path):
    base, _ = folders
    with pytest.raises(DataError, match="nope"):
        reg.register(tmp_path / "nope")
    reg.ensure_initial(base)
    with pytest.raises(DataError, match="missing-adapter"):
        reg.register(base, adapter=tmp_path / "missing-adapter")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="file.txt.*not a folder"):
        reg.register(base, adapter=tmp_path / "file.txt")
    with pytest.raises(InvalidParameterError, match="method"):
        reg.register(base, method="magic")
    with pytest.raises(InvalidParameterError, match="status"):
        reg.register(base, status="serving")
    with pytest.raises(InvalidParameterError, match="JSON"):
        reg.register(base, data={"bad": object()})
    assert [v["name"] for v in reg.list()] == ["v1"]  # nothing half-registered


def test_promote_moves_the_serving_pointer(reg, folders):
    base, adapters = folders
    v2, v3, _ = chain(reg, base, adapters, 3)
    p = reg.promote("v2", note="win rate 0.74 >= 0.55")
    assert p["status"] == "promoted" and p["note"] == "win rate 0.74 >= 0.55"
    assert reg.serving_id() == 2 and reg.current()["name"] == "v2"
    reg.promote(v3["id"])
    assert reg.serving_id() == 3
    statuses = {v["name"]: v["status"] for v in reg.list()}
    assert statuses == {"v1": "promoted", "v2": "promoted", "v3": "promoted", "v4": "candidate"}
    assert [v["name"] for v in reg.history()] == ["v1", "v2", "v3"]


def test_promoting_a_rejected_version_needs_force(reg, folders):
    base, adapters = folders
    v2, *_ = chain(reg, base, adapters, 1)
    r = reg.reject("v2", "win rate 0.41 < 0.55", metrics={"win_rate": 0.41})
    assert r["status"] == "rejected" and r["note"] == "win rate 0.41 < 0.55" and r["metrics"] == {"win_rate": 0.41}
    with pytest.raises(InvalidParameterError, match=r"v2 was rejected \(win rate 0.41 < 0.55\)"):
        reg.promote(2)
    assert reg.serving_id() == 1 and reg.get(2)["status"] == "rejected"
    assert reg.promote(2, note="promoted by hand", force=True)["status"] == "promoted"
    assert reg.serving_id() == 2
    with pytest.raises(InvalidParameterError, match="v2 is serving"):
        reg.reject(2, "too late")  # the serving version cannot be rejected under the server
    with pytest.raises(InvalidParameterError, match="reason"):
        reg.reject(1, "  ")


def test_rollback_one_step_two_steps_and_past_the_first(reg, folders):
    base, adapters = folders
    for v in chain(reg, base, adapters, 3):
        reg.promote(v["id"])
    assert reg.serving_id() == 4
    back = reg.rollback(note="users complained")
    assert back["name"] == "v3" and reg.serving_id() == 3 and reg.get(4)["status"] == "retired"
    assert reg.rollback()["name"] == "v2" and reg.serving_id() == 2 and reg.get(3)["status"] == "retired"
    reg.promote(4, note="fixed after all")  # a retired version may serve again; the history follows
    assert reg.rollback()["name"] == "v2"
    assert reg.rollback()["name"] == "v1" and reg.serving_id() == 1
    with pytest.raises(InvalidParameterError, match="nothing to roll back to"):
        reg.rollback()
    assert reg.serving_id() == 1 and [v["name"] for v in reg.history()] == ["v1"]


def test_rollback_in_an_empty_registry_is_an_error(reg):
    with pytest.raises(InvalidParameterError, match="nothing to roll back to"):
        reg.rollback()


def test_lineage_walks_parents_to_the_root(reg, folders):
    base, adapters = folders
    chain(reg, base, adapters, 3)
    reg.register(base, adapter=adapters[0], parent=2, method="sft")  # v5: a sibling of v3
    assert [v["name"] for v in reg.lineage("v4")] == ["v4", "v3", "v2", "v1"]
    assert [v["name"] for v in reg.lineage(5)] == ["v5", "v2", "v1"]
    assert [v["name"] for v in reg.lineage(1)] == ["v1"]
    with pytest.raises(LookupError):
        reg.lineage("v7")


def test_events_are_an_ordered_audit_log(reg, folders):
    base, adapters = folders
    v2, v3 = chain(reg, base, adapters, 2)
    reg.promote(2, note="won")
    reg.reject(3, "lost")
    reg.rollback()
    log = [(e["version"], e["action"], e["detail"]) for e in reg.events()]
    assert log == [
        (1, "register", "serving when the registry started"), (1, "promote", "serving when the registry started"),
        (2, "register", None), (3, "register", None),
        (2, "promote", "won"), (3, "reject", "lost"), (2, "rollback", "v2 -> v1"),
    ]
    ids = [e["id"] for e in reg.events()]
    created = [e["created"] for e in reg.events()]
    assert ids == sorted(ids) and created == sorted(created)
    assert [e["action"] for e in reg.events("v2")] == ["register", "promote", "rollback"]


def test_a_registry_belongs_to_one_base(reg, folders, tmp_path):
    base, _ = folders
    other = tmp_path / "models" / "other"
    other.mkdir()
    reg.ensure_initial(base)
    with pytest.raises(InvalidParameterError, match="belongs to base model .*base, not .*other"):
        reg.ensure_initial(other)
    with pytest.raises(InvalidParameterError, match="belongs to base model"):
        reg.register(other)
    assert reg.ensure_initial(base / ".." / "base")["name"] == "v1"  # the same folder, spelled differently


def test_reopen_keeps_versions_pointer_and_history(tmp_path, folders):
    base, adapters = folders
    path = tmp_path / "registry.db"
    with Registry(path) as r:
        for v in chain(r, base, adapters, 2):
            r.promote(v["id"], note=f"promote {v['name']}")
        before = (r.list(), r.events())
    with Registry(path) as r:
        assert (r.list(), r.events()) == before
        assert r.serving_id() == 3 and r.current()["note"] == "promote v3"
        assert r.rollback()["name"] == "v2"  # the history is rebuilt from the stored events
    with Registry(path) as r:
        assert r.serving_id() == 2 and r.get(3)["status"] == "retired"
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unreadable_files_are_data_errors_naming_the_file(tmp_path):
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not an SQLite database\n" * 200)
    with pytest.raises(DataError, match="corrupt.db"):
        Registry(bad)
    newer = tmp_path / "newer.db"
    with closing(sqlite3.connect(newer)) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(DataError, match=r"newer.db.*schema 99 is newer"):
        Registry(newer)
    FeedbackStore(tmp_path / "feedback.db").close()  # the feedback db given by mistake
    with pytest.raises(DataError, match=r"feedback.db.*not a genlab version registry"):
        Registry(tmp_path / "feedback.db")
    with closing(sqlite3.connect(tmp_path / "feedback.db")) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "versions" not in tables  # left untouched


CHILD = textwrap.dedent("""
    import sys
    from genlab.feedback.registry import Registry

    path, base, adapter = sys.argv[1:4]
    with Registry(path) as r:
        print("ready", flush=True)
        sys.stdin.readline()                  # phase 1: promote v2 while the parent polls
        r.promote("v2", note="from the improve job")
        sys.stdin.readline()                  # phase 2: write while the parent writes too
        parent = 2
        for i in range(15):
            v = r.register(base, adapter=adapter, parent=parent, method="dpo", data={"child": i})
            r.promote(v["id"])
            parent = v["id"]
        print("last", parent, flush=True)
""")


def test_two_processes_poll_and_write_concurrently(tmp_path, folders):
    base, adapters = folders
    path = tmp_path / "registry.db"
    with Registry(path) as r:  # the "server": a long-lived connection that polls
        r.ensure_initial(base)
        r.register(base, adapter=adapters[0], parent=1, method="dpo")
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(base), str(adapters[1])],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            assert r.serving_id() == 1
            child.stdin.write("go\n")
            child.stdin.flush()
            deadline = time.time() + 5
            while r.serving_id() == 1 and time.time() < deadline:
                time.sleep(0.01)
            assert r.serving_id() == 2 and r.current()["note"] == "from the improve job"
            child.stdin.write("go\n")
            child.stdin.flush()
            mine = [r.register(base, adapter=adapters[2], parent=1, method="kto")["id"] for _ in range(15)]
            seen = {r.serving_id() for _ in range(50)}
            out, err = child.communicate(timeout=20)
        finally:
            if child.poll() is None:
                child.kill()
        assert child.returncode == 0, err
        last = int(out.split()[-1])
        versions = r.list()
        assert [v["id"] for v in versions] == list(range(1, 33))  # 2 + 15 + 15, no id lost or shared
        assert [v["name"] for v in versions] == [f"v{i}" for i in range(1, 33)]
        theirs = {v["id"] for v in versions if v["data"]}
        assert len(theirs) == 15 and not theirs & set(mine) and {1, 2} | theirs | set(mine) == set(range(1, 33))
        assert r.serving_id() == last and seen <= {v["id"] for v in versions}
        assert len(r.history()) == 17  # v1, v2 and the child's 15 promotions
        assert [v["data"]["child"] for v in r.lineage(last)[:-2]] == list(range(14, -1, -1))


def test_versions_promote_rollback_commands(tmp_path):
    for name in ("base", "a2"):
        (tmp_path / name).mkdir()
    db = tmp_path / "registry.db"
    with Registry(db) as r:
        r.ensure_initial(tmp_path / "base")
        r.register(tmp_path / "base", tmp_path / "a2", parent=1, method="dpo", note="gate: won")

    def genlab(*args):
        return subprocess.run([sys.executable, "-m", "genlab.cli", *map(str, args), "--registry", db],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "250"})

    assert "serving v2" in genlab("promote", "v2").stderr
    listed = genlab("versions")
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.startswith("│")}
    assert listed.returncode == 0 and "yes" in rows["v2"] and "promoted" in rows["v2"] and "yes" not in rows["v1"]
    assert "serving v1 again" in genlab("rollback").stderr
    failed = genlab("rollback")
    assert failed.returncode == 2 and "nothing to roll back to" in failed.stderr
