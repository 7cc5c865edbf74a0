"""Format lanes of ``tadsr all`` side by side in separate processes, under a memory budget.

A *lane* is one format's chain of stages: export -> INT8 of its fp32 artifacts -> parity of its folders. Lanes
share nothing but the read-only model files and write disjoint artifact folders, so they can run at the same
time. Most of a lane's time is single-threaded Python (``torch.export``, ExecuTorch's edge lowering,
coremltools' MIL passes), so two lanes on two cores take about half the wall time of running them one after
the other.

How many run at once is decided by :func:`choose_jobs` from the CPU count and a memory budget: a lane starts only
while the estimated peaks of the running lanes plus its own fit the budget (:func:`lane_memory_gb`), and a lane
that does not fit even alone runs alone. Every lane runs in a fresh process, so its measured peak RSS is its own
and its memory is returned when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LaneResult", "admit", "available_memory_gb", "choose_jobs", "lane_memory_gb", "lane_share", "run_lanes"]

log = logging.getLogger(__name__)

# Peak RSS model per lane: BASE + PER_MPARAM[fmt] * (student + autoencoder parameters, millions). The base is the
# largest peak of a bundled lane (5.2 M parameters) in ``tadsr all --smoke``'s lane table (onnx 4.4, coreml 4.2,
# executorch 2.3 GB: libraries, traces, captures); the slopes take it to the official-size peaks measured on the
# development machine (173.9 M parameters: ExecuTorch lowering 12.9 GB, ONNX export + INT8 12.6 GB, Core ML W8A8
# conversion 19.2 GB). Session 25 measured each official-size stage in its own process (benchmarks/
# official_stages.py): ExecuTorch export 6.3 / INT8 pipeline 10.0 GB, Core ML export 4.8 / W8A8 + W8 7.9 GB, ONNX
# export 8.6 / INT8 pipeline 13.0 GB (11.6 GB in session 26). A lane runs its stages in one process, which can hold
# more than its largest stage; the slopes stay at the older whole-lane peaks until a whole official-size lane is
# measured.
BASE_GB = 4.0
PER_MPARAM_GB = {"onnx": 0.050, "executorch": 0.051, "coreml": 0.088}
# the order lanes start in: the longest first, so that the short ones fill in beside it
LANE_WEIGHT = {"executorch": 3, "coreml": 2, "onnx": 1}


@dataclass
class LaneResult:
    """What one lane did: its stage timings, the artifact folders it wrote, its parity results and its cost."""

    fmt: str
    timings: dict[str, float] = field(default_factory=dict)
    fp32: list[str] = field(default_factory=list)
    int8: list[str] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)  # "artifacts" / "int8" -> ParityResult (absent: none)
    wall_s: float = 0.0
    peak_rss_gb: float | None = None  # its own process's; in the main process, its stages' largest (None: unknown)
    stage_rss: dict[str, float] = field(default_factory=dict)  # peak RSS (GB) of each of its stages alone
    estimate_gb: float = 0.0


def lane_memory_gb(fmt: str, params_m: float) -> float:
    """Estimated peak RSS (GB) of the lane of ``fmt`` for networks of ``params_m`` million parameters."""
    return BASE_GB + PER_MPARAM_GB.get(fmt, max(PER_MPARAM_GB.values())) * params_m


def available_memory_gb() -> float:
    """Memory the system can give now without swapping (``MemAvailable``), in GB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def choose_jobs(estimates: Mapping[str, float], budget_gb: float, cpus: int, requested: int | None = None) -> int:
    """Lanes to run at once: ``requested`` if given, else one per usable CPU, never more than there are lanes nor
    more than the largest number of lanes whose estimated peaks fit ``budget_gb`` together (at least 1)."""
    if requested is not None:
        return max(1, min(requested, len(estimates)))
    fit, total = 0, 0.0
    for gb in sorted(estimates.values()):
        if total + gb > budget_gb:
            break
        fit, total = fit + 1, total + gb
    return max(1, min(cpus, len(estimates), fit))


def admit(running: Sequence[str], fmt: str, estimates: Mapping[str, float], budget_gb: float, jobs: int) -> bool:
    """Whether the lane of ``fmt`` may start beside the ``running`` ones: fewer than ``jobs`` run and all their
    estimated peaks fit ``budget_gb`` together; with nothing running, it always may (a lane too large for the
    budget then runs alone)."""
    if not running:
        return True
    return len(running) < jobs and sum(estimates[f] for f in running) + estimates[fmt] <= budget_gb


# the file a lane process reads its current thread share from (run_lanes raises it when other lanes finish)
SHARE_ENV = "TADSR_LANE_SHARE"


