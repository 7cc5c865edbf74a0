"""The format lanes of ``tadsr all`` (:mod:`tadsr.cli.lanes`): how many run at once under a memory budget, when
the next one may start, and that lanes run in their own processes and report back (a failure is raised after
the other lanes finish). The real parallel run is the default tier's ``tadsr all --smoke``
(tests/test_every_format.py)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from tadsr.cli import lanes


def test_jobs_follow_the_cpus_and_the_memory_budget() -> None:
    est = {"onnx": 2.0, "executorch": 3.0, "coreml": 4.0}
    assert lanes.choose_jobs(est, budget_gb=20, cpus=2) == 2  # one per CPU
    assert lanes.choose_jobs(est, budget_gb=20, cpus=16) == 3  # never more than the lanes
    assert lanes.choose_jobs(est, budget_gb=5.5, cpus=16) == 2  # the two smallest fit, not three
    assert lanes.choose_jobs(est, budget_gb=1, cpus=16) == 1  # nothing fits: one at a time
    assert lanes.choose_jobs(est, budget_gb=1, cpus=16, requested=3) == 3  # asked for
    assert lanes.choose_jobs({"onnx": 1.0}, budget_gb=20, cpus=2, requested=4) == 1


def test_a_lane_starts_only_while_the_estimates_fit() -> None:
    est = {"onnx": 2.0, "executorch": 13.0, "coreml": 19.0}
    assert lanes.admit([], "coreml", est, budget_gb=12, jobs=2)  # alone, even over the budget
    assert not lanes.admit(["executorch"], "onnx", est, budget_gb=14, jobs=2)  # 15 GB > 14
    assert lanes.admit(["executorch"], "onnx", est, budget_gb=15, jobs=2)
    assert not lanes.admit(["executorch", "onnx"], "coreml", est, budget_gb=100, jobs=2)  # jobs full


def test_official_size_lanes_do_not_run_side_by_side_on_24_gb() -> None:
    """At official size (173.9 M parameters) each lane's estimate is the peak measured there (12-19 GB): on this
    24 GB machine they run one at a time; the bundled model's (5.2 M) run two at once on two cores."""
    official = {f: lanes.lane_memory_gb(f, 173.9) for f in ("onnx", "executorch", "coreml")}
    assert all(11.5 < gb < 20.5 for gb in official.values())
    assert lanes.choose_jobs(official, budget_gb=0.85 * 24, cpus=2) == 1
    bundled = {f: lanes.lane_memory_gb(f, 5.2) for f in ("onnx", "executorch", "coreml")}
    assert lanes.choose_jobs(bundled, budget_gb=0.85 * 24, cpus=2) == 2


def test_lanes_run_in_their_own_processes_and_report_back(caplog: pytest.LogCaptureFixture) -> None:
    # the worker is LaneResult itself: it records the format and the threads it was given
    est = {"onnx": 1.0, "executorch": 1.0, "coreml": 30.0}
    with caplog.at_level(logging.INFO, logger="tadsr.cli.lanes"):
        done = lanes.run_lanes(["onnx", "executorch", "coreml"], lanes.LaneResult,
                               lambda fmt, threads: (fmt, {"threads": threads}), estimates=est, budget_gb=10,
                               jobs=2, poll_s=0.05)  # fmt: skip
    assert list(done) == ["onnx", "executorch", "coreml"]
    assert all(r.fmt == f and r.timings["threads"] >= 1 and r.estimate_gb == est[f] for f, r in done.items())
    started = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().endswith("GB)")
               and "started" in r.getMessage()]  # fmt: skip
    assert started == ["executorch", "coreml", "onnx"]  # longest first
    assert "exceeds the memory budget" in caplog.text  # coreml's 30 GB ran alone


def _fail_or_finish(fmt: str, marker: str) -> lanes.LaneResult:
    if fmt == "onnx":
        raise ValueError("the onnx lane broke")
    time.sleep(1.0)  # still running when the onnx lane fails
    with open(marker, "w") as f:
        f.write(fmt)
    return lanes.LaneResult(fmt)


