"""Incremental searcher state (noah_ray.store.statelog): a snapshot plus one small record per result,
exact on resume (local and S3), constant bytes per result, the old single-file format still
read, and nothing lost when the process is SIGKILLed.  No Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from noah_ray.errors import ConfigError
from noah_ray.evolution import DONE, AgingEvolutionEngine, EvolutionEngine, NSGA2Engine, RandomEngine, TargetObjective
from noah_ray.search.searcher import NoahSearcher
from noah_ray.search.store import SearchStore
from noah_ray.space import ModuleSpace, SearchSpace, SubnetConfig
from noah_ray.space.budget import ParamLimit
from noah_ray.space.kinds import BackboneShape
from noah_ray.store import storage

SPACE = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}, num_layers=6)
LIMIT = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))
OBJECTIVE = TargetObjective.random(SPACE, LIMIT, seed=7)
KW = {"population": 8, "generations": 3, "seed": 0}
EVO_KW = {**KW, "top_k": 3, "mutations": 3, "crossovers": 3}
V1_STATE = Path(__file__).parent / "data" / "search_state_v1.json"   # written by noah_ray before this format


def make(cls, store, **kw):
    s = NoahSearcher(cls(SPACE, LIMIT, **{**(KW if cls in (RandomEngine, NSGA2Engine) else EVO_KW), **kw}), store=store)
    s.extra_state = {"settings": {"population": s.engine.population}, "attempt": 0, "run_id": store.run_id}
    store.save_state(s.get_state())
    return s


def store_at(uri: str, endpoint: str | None = None, run: str = "r1", compact: int | None = None) -> SearchStore:
    st = SearchStore(uri, endpoint, run, "job", "synthetic", "evolution")
    if compact is not None:
        st.state_log.min_compact_bytes = compact
    return st


def step(searcher, running: list, i: int, concurrency: int = 3) -> int:
    """Fill up to ``concurrency`` trials, then finish the oldest; returns the next trial index."""
    while len(running) < concurrency and isinstance(cfg := searcher.suggest(f"t{i}"), dict):
        running.append((f"t{i}", cfg))
        i += 1
    tid, cfg = running.pop(0)
    searcher.on_trial_complete(tid, {"val_acc": OBJECTIVE(SubnetConfig.from_dict(cfg["subnet"]))})
    return i


def finish(searcher, start: int, concurrency: int) -> list[str]:
    """Run ``searcher`` to its end; returns the config keys it had scored, in order."""
    told, running, i = [], [], start
    while not searcher.finished:
        while len(running) < concurrency and isinstance(cfg := searcher.suggest(f"t{i}"), dict):
            running.append((f"t{i}", cfg))
            i += 1
        tid, cfg = running.pop(0)
        told.append(cfg["config_key"])
        searcher.on_trial_complete(tid, {"val_acc": OBJECTIVE(SubnetConfig.from_dict(cfg["subnet"]))})
    return told


@pytest.mark.parametrize("cls", (EvolutionEngine, AgingEvolutionEngine, RandomEngine, NSGA2Engine))
def test_replayed_log_equals_the_live_state_after_every_result(tmp_path, cls):
    st = store_at(str(tmp_path), compact=2000)         # small: several compactions in 24 results
    s = make(cls, st)
    running, i, snapshots = [], 0, 0
    while not s.finished:
        i = step(s, running, i)
        fresh = store_at(str(tmp_path)).load_state()  # what a new process would read
        assert fresh == json.loads(json.dumps(s.get_state()))
        snapshots += not (tmp_path / "state" / "r1" / "log.jsonl").exists()
    assert len(s.engine.candidates) == 24 and snapshots >= 2


def test_bytes_per_result_stay_constant_while_the_full_state_grows(tmp_path):
    st = store_at(str(tmp_path))
    s = make(EvolutionEngine, st, generations=50)
    running, i, records = [], 0, []
    for _ in range(396):
        before = st.state_log.stats.bytes
        i = step(s, running, i)
        records.append(st.state_log.stats.bytes - before)
    full = len(json.dumps(s.get_state()))
    early, late = max(records[20:60]), max(records[-40:])
    assert late < 1.3 * early                           # a record does not grow with the candidates
    assert full > 15 * late                          # what the old per-result rewrite wrote each time
    lines = (tmp_path / "state" / "r1" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 396 and st.state_log.stats.calls == 396 + 2   # one append per result + the first snapshot


def test_s3_log_is_one_small_object_per_result_and_compacts(s3_bucket):
    endpoint, bucket = s3_bucket
    uri = f"s3://{bucket}/search"
    st = store_at(uri, endpoint, compact=4000)
    s = make(AgingEvolutionEngine, st)
    running, i = [], 0
    for _ in range(14):
        i = step(s, running, i)
    state_dir = storage.resolve(uri, endpoint).join("state", "r1")
    segs = storage.list_files(state_dir.join("log"), ".json")
    snap_seq = json.loads(storage.read_text(state_dir.join("snapshot.json")))["seq"]
    assert 0 < snap_seq and len(segs) == 14 - snap_seq  # compacted, the newer results one object each
    assert all(len(storage.read_bytes(f)) < 6000 for f in segs)
    assert store_at(uri, endpoint).load_state() == json.loads(json.dumps(s.get_state()))


def test_the_old_single_file_state_still_loads_and_resumes(tmp_path):
    (tmp_path / "state").mkdir()
    shutil.copy(V1_STATE, tmp_path / "state" / "r1.json")
    old = json.loads(V1_STATE.read_text())
    scored = {SubnetConfig.from_dict(c["config"]).key() for c in old["engine"]["candidates"] if c["status"] == DONE}
    assert len(scored) == 11 and old["engine"]["version"] == 1
    st = store_at(str(tmp_path))
    state = st.load_state()
    assert state == old
    s = NoahSearcher(EvolutionEngine(SPACE, LIMIT, **EVO_KW), store=st)
    s.set_state(state, requeue_running=True)
    st.save_state(s.get_state())                         # as run_search does: a format-2 snapshot
    told = finish(s, 100, 2)
    assert len(told) == 24 - 11 and not set(told) & scored        # nothing scored twice
    final = store_at(str(tmp_path)).load_state()
    assert sum(c["status"] == DONE for c in final["engine"]["candidates"]) == 24
    assert json.loads((tmp_path / "state" / "r1" / "snapshot.json").read_text())["format"] == 2


def test_a_torn_last_line_is_dropped_and_the_log_never_continues_after_it(tmp_path):
    st = store_at(str(tmp_path))
    s = make(AgingEvolutionEngine, st)
    running, i = [], 0
    for _ in range(5):
        i = step(s, running, i)
    good = store_at(str(tmp_path)).load_state()
    log = tmp_path / "state" / "r1" / "log.jsonl"
    with log.open("ab") as f:
        f.write(b'{"seq": 6, "delta": {"candi')            # killed mid-append
    st2 = store_at(str(tmp_path))
    assert st2.load_state() == good
    s2 = NoahSearcher(AgingEvolutionEngine(SPACE, LIMIT, **EVO_KW), store=st2)
    s2.set_state(good)
    running2 = [r for r in running]
    step(s2, running2, 50)
    assert not log.exists()                              # the next write was a snapshot
    assert store_at(str(tmp_path)).load_state() == json.loads(json.dumps(s2.get_state()))


KILL_SCRIPT = '''
import json, sys, time
from noah_ray.evolution import AgingEvolutionEngine, ParamLimit, TargetObjective
from noah_ray.search.store import SearchStore
from noah_ray.search.searcher import NoahSearcher
from noah_ray.space import BackboneShape, ModuleSpace, SearchSpace, SubnetConfig

space = SearchSpace({m: ModuleSpace((2, 4, 6), (1, 5, 10)) for m in ("vpt", "lora", "adapter")}, 6)
limit = ParamLimit(0.01, BackboneShape(48, 3, 6, 10))
objective = TargetObjective.random(space, limit, 7)
store = SearchStore(sys.argv[1], None, "r1", "job", "synthetic", "aging")
store.state_log.min_compact_bytes = 3000            # compactions happen while it runs (and may be killed)
s = NoahSearcher(AgingEvolutionEngine(space, limit, population=8, generations=40, top_k=3, mutations=3, crossovers=3),
                 store=store)
s.extra_state = {"attempt": 0}
store.save_state(s.get_state())
running, i = [], 0
while True:
    while len(running) < 4 and isinstance(cfg := s.suggest(f"t{i}"), dict):
        running.append((f"t{i}", cfg)); i += 1
    tid, cfg = running.pop(0)
    score = objective(SubnetConfig.from_dict(cfg["subnet"]))
    s.on_trial_complete(tid, {"val_acc": score})
    print(json.dumps([cfg["candidate_id"], score]), flush=True)       # acknowledged
    time.sleep(0.002)
'''


def test_sigkill_loses_no_told_result_and_resume_scores_nothing_twice(tmp_path):
    script = tmp_path / "kill_me.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store")], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    acked = {}
    for line in proc.stdout:
        cid, score = json.loads(line)
        acked[cid] = score
        if len(acked) == 150:
            os.kill(proc.pid, signal.SIGKILL)                  # mid-run, maybe mid-write
            break
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    state = store_at(str(tmp_path / "store")).load_state()
    cands = {c["cid"]: c for c in state["engine"]["candidates"]}
    for cid, score in acked.items():                           # every acknowledged result is there
        assert cands[cid]["status"] == DONE and cands[cid]["score"] == score
    s = NoahSearcher(AgingEvolutionEngine(SPACE, LIMIT, **{**EVO_KW, "generations": 40}))
    s.set_state(state, requeue_running=True)
    done_before = {c.config.key() for c in s.engine.scored()}
    told = finish(s, 10_000, 4)
    assert len(told) == len(set(told)) and not set(told) & done_before
    assert len(s.engine.scored()) == 320 == len(done_before) + len(told)


def test_run_flags_and_noted_errors_are_in_the_log(tmp_path):
    """What the searcher changes besides the engine (``aborted``) and errors noted after a
    result reach the log; a store written without a first snapshot still reads back."""
    st = store_at(str(tmp_path))
    s = NoahSearcher(RandomEngine(SPACE, LIMIT, **KW), store=st)          # no save_state first
    s.extra_state = {"attempt": 0}
    for i in range(3):
        s.suggest(f"t{i}")
        s.on_trial_complete(f"t{i}", error=True)
    s.note_error("g000-001", "data endpoint unreachable")
    got = store_at(str(tmp_path)).load_state()
    assert s.aborted and got["aborted"] is True and got["attempt"] == 0
    cands = {c["cid"]: c for c in got["engine"]["candidates"]}
    assert [c["status"] for c in cands.values()] == ["failed"] * 3
    assert cands["g000-001"]["info"]["error"] == "data endpoint unreachable"
    assert got == json.loads(json.dumps(s.get_state()))


def test_a_truncated_snapshot_is_a_one_line_error(tmp_path):
    st = store_at(str(tmp_path))
    make(AgingEvolutionEngine, st)
    snap = tmp_path / "state" / "r1" / "snapshot.json"
    snap.write_text(snap.read_text()[:100])
    with pytest.raises(ConfigError, match=r"search state .*snapshot.json is truncated or corrupt"):
        store_at(str(tmp_path)).load_state()
