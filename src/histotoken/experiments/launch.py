"""Run a study's pending runs as submitit jobs: a SLURM job array, or local processes.

``histotoken grid SPEC --launcher slurm`` submits one job per pending run as one SLURM array
(``executor.batch()``), with partition, time and memory from the spec's ``launcher:`` block or
from flags, and GPUs/CPUs per task that a node of the partition has (``sinfo``) unless given; ``--launcher submitit-local`` runs the same jobs as local
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
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histotoken.experiments.locks import DEFAULT_STALE_AFTER_S
from histotoken.experiments.spec import PlannedRun, StudySpec, expand
from histotoken.formats import StudyPaths

logger = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "submitit-local")


DEFAULT_CPUS_PER_TASK = 8  # when the nodes have at least this many
FALLBACK_CPUS_PER_TASK = 2  # when nothing is known about the nodes


@dataclasses.dataclass(frozen=True)
class LauncherSettings:
    """Resources per job and how many jobs run at once; the spec's ``launcher:`` block.

    ``gpus_per_task`` and ``cpus_per_task`` left at None are chosen by :func:`fill_defaults` from
    what a node of the partition has (``sinfo``): 1 GPU if nodes have GPUs, else 0; 8 CPUs or all
    of a smaller node's. ``python``: the interpreter on the nodes (default: this one's path).
    """

    partition: str | None = None
    gpus_per_task: int | None = None
    timeout_min: int = 24 * 60
    mem_gb: float | None = None
    cpus_per_task: int | None = None
    parallel: int | None = None  # SLURM: array parallelism (None: no limit); local: default 2
    claim_timeout_min: float = DEFAULT_STALE_AFTER_S / 60
    python: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def claim_timeout_s(self) -> float:
        return 60.0 * self.claim_timeout_min


LAUNCHER_KEYS = tuple(field.name for field in dataclasses.fields(LauncherSettings))
# the smallest value each number may take
_MINIMUM = {"gpus_per_task": 0, "timeout_min": 1, "cpus_per_task": 1, "parallel": 1, "mem_gb": 0}


def launcher_settings(block: dict[str, Any], overrides: dict[str, Any], source: str) -> LauncherSettings:
    """Settings from a spec's ``launcher:`` block, then command-line ``overrides`` (None = not given)."""
    unknown = sorted(set(block) - set(LAUNCHER_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown launcher keys {unknown}; known: {', '.join(LAUNCHER_KEYS)}")
    values = {**block, **{k: v for k, v in overrides.items() if v is not None}}
    settings = LauncherSettings(**values)
    for name, minimum in _MINIMUM.items():
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < minimum):
            raise ValueError(f"{source}: launcher {name}={value!r} must be a number >= {minimum}")
    claim = settings.claim_timeout_min
    if isinstance(claim, bool) or not isinstance(claim, int | float) or claim <= 0:
        raise ValueError(f"{source}: launcher claim_timeout_min={claim!r} must be a positive number of minutes "
                         "(fractions such as 0.5 are fine)")
    if settings.python is not None and not isinstance(settings.python, str):
        raise ValueError(f"{source}: launcher python={settings.python!r} must be a path (the nodes' interpreter)")
    return settings


@dataclasses.dataclass(frozen=True)
class NodeResources:
    """What one kind of node of a partition has, as ``sinfo -o "%c %m %G"`` reports it."""

    cpus: int
    mem_mb: int
    gpus: int


def parse_sinfo(text: str) -> list[NodeResources]:
    """Lines of ``sinfo -h -o "%c %m %G"`` (CPUs, memory in MB, generic resources) -> node kinds.

    A trailing ``+`` (nodes of several sizes in one line) is dropped; GPUs are the counts of every
    ``gpu[:TYPE]:N`` entry in the gres column (``(null)`` when a node has none), e.g.
    ``gpu:a100:4(S:0-1),mps:400`` -> 4.
    """
    nodes = []
    for line in text.splitlines():
        fields = line.split(None, 2)
        if len(fields) < 2:
            continue
        try:
            cpus, mem_mb = (int(field.rstrip("+")) for field in fields[:2])
        except ValueError:
            continue
        gres = fields[2] if len(fields) > 2 else ""
        gpus = sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[\w.-]+)?:(\d+)", gres))
        nodes.append(NodeResources(cpus, mem_mb, gpus))
    return nodes