def test_a_failing_lane_lets_the_others_finish_then_raises(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """The other lanes' work is not thrown away (session 19: the ExecuTorch lane's failure killed the ONNX lane
    mid-INT8); the run still fails with the lane's own error."""
    marker = tmp_path / "executorch.done"
    with caplog.at_level(logging.INFO, logger="tadsr.cli.lanes"), pytest.raises(ValueError, match="onnx lane"):
        lanes.run_lanes(["onnx", "executorch"], _fail_or_finish, lambda fmt, threads: (fmt, str(marker)),
                        estimates={"onnx": 1, "executorch": 1}, budget_gb=10, jobs=2, poll_s=0.05)  # fmt: skip
    assert marker.read_text() == "executorch"
    assert "lane onnx failed" in caplog.text and "finished: executorch; failed: onnx" in caplog.text


def _blas_worker(fmt: str, threads: int) -> lanes.LaneResult:
    return lanes.LaneResult(fmt, {"blas": float(os.environ.get("OPENBLAS_NUM_THREADS", "0"))})


def test_lane_processes_start_blas_with_their_thread_share() -> None:
    before = os.environ.get("OPENBLAS_NUM_THREADS")
    done = lanes.run_lanes(["onnx", "coreml"], _blas_worker, lambda fmt, threads: (fmt, threads),
                           estimates={"onnx": 1, "coreml": 1}, budget_gb=10, jobs=2, poll_s=0.05, threads=3)  # fmt: skip
    assert [r.timings["blas"] for r in done.values()] == [3.0, 3.0]
    assert os.environ.get("OPENBLAS_NUM_THREADS") == before  # the parent's environment is restored


def _share_worker(fmt: str, threads: int, seen: str) -> lanes.LaneResult:
    """The onnx lane ends once the other has read its first share (``seen`` appears; a lane process can take seconds
    to start on a loaded machine); the other then waits (up to 20 s) for its share to grow past its start."""
    first = lanes.lane_share()
    deadline = time.monotonic() + 20
    if fmt == "onnx":
        while first is not None and not os.path.exists(seen) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        with open(seen, "w") as f:
            f.write(str(first))
        while first is not None and (lanes.lane_share() or 0) <= first and time.monotonic() < deadline:
            time.sleep(0.05)
    return lanes.LaneResult(fmt, {"threads": threads, "first": first or 0, "last": lanes.lane_share() or 0})


def test_a_finished_lane_gives_its_cpus_to_the_lanes_still_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Once no lane is left to start, the lanes still running are given the CPUs of the finished ones (their next
    stage reads it, :func:`tadsr.cli.lanes.lane_share`); threads fixed by the caller are left alone."""
    monkeypatch.setattr(lanes, "usable_cpus", lambda: 4)
    est = {"onnx": 1, "coreml": 1}
    with caplog.at_level(logging.INFO, logger="tadsr.cli.lanes"):
        done = lanes.run_lanes(["onnx", "coreml"], _share_worker, lambda fmt, threads: (fmt, threads,
                                                                                        str(tmp_path / "seen1")),
                               estimates=est, budget_gb=10, jobs=2, poll_s=0.05)  # fmt: skip
    assert {f: (r.timings["threads"], r.timings["first"], r.timings["last"]) for f, r in done.items()} == {
        "onnx": (2, 2, 2), "coreml": (2, 2, 4)}  # fmt: skip
    assert "lanes coreml take 4 threads each" in caplog.text
    fixed = lanes.run_lanes(["onnx", "coreml"], _share_worker, lambda fmt, threads: (fmt, threads,
                                                                                     str(tmp_path / "seen2")),
                            estimates=est, budget_gb=10, jobs=2, poll_s=0.05, threads=1)  # fmt: skip
    assert all(r.timings["first"] == r.timings["last"] == 0 for r in fixed.values())  # no share file
    assert lanes.SHARE_ENV not in os.environ