def lane_share() -> int | None:
    """The thread share :func:`run_lanes` last gave the lanes still running (None outside a lane, or where the
    lanes' threads were fixed with ``threads``)."""
    path = os.environ.get(SHARE_ENV)
    if not path:
        return None
    try:
        return int(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_share(path: Path, threads: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(threads))
    os.replace(tmp, path)


def run_lanes(
    fmts: Sequence[str], worker: Callable[..., LaneResult], args: Callable[[str, int], tuple], *,
    estimates: Mapping[str, float], budget_gb: float, jobs: int, poll_s: float = 0.5, threads: int | None = None,
) -> dict[str, LaneResult]:  # fmt: skip
    """Run ``worker(*args(fmt, threads))`` for every format, each in a fresh spawned process, at most ``jobs`` at
    once and while their estimated peaks fit ``budget_gb`` (a lane that does not fit alone runs alone).

    ``threads``: each lane's thread count (default: its share of the usable CPUs; then, once no lane is left to
    start, a lane that ends gives its CPUs to those still running, which take them from their next stage on
    through :func:`lane_share`: the last lane of the main job no longer runs on one core while the other idles).
    A lane that raises does not
    stop the others: they run to their end (their finished stages are in the run's cache, so ``--resume`` reuses
    them; session 19's main job lost its ONNX lane's work to the ExecuTorch lane's failure), then the first
    failure is raised here. An interrupt (Ctrl-C) terminates every lane.
    """
    grow = threads is None
    threads = threads or max(1, usable_cpus() // max(1, jobs))
    share_dir = Path(tempfile.mkdtemp(prefix="tadsr-lanes-"))
    share, given = share_dir / "threads", threads
    _write_share(share, threads)
    queue = sorted(fmts, key=lambda f: -LANE_WEIGHT.get(f.partition(":")[0], 0))  # a lane: <format>[:<group>]
    ctx = multiprocessing.get_context("spawn")
    running: dict[str, tuple[Any, Any, float]] = {}  # fmt -> (pool, async result, start time)
    done: dict[str, LaneResult] = {}
    failed: dict[str, BaseException] = {}
    try:
        while queue or running:
            while queue and admit(list(running), queue[0], estimates, budget_gb, jobs):
                fmt = queue.pop(0)
                if estimates[fmt] > budget_gb:
                    log.warning("the %s lane's estimated peak (%.1f GB) exceeds the memory budget (%.1f GB); it "
                                "runs alone", fmt, estimates[fmt], budget_gb)  # fmt: skip
                with _blas_threads(threads), _environ(SHARE_ENV, str(share) if grow else None):
                    pool = ctx.Pool(1)  # numpy's BLAS reads its threads at start-up: one pool per lane's share
                running[fmt] = (pool, pool.apply_async(worker, args(fmt, threads)), time.perf_counter())
                log.info("lane %s started (%d thread%s, estimated peak %.1f GB)", fmt, threads,
                         "" if threads == 1 else "s", estimates[fmt])  # fmt: skip
            time.sleep(poll_s)
            for fmt in [f for f, (_, res, _) in running.items() if res.ready()]:
                pool, res, t0 = running.pop(fmt)
                try:
                    out = res.get()
                except Exception as e:  # noqa: BLE001 - the lane's own error, raised below once the others end
                    failed[fmt] = e
                    log.error("lane %s failed after %.1f s: %s: %s%s", fmt, time.perf_counter() - t0,
                              type(e).__name__, e, "; the other lanes go on" if queue or running else "")  # fmt: skip
                    continue
                finally:
                    pool.close()
                    pool.join()
                out.wall_s = round(time.perf_counter() - t0, 1)
                out.estimate_gb = round(estimates[fmt], 1)
                done[fmt] = out
                log.info("lane %s done in %.1f s (peak RSS %.1f GB)", fmt, out.wall_s, out.peak_rss_gb or 0.0)
            if grow and running and not queue and (freed := usable_cpus() // len(running)) > given:
                given = freed
                _write_share(share, given)
                log.info("lanes %s take %d threads each from their next stage on", ", ".join(running), given)
    finally:
        for pool, _, _ in running.values():
            pool.terminate()
            pool.join()
        shutil.rmtree(share_dir, ignore_errors=True)
    if failed:
        if done:
            log.info("lanes finished: %s; failed: %s (a rerun with --resume reuses the finished stages)",
                     ", ".join(done), ", ".join(failed))  # fmt: skip
        raise next(iter(failed.values()))
    return {f: done[f] for f in fmts}


@contextlib.contextmanager
def _environ(key: str, value: str | None) -> Iterator[None]:
    """``key`` set to ``value`` (None: unset) inside the block, restored after."""
    saved = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


@contextlib.contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    """Spawned children start with OpenBLAS / MKL limited to ``threads`` (the environment they inherit; restored
    here after). Without it each lane's numpy (the Core ML simulator's matmuls) starts a thread per core."""
    with _environ("OPENBLAS_NUM_THREADS", str(threads)), _environ("MKL_NUM_THREADS", str(threads)):
        yield


def peak_rss_gb() -> float:
    """Peak RSS of this process since its last reset of the kernel's mark (:mod:`tadsr.memory`; its whole life
    without one) and of its finished children, in GB."""
    from tadsr.memory import lifetime_peak

    return round(lifetime_peak(children=True) / 1e9, 2)
