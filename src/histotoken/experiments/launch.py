"""Run a study's pending runs as submitit jobs: a SLURM job array, or local processes.

``histotoken grid SPEC --launcher slurm`` submits one job per pending run as one SLURM array
(``executor.batch()``), a GPU per task, with partition, time and memory from the spec's
``launcher:`` block or from flags; ``--launcher submitit-local`` runs the same jobs as local
processes (submitit's LocalExecutor), a few at a time, for tests and single machines.

Each job is :func:`run_job`: it claims its run folder (:mod:`histotoken.experiments.locks`),
so a job that lands on a run another worker already holds does nothing; it trains and
evaluates the run exactly as the in-process grid does. The study tables are rebuilt afterwards
from the run folders (``histotoken grid SPEC --collect``), never by the jobs.

submitit parameters used (its "auto" names, see submitit's AutoExecutor): ``timeout_min``,
``mem_gb``, ``cpus_per_task``, ``gpus_per_node`` with ``tasks_per_node=1`` (so a GPU count per
task), ``slurm_partition``, ``slurm_array_parallelism``, ``name``; ``extra`` passes any other
submitit parameter through (e.g. ``slurm_qos``, ``slurm_setup``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histotoken.experiments.locks import DEFAULT_STALE_AFTER_S
from histotoken.experiments.spec import PlannedRun, StudySpec, expand
from histotoken.formats import StudyPaths

logger = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclasses.dataclass(frozen=True)
class LauncherSettings:
    """Resources per job and how many jobs run at once; the spec's ``launcher:`` block."""

    partition: str | None = None
    gpus_per_task: int = 1
    timeout_min: int = 24 * 60
    mem_gb: float | None = None
    cpus_per_task: int = 8
    parallel: int | None = None  # SLURM: array parallelism (None: no limit); local: default 2
    claim_timeout_min: float = DEFAULT_STALE_AFTER_S / 60
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def claim_timeout_s(self) -> float:
        return 60.0 * self.claim_timeout_min


LAUNCHER_KEYS = tuple(field.name for field in dataclasses.fields(LauncherSettings))