def query_nodes(partition: str | None, run: Callable[..., Any] = subprocess.run) -> list[NodeResources] | None:
    """The partition's node kinds from ``sinfo`` (default partition when None); None if sinfo is absent or fails."""
    if shutil.which("sinfo") is None:
        return None
    command = ["sinfo", "-h", "-o", "%c %m %G", *(["-p", partition] if partition else [])]
    try:
        answer = run(command, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("could not ask sinfo for the nodes' resources (%s); using small defaults", error)
        return None
    if answer.returncode != 0:
        logger.warning("sinfo failed (%s); using small defaults", (answer.stderr or "").strip())
        return None
    return parse_sinfo(answer.stdout) or None


def fill_defaults(settings: LauncherSettings, nodes: list[NodeResources] | None) -> LauncherSettings:
    """GPUs and CPUs per task that a node has, for those not set; refuse a request that no node can meet.

    ``nodes`` None (nothing known): no GPU and 2 CPUs, which any node has.
    """
    gpus, cpus = settings.gpus_per_task, settings.cpus_per_task
    if not nodes:
        return dataclasses.replace(settings, gpus_per_task=0 if gpus is None else gpus,
                                   cpus_per_task=FALLBACK_CPUS_PER_TASK if cpus is None else cpus)
    where = f"partition {settings.partition}" if settings.partition else "the default partition"
    if gpus is None:
        gpus = 1 if any(node.gpus for node in nodes) else 0
    fitting = [node for node in nodes if node.gpus >= gpus]
    if not fitting:
        most = max(node.gpus for node in nodes)
        raise ValueError(f"launcher gpus_per_task={gpus}, but the nodes of {where} have at most {most} GPUs; "
                         f"set launcher: {{gpus_per_task: {most}}} or --gpus-per-task {most} (or --partition)")
    largest = max(node.cpus for node in fitting)
    if cpus is None:
        cpus = min(DEFAULT_CPUS_PER_TASK, largest)
    elif cpus > largest:
        raise ValueError(f"launcher cpus_per_task={cpus}, but the nodes of {where} have at most {largest} CPUs; "
                         f"the job would pend forever: set --cpus-per-task {largest} or less")
    mem_mb = max(node.mem_mb for node in fitting)
    if settings.mem_gb is not None and settings.mem_gb * 1024 > mem_mb:
        raise ValueError(f"launcher mem_gb={settings.mem_gb}, but the nodes of {where} have {mem_mb} MB; "
                         f"set --mem-gb {mem_mb // 1024} or less")
    return dataclasses.replace(settings, gpus_per_task=gpus, cpus_per_task=cpus)


# sbatch's complaint -> the option that changes it (first match wins)
_SBATCH_ERRORS = (
    ("generic resource", "no node offers the GPUs asked for: set launcher: {gpus_per_task: 0} or --gpus-per-task 0 "
                         "(or a GPU --partition)"),
    ("invalid partition", "set an existing --partition (see `sinfo -s`)"),
    ("time limit", "lower --timeout-min (launcher: {timeout_min: ...}) to the partition's limit (`sinfo -o %l`)"),
    ("memory", "lower --mem-gb (launcher: {mem_gb: ...})"),
    ("node configuration is not available", "ask for fewer resources: --cpus-per-task, --mem-gb or --gpus-per-task"),
    ("account", "set launcher: {extra: {slurm_account: NAME}}"),
    ("qos", "set launcher: {extra: {slurm_qos: NAME}}"),
)


def sbatch_error(message: str) -> str:
    """One line for a refused submission: sbatch's own words and the option to change."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    said = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "no message")
    said = said.removeprefix("sbatch: error: ")
    lowered = said.lower()
    fix = next((fix for pattern, fix in _SBATCH_ERRORS if pattern in lowered),
               "check the spec's launcher: block and the job resource options (histotoken grid --help)")
    return f"sbatch refused the jobs ({said}); {fix}"


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
    interpreter = {f"{cluster}_python": settings.python} if settings.python else {}
    try:
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster, **interpreter)
    except RuntimeError as error:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise ValueError(f"--launcher slurm: {error} Run the grid on the cluster's login node, or use "
                         "--launcher submitit-local or --shard I/N elsewhere") from None
    parameters: dict[str, Any] = {
        "name": name, "timeout_min": int(settings.timeout_min), "tasks_per_node": 1,
        "cpus_per_task": int(settings.cpus_per_task or FALLBACK_CPUS_PER_TASK),
    }
    if kind == "slurm":
        parameters["gpus_per_node"] = int(settings.gpus_per_task or 0)
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
    from submitit.core.utils import FailedJobError

    study_dir = Path(study_dir)
    folder = StudyPaths(study_dir).submitit
    settings = fill_defaults(settings, query_nodes(settings.partition) if kind == "slurm" else None)
    logger.info("jobs get %s GPU(s) and %s CPUs each", settings.gpus_per_task, settings.cpus_per_task)
    executor = make_executor(kind, folder, settings, f"histotoken-{spec.name}")
    arguments = [(spec, str(study_dir), run.run_id, settings.claim_timeout_s) for run in runs]
    if kind == "slurm":
        jobs = []
        try:
            with executor.batch():  # one sbatch --array for all runs
                for args in arguments:
                    jobs.append(executor.submit(run_job, *args))
        except FailedJobError as refusal:  # submitit raises it with sbatch's stderr
            raise ValueError(sbatch_error(str(refusal))) from None
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
