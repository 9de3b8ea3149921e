"""DemoStore: round trip, crash safety under SIGKILL, the writer lock, validation, error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robodit.datasets.store import DemoStore, StoreError, chunk_frames

KEYS = {"state": ((39,), "float32"), "action": ((4,), "float32"), "image": ((84, 84, 3), "uint8")}
TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent


def gen(i: int, lo: int = 5, hi: int = 150):
    """Episode `i`, regenerated bit-exactly from its index (the crash test's ground truth)."""
    rng = np.random.default_rng(i)
    T = int(rng.integers(lo, hi))
    arrays = {
        "state": rng.normal(size=(T, 39)).astype(np.float32),
        "action": rng.normal(size=(T, 4)).astype(np.float32),
        "image": rng.integers(0, 256, size=(T, 84, 84, 3), dtype=np.uint8),
    }
    has_actions = i % 7 != 3
    if not has_actions:
        del arrays["action"]
    instruction = None if i % 2 else f"do thing {i % 5}"
    kw = {"task": f"task{i % 3}", "instruction": instruction, "has_actions": has_actions}
    return arrays, kw


def expected(i: int, **gen_kw) -> dict[str, np.ndarray]:
    arrays, kw = gen(i, **gen_kw)
    if not kw["has_actions"]:
        arrays["action"] = np.zeros((len(arrays["state"]), 4), np.float32)
    return arrays


def assert_episode(store: DemoStore, i: int, **gen_kw) -> None:
    got, want = store.episode(i), expected(i, **gen_kw)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (i, k)
    info, (_, kw) = store.episode_info(i), gen(i, **gen_kw)
    assert {k: info[k] for k in kw} == kw
    assert info["has_language"] == (kw["instruction"] is not None)


def make(path, n: int = 0, **gen_kw) -> DemoStore:
    store = DemoStore.create(path, KEYS, fps=10, robot="sawyer", env={"simulator": "test"})
    for i in range(n):
        arrays, kw = gen(i, **gen_kw)
        assert store.append_episode(arrays, **kw) == i
    return store


def test_round_trip(tmp_path):
    path = tmp_path / "demos.zarr"
    with make(path, 8, lo=1, hi=80) as w:
        assert len(w) == 8 and w.mode == "a"
    store = DemoStore.open(path)
    lengths = [len(expected(i, lo=1, hi=80)["state"]) for i in range(8)]
    assert len(store) == 8 and store.num_frames == sum(lengths)
    assert store.episode_ends.tolist() == np.cumsum(lengths).tolist()
    assert store.episode_starts.tolist() == [0, *np.cumsum(lengths)[:-1].tolist()]
    for i in range(8):
        assert_episode(store, i, lo=1, hi=80)
    assert np.array_equal(store.episode(-1)["image"], expected(7, lo=1, hi=80)["image"])
    info = store.episode_info(2)
    assert (info["index"], info["start"], info["length"]) == (2, lengths[0] + lengths[1], lengths[2])
    assert info["end"] == info["start"] + info["length"]
    assert store.task_names == ["task0", "task1", "task2"]
    assert store.tasks[0] == {"name": "task0", "instructions": ["do thing 0", "do thing 1"]}
    assert store.episode_instruction.tolist() == [0, -1, 0, -1, 0, -1, 1, -1]
    assert store.episode_has_actions.tolist() == [i % 7 != 3 for i in range(8)]
    assert (store.fps, store.robot, store.env) == (10.0, "sawyer", {"simulator": "test"})
    assert store.keys["image"] == ((84, 84, 3), np.dtype(np.uint8))
    assert store.attrs["format"] == "robodit.demos" and store.attrs["version"] == 1
    assert np.array_equal(store.read("state", 3, 9), np.concatenate([expected(0, lo=1, hi=80)["state"],
                                                                     expected(1, lo=1, hi=80)["state"]])[3:9])
    assert store.array("image").chunks[0] == chunk_frames((84, 84, 3), "uint8") == 32
    assert chunk_frames((39,), "float32") == 2048 and chunk_frames((224, 224, 3), "uint8") == 16
    with pytest.raises(IndexError):
        store.episode(8)
    with pytest.raises(IndexError):
        store.read("state", 0, store.num_frames + 1)
    with pytest.raises(StoreError, match="not open for writing"):
        store.append_episode(*gen(0)[:1], task="x")
    assert store.nbytes_stored() > 0 and store.nbytes_uncompressed() > store.num_frames * 84 * 84 * 3
    assert "episodes=8" in repr(store)


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from test_store import gen, KEYS
from robodit.datasets.store import DemoStore
s = DemoStore.open_or_create(sys.argv[1], KEYS, fps=10, robot="sawyer")
while True:
    i = len(s)
    arrays, kw = gen(i)
    print("start", i, flush=True)
    s.append_episode(arrays, **kw)
    print("done", i, flush=True)
"""


def test_crash_safety_sigkill(tmp_path):
    """SIGKILL the writer mid-append at random moments; every committed episode survives bit-exact."""
    path, rng = tmp_path / "crash.zarr", np.random.default_rng(1234)
    script = WRITER.format(tests=str(TESTS_DIR))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_DIR), os.environ.get("PYTHONPATH", "")]))
    leftovers, verified = 0, 0
    for round_ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        starts, done = 0, -1
        want = int(rng.integers(1, 5)) if round_ % 4 else 0  # want=0: kill at any moment, even in open()
        while starts < want:
            line = proc.stdout.readline()
            assert line, f"writer died: {proc.stderr.read()}"
            starts += line.startswith("start")
            done = int(line.split()[1]) if line.startswith("done") else done
        # An append takes tens of ms, so most kills land inside one.
        time.sleep(float(rng.uniform(0.0, 0.03 if want else 1.0)))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if not path.exists():  # killed before create() renamed the new store into place
            continue
        with DemoStore.open(path) as r:
            assert len(r) >= done + 1
            shapes = [r.array(k).shape[0] for k in KEYS] + [a.shape[0] for a in r._marr.values()]
            leftovers += max(shapes[:3]) > r.num_frames or max(shapes[3:]) > len(r)
            for i in range(verified, len(r)):
                assert_episode(r, i)
            verified = len(r)
        with DemoStore.open(path, "a") as w:  # truncates the killed append's rows and temp files
            assert [w.array(k).shape[0] for k in KEYS] == [w.num_frames] * 3
            assert not list(path.rglob("*.partial"))
            i = len(w)
            arrays, kw = gen(i)
            assert w.append_episode(arrays, **kw) == i
        with DemoStore.open(path) as r:
            assert len(r) == i + 1
            assert_episode(r, i)
            verified = i + 1
    assert leftovers >= 1, "no kill landed mid-append; the test did not exercise recovery"


class _Crash(Exception):
    pass


def test_crash_at_every_store_write(tmp_path, monkeypatch):
    """Deterministic complement to the SIGKILL test: stop an append just before its k-th object write
    (LocalStore writes each object atomically, so object boundaries are the only states a kill can leave)."""
    from zarr.storage import LocalStore

    real_set, real_delete, budget = LocalStore.set, LocalStore.delete, [10**9]

    def guard(real):
        async def op(self, *args, **kw):
            budget[0] -= 1
            if budget[0] < 0:
                raise _Crash
            return await real(self, *args, **kw)
        return op

    monkeypatch.setattr(LocalStore, "set", guard(real_set))
    monkeypatch.setattr(LocalStore, "delete", guard(real_delete))
    for k in range(100):
        path = tmp_path / f"k{k}.zarr"
        make(path, 2, lo=20, hi=60).close()
        w = DemoStore.open(path, "a")
        arrays, kw = gen(2, lo=20, hi=60)
        budget[0] = k
        try:
            w.append_episode(arrays, task="new-task", instruction="new words")
            finished = True
        except _Crash:
            finished = False
        budget[0] = 10**9
        w.close()
        with DemoStore.open(path) as r:
            assert len(r) == 2 + finished
            for i in range(2):
                assert_episode(r, i, lo=20, hi=60)
            assert ("new-task" in r.task_names) == finished
        with DemoStore.open(path, "a") as w:
            arrays, kw = gen(3, lo=20, hi=60)
            w.append_episode(arrays, **kw)
        with DemoStore.open(path) as r:
            assert np.array_equal(r.episode(-1)["image"], gen(3, lo=20, hi=60)[0]["image"])
        if finished:
            assert k > 10  # an append is many object writes; each was a crash point above
            break
    else:
        pytest.fail("append never finished")


def test_truncation_never_resurrects_stale_rows(tmp_path):
    """zarr keeps a shrunk chunk's tail and shows it again after a grow; appends must overwrite it."""
    path = tmp_path / "s.zarr"
    with make(path, 2) as w:
        n = w.num_frames
        for k, (shape, dtype) in w.keys.items():  # what a killed append leaves: rows past the commit
            a = w.array(k)
            a.resize((n + 40, *shape))
            a[n:] = np.full((40, *shape), 7, dtype)
    with DemoStore.open(path, "a") as w:
        assert w.array("image").shape[0] == n
        arrays, kw = gen(5, lo=3, hi=4)  # 3 frames: shorter than the garbage left in the chunk
        w.append_episode(arrays, **kw)
        w.array("image").resize((n + 10, 84, 84, 3))  # zarr shows the old tail again past the commit...
        assert (w.array("image")[n + 3:n + 10] == 7).all()
    with DemoStore.open(path, "a") as w:  # ...but it is never data and the next writer truncates it
        assert w.array("image").shape[0] == w.num_frames == n + 3
        assert np.array_equal(w.episode(2)["image"], gen(5, lo=3, hi=4)[0]["image"])


def test_second_writer_refused_reader_ok(tmp_path):
    path = tmp_path / "lock.zarr"
    make(path, 1).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from robodit.datasets.store import DemoStore\n"
         "s = DemoStore.open(sys.argv[1], 'a'); print('locked', flush=True); time.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True, cwd=REPO_DIR)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="being written by another process"):
            DemoStore.open(path, "a")
        with DemoStore.open(path) as r:
            assert_episode(r, 0)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with DemoStore.open(path, "a") as w:  # the kernel released the dead writer's lock
        with pytest.raises(StoreError, match="another process"):
            DemoStore.open(path, "a")
        w.append_episode(*gen(1)[:1], **gen(1)[1])
    assert len(DemoStore.open(path)) == 2


def _bad_inputs():
    ok = gen(0)[0]
    yield "missing", {k: v for k, v in ok.items() if k != "state"}, "state"
    yield "extra", {**ok, "depth": ok["state"]}, "depth"
    yield "shape", {**ok, "image": ok["image"][:, :80]}, "image"
    yield "dtype", {**ok, "image": ok["image"].astype(np.float32)}, "image"
    yield "int_for_float", {**ok, "state": ok["state"].astype(np.int64)}, "state"
    nan = ok["state"].copy()
    nan[3, 1] = np.nan
    yield "nan", {**ok, "state": nan}, "state"
    yield "overflow", {**ok, "action": np.full_like(ok["action"], 1e300, dtype=np.float64)}, "action"
    yield "length", {**ok, "action": ok["action"][:-1]}, "action"
    yield "empty", {k: v[:0] for k, v in ok.items()}, "0 frames"


@pytest.mark.parametrize("case,arrays,needle", list(_bad_inputs()), ids=[c[0] for c in _bad_inputs()])
def test_validation_rejects_and_writes_nothing(tmp_path, case, arrays, needle):
    path = tmp_path / "v.zarr"
    with make(path, 1) as w:
        before = (len(w), w.num_frames, w.tasks, {k: w.array(k).shape for k in KEYS})
        with pytest.raises(ValueError, match=needle):
            w.append_episode(arrays, task="brand-new-task", instruction="new words")
        assert (len(w), w.num_frames, w.tasks, {k: w.array(k).shape for k in KEYS}) == before
        arrays, kw = gen(1)
        assert w.append_episode(arrays, **kw) == 1
    with DemoStore.open(path) as r:
        assert len(r) == 2 and "brand-new-task" not in r.task_names
        assert_episode(r, 0)
        assert_episode(r, 1)


def test_float64_is_cast_and_action_free_needs_zero_actions(tmp_path):
    with make(tmp_path / "c.zarr") as w:
        arrays = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in gen(0)[0].items()}
        w.append_episode(arrays, task="t")
        assert w.episode(0)["state"].dtype == np.float32
        assert np.array_equal(w.episode(0)["state"], gen(0)[0]["state"])
        with pytest.raises(ValueError, match="action"):
            w.append_episode(gen(0)[0], task="t", has_actions=False)
        with pytest.raises(ValueError, match="instruction"):
            w.append_episode(gen(0)[0], task="t", instruction="")


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        DemoStore.open(tmp_path / "nope.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a robodit"):
        DemoStore.open(tmp_path / "empty")
    path = tmp_path / "s.zarr"
    make(path, 1).close()
    with pytest.raises(StoreError, match="already exists"):
        DemoStore.create(path, KEYS, fps=10, robot="r")
    with pytest.raises(ValueError):
        DemoStore.open(path, "w")
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["version"] = 2
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="newer"):
        DemoStore.open(path)
    meta.write_text("{not json")
    with pytest.raises(StoreError, match="corrupt"):
        DemoStore.open(path)
    doc["attributes"]["version"] = 1
    meta.write_text(json.dumps(doc))
    (path / "meta" / "episode_task" / "zarr.json").write_text("garbage")
    with pytest.raises(StoreError, match=str(path)):
        DemoStore.open(path)
    with pytest.raises(ValueError, match="action"):
        DemoStore.create(tmp_path / "x.zarr", {"state": ((3,), "float32")}, fps=10, robot="r")