def launcher_settings(block: dict[str, Any], overrides: dict[str, Any], source: str) -> LauncherSettings:
    """Settings from a spec's ``launcher:`` block, then command-line ``overrides`` (None = not given)."""
    unknown = sorted(set(block) - set(LAUNCHER_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown launcher keys {unknown}; known: {', '.join(LAUNCHER_KEYS)}")
    values = {**block, **{k: v for k, v in overrides.items() if v is not None}}
    settings = LauncherSettings(**values)
    for name in ("gpus_per_task", "timeout_min", "cpus_per_task", "parallel", "claim_timeout_min"):
        value = getattr(settings, name)
        if value is not None and (not isinstance(value, int | float) or value < (0 if name == "gpus_per_task" else 1)):
            raise ValueError(f"{source}: launcher {name}={value!r} must be a positive number")
    return settings


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; a clear error otherwise."""
    index, sep, count = str(text).partition("/")
    try:
        shard = (int(index), int(count))
    except ValueError:
        shard = None
    if not sep or shard is None or shard[1] < 1 or not 0 <= shard[0] < shard[1]:
        raise ValueError(
            f"--shard {text}: expected I/N with 0 <= I < N, e.g. --shard 0/4 ... --shard 3/4 "
            "(I is 0-based, like a Kubernetes JOB_COMPLETION_INDEX or SLURM_ARRAY_TASK_ID from 0)"
        )
    return shard


def shard_runs(runs: list[PlannedRun], shard: tuple[int, int] | None) -> list[PlannedRun]:
    """The runs of shard ``(i, n)``: position ``i mod n`` in the run list sorted by run id."""
    if shard is None:
        return list(runs)
    index, count = shard
    ordered = sorted(runs, key=lambda run: run.run_id)
    return [run for position, run in enumerate(ordered) if position % count == index]


@dataclasses.dataclass
class SubmittedRun:
    run: PlannedRun
    job: Any  # submitit.Job

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


def run_job(spec: StudySpec, study_dir: str, run_id: str, claim_timeout_s: float) -> dict[str, Any]:
    """The job's body (on the cluster node or in a local process): claim, train, evaluate, release."""
    from histotoken.engine.interrupt import interruptible
    from histotoken.experiments.grid import execute_run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    planned = {run.run_id: run for run in expand(spec)}
    if run_id not in planned:
        raise ValueError(f"run {run_id} is not part of study {spec.name}; was the spec changed after submission?")
    run = planned[run_id]
    split_path = StudyPaths(Path(study_dir)).split_file(run.split_name)
    with interruptible():  # SIGTERM (time limit, pre-emption): the run is marked interrupted, its claim freed
        outcome = execute_run(spec, Path(study_dir), run, split_path, claim_timeout_s)
    return {"run_id": run_id, "outcome": outcome.outcome, "error": outcome.error}


def make_executor(kind: str, folder: Path, settings: LauncherSettings, name: str):
    """A submitit executor for ``kind`` (slurm or submitit-local) with the settings applied."""
    import submitit

    if kind not in ("slurm", "submitit-local"):
        raise ValueError(f"launcher {kind!r}: expected one of {', '.join(LAUNCHERS)}")
    cluster = "slurm" if kind == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
    parameters: dict[str, Any] = {
        "name": name, "timeout_min": int(settings.timeout_min), "tasks_per_node": 1,
        "cpus_per_task": int(settings.cpus_per_task),
    }
    if kind == "slurm":
        parameters["gpus_per_node"] = int(settings.gpus_per_task)
        if settings.mem_gb is not None:
            parameters["mem_gb"] = settings.mem_gb
        if settings.partition:
            parameters["slurm_partition"] = settings.partition
        if settings.parallel:
            parameters["slurm_array_parallelism"] = int(settings.parallel)
    parameters.update(settings.extra)
    executor.update_parameters(**parameters)
    return executor


def launch_runs(
    spec: StudySpec,
    study_dir: str | Path,
    runs: list[PlannedRun],
    kind: str,
    settings: LauncherSettings,
    wait: bool = True,
    on_submit: Callable[[SubmittedRun], None] | None = None,
    on_done: Callable[[SubmittedRun, dict[str, Any] | None, str | None], None] | None = None,
    poll_s: float = 2.0,
) -> list[SubmittedRun]:
    """Submit one job per run; with ``wait``, return when every job has ended.

    ``slurm``: one job array for all runs (at most ``settings.parallel`` running at once).
    ``submitit-local``: at most ``settings.parallel`` (default 2) local jobs at a time, the next
    submitted as one ends, so ``wait=False`` is refused. ``on_done(submitted, result, error)``
    is called as each job ends (``error``: the job's exception text, e.g. a node failure).
    """
    study_dir = Path(study_dir)
    folder = StudyPaths(study_dir).submitit
    executor = make_executor(kind, folder, settings, f"histotoken-{spec.name}")
    arguments = [(spec, str(study_dir), run.run_id, settings.claim_timeout_s) for run in runs]
    if kind == "slurm":
        jobs = []
        with executor.batch():  # one sbatch --array for all runs
            for args in arguments:
                jobs.append(executor.submit(run_job, *args))
        submitted = [SubmittedRun(run, job) for run, job in zip(runs, jobs)]
        for item in submitted:
            if on_submit:
                on_submit(item)
        if wait:
            _wait(submitted, on_done, poll_s)
        return submitted
    if not wait:
        raise ValueError("--no-wait needs --launcher slurm: submitit-local jobs are processes of this command")
    return _run_windowed(executor, runs, arguments, settings.parallel or 2, on_submit, on_done, poll_s)


def _run_windowed(executor, runs, arguments, parallel, on_submit, on_done, poll_s) -> list[SubmittedRun]:
    queue = list(zip(runs, arguments))
    running: list[SubmittedRun] = []
    finished: list[SubmittedRun] = []
    while queue or running:
        while queue and len(running) < parallel:
            run, args = queue.pop(0)
            item = SubmittedRun(run, executor.submit(run_job, *args))
            running.append(item)
            if on_submit:
                on_submit(item)
        ended = [item for item in running if item.job.done()]
        for item in ended:
            running.remove(item)
            finished.append(item)
            _report(item, on_done)
        if not ended:
            time.sleep(poll_s)
    return finished


def _wait(submitted: list[SubmittedRun], on_done, poll_s: float) -> None:
    pending = list(submitted)
    while pending:
        ended = [item for item in pending if item.job.done()]
        for item in ended:
            pending.remove(item)
            _report(item, on_done)
        if pending and not ended:
            time.sleep(poll_s)


def _report(item: SubmittedRun, on_done) -> None:
    try:
        result, error = item.job.result(), None
    except Exception as failure:  # noqa: BLE001 - a job's failure is reported, the others go on
        lines = str(failure).strip().splitlines()
        result, error = None, f"{type(failure).__name__}: {lines[-1] if lines else ''}"
        logger.error("job %s (%s) failed: %s", item.job_id, item.run.run_id, failure)
    if on_done:
        on_done(item, result, error)