def test_overwrite_open_or_create_set_attr(tmp_path):
    path = tmp_path / "s.zarr"
    make(path, 2).close()
    with DemoStore.open_or_create(path, KEYS, fps=10, robot="sawyer") as w:
        assert len(w) == 2
        w.set_attr("env", {"simulator": "metaworld", "tasks": ["reach-v3"]})
        with pytest.raises(ValueError):
            w.set_attr("keys", {})
    assert DemoStore.open(path).env == {"simulator": "metaworld", "tasks": ["reach-v3"]}
    with pytest.raises(StoreError, match="does not match"):
        DemoStore.open_or_create(path, {**KEYS, "state": ((7,), "float32")}, fps=10, robot="sawyer")
    with pytest.raises(StoreError, match="does not match"):
        DemoStore.open_or_create(path, KEYS, fps=20, robot="sawyer")
    DemoStore.open(path, "a").close()  # the failed open_or_create released its lock
    with DemoStore.create(path, KEYS, fps=5, robot="panda", overwrite=True) as w:
        assert len(w) == 0 and w.robot == "panda"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a robodit"):
        DemoStore.create(tmp_path / "other", KEYS, fps=5, robot="r", overwrite=True)
    assert (tmp_path / "other" / "precious.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "s.zarr"]  # no temp dirs left


def _legacy(path, seeds_used):
    """A store as written before `meta/episode_seed`: seeds only in the env attr, outside the commit."""
    import shutil

    with make(path, 3, lo=2, hi=5) as w:
        w.set_attr("env", {"simulator": "test", "seeds_used": seeds_used})
    shutil.rmtree(path / "meta" / "episode_seed")
    return path


def test_episode_seed_is_committed_with_the_episode(tmp_path):
    with make(tmp_path / "s.zarr") as w:
        arrays, kw = gen(0, lo=2, hi=5)
        w.append_episode(arrays, **kw, seed=11)
        w.append_episode(arrays, **kw)  # converted data: no seed
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            w.append_episode(arrays, **kw, seed=-3)
    with DemoStore.open(tmp_path / "s.zarr") as r:
        assert r.episode_seed.tolist() == [11, -1] and r.seeds_used == [11]
        assert r.episode_info(0)["seed"] == 11 and r.episode_info(1)["seed"] is None


@pytest.mark.parametrize("seeds_used, backfilled", [([4, 5, 6], [4, 5, 6]), ([4, 9, 5, 6], [-1, -1, -1])])
def test_old_stores_keep_their_seed_record(tmp_path, seeds_used, backfilled):
    """Read-only: no seeds per episode, the old list still counts as used. A writer adds the array, filled from
    the list only when it names one seed per episode (a killed collection left an extra, unplaceable seed)."""
    path = _legacy(tmp_path / "old.zarr", seeds_used)
    with DemoStore.open(path) as r:
        assert r.episode_seed.tolist() == [-1, -1, -1] and r.seeds_used == seeds_used
    with DemoStore.open(path, "a") as w:
        assert w.episode_seed.tolist() == backfilled
        arrays, kw = gen(3, lo=2, hi=5)
        w.append_episode(arrays, **kw, seed=7)
    with DemoStore.open(path) as r:
        assert r.episode_seed.tolist() == [*backfilled, 7] and set(r.seeds_used) == {*seeds_used, 7}
        for i in range(3):
            assert_episode(r, i, lo=2, hi=5)
