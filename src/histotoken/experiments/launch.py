"""Run a study's pending runs as submitit jobs: a SLURM job array, or local processes.

``histotoken grid SPEC --launcher slurm`` submits one job per pending run as one SLURM array
(``executor.batch()``), with partition, time and memory from the spec's ``launcher:`` block or
from flags, and GPUs/CPUs per task that a node of the partition has (``sinfo``) unless given; ``--launcher submitit-local`` runs the same jobs as local
processes (submitit's LocalExecutor), a few at a time, for tests and single machines.

Each job is a :class:`RunJob`: it claims its run folder (:mod:`histotoken.experiments.locks`),
so a job that lands on a run another worker already holds does nothing; it trains and
evaluates the run exactly as the in-process grid does. The study tables are rebuilt afterwards
from the run folders (``histotoken grid SPEC --collect``), never by the jobs.

Time limits: a ``RunJob`` is checkpointable in submitit's sense. SLURM sends USR2 shortly before
the limit (:func:`warning_signal_s`); the run is marked interrupted with every finished epoch in
its last.ckpt, the job keeps its claim and requeues itself, and the requeued job resumes the run
(at most ``max_requeues`` times). The grid watches its jobs with one ``squeue`` call per poll (and
``sacct`` for jobs squeue no longer lists, where the cluster keeps accounting), instead of
submitit's slowly backing-off sacct calls, so a cancelled job is seen within one poll, and a job
pending for a reason that waiting will not change is reported as soon as it is seen.

submitit parameters used (its "auto" names, see submitit's AutoExecutor): ``timeout_min``,
``mem_gb``, ``cpus_per_task``, ``gpus_per_node`` with ``tasks_per_node=1`` (so a GPU count per
task), ``slurm_partition``, ``slurm_array_parallelism``, ``name``; ``extra`` passes any other
submitit parameter through (e.g. ``slurm_qos``, ``slurm_setup``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from histotoken.experiments import locks
from histotoken.experiments.locks import DEFAULT_STALE_AFTER_S
from histotoken.experiments.spec import PlannedRun, StudySpec, expand
from histotoken.formats import RunPaths, StudyPaths

logger = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm", "submitit-local")


DEFAULT_CPUS_PER_TASK = 8  # when the nodes have at least this many
FALLBACK_CPUS_PER_TASK = 2  # when nothing is known about the nodes
MIN_TIMEOUT_MIN = 2  # shorter, and SLURM's time-limit warning would come before the run could start
DEFAULT_MAX_REQUEUES = 3  # a run requeued this often at its time limit is failed (asks for more time)
SLURM_POLL_S = 10.0  # seconds between two squeue calls while the grid waits for its jobs


def warning_signal_s(timeout_min: float) -> int:
    """Seconds before the time limit at which SLURM sends the job USR2 (submitit's ``signal_delay_s``).

    90 s, or a quarter of a short limit (30 s of 2 minutes) so that a short job still trains most of
    its time. SLURM may send the signal up to a minute earlier than asked (``sbatch --signal``).
    """
    return int(min(90, max(20, timeout_min * 60 // 4)))


@dataclasses.dataclass(frozen=True)
class LauncherSettings:
    """Resources per job and how many jobs run at once; the spec's ``launcher:`` block.

    ``gpus_per_task`` and ``cpus_per_task`` left at None are chosen by :func:`fill_defaults` from
    what a node of the partition has (``sinfo``): 1 GPU if nodes have GPUs, else 0; 8 CPUs or all
    of a smaller node's. ``python``: the interpreter on the nodes (default: this one's path).
    ``max_requeues``: how often a run's job may requeue itself at its time limit (see :class:`RunJob`).
    """

    partition: str | None = None
    gpus_per_task: int | None = None
    timeout_min: int = 24 * 60
    mem_gb: float | None = None
    cpus_per_task: int | None = None
    parallel: int | None = None  # SLURM: array parallelism (None: no limit); local: default 2
    claim_timeout_min: float = DEFAULT_STALE_AFTER_S / 60
    python: str | None = None
    max_requeues: int = DEFAULT_MAX_REQUEUES  # requeues at the time limit before a run is failed
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def claim_timeout_s(self) -> float:
        return 60.0 * self.claim_timeout_min


LAUNCHER_KEYS = tuple(field.name for field in dataclasses.fields(LauncherSettings))
# the smallest value each number may take
_MINIMUM = {"gpus_per_task": 0, "timeout_min": 1, "cpus_per_task": 1, "parallel": 1, "mem_gb": 0,
            "max_requeues": 0}


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
    if settings.timeout_min < MIN_TIMEOUT_MIN:
        raise ValueError(
            f"{source}: launcher timeout_min={settings.timeout_min} is too short for a run to start: SLURM warns a "
            f"job {warning_signal_s(settings.timeout_min)} s before its time limit (up to a minute earlier), so the "
            f"job would be stopped before its first epoch; set --timeout-min {MIN_TIMEOUT_MIN} or more "
            "(launcher: {timeout_min: ...})")
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


class RequeueLimitReached(RuntimeError):
    """A run's job reached its time limit more often than ``launcher: {max_requeues: N}`` allows."""


class RunJob:
    """One run as a submitit job: calling it claims, trains and evaluates the run; it is checkpointable.

    Near the job's time limit SLURM sends USR2 (``--signal=USR2@S``, S = :func:`warning_signal_s`).
    submitit's handler then calls :meth:`checkpoint`, saves the job it returns as this job's new
    pickle, requeues the job (``scontrol requeue``) and exits. Here that exit becomes the engine's
    interruption (:class:`~histotoken.engine.interrupt.RunInterrupted` for SIGUSR2): the run is
    marked interrupted, its last.ckpt holds every finished epoch, and its claim stays in place
    (:func:`locks.keep`). The requeued job carries the same claim token, takes the claim back and
    resumes the run from last.ckpt. Every start appends a line to the run's attempts.jsonl with the
    job id and ``requeues`` (0 for the first start). After ``max_requeues`` requeues the run is
    failed with an error that asks for a longer time limit (submitit's own count is set above it).
    """

    def __init__(self, max_requeues: int = DEFAULT_MAX_REQUEUES, token: str | None = None, requeues: int = 0) -> None:
        self.max_requeues = int(max_requeues)
        self.token = token or uuid.uuid4().hex  # the claim token, the same for every start of this job
        self.requeues = int(requeues)
        self.requeued = False  # checkpoint() asked submitit to requeue this job
        self.declined = False  # checkpoint() found the run done: nothing to requeue
        self._exit_code: int | str | None = -1  # the exit status submitit chose for the requeued job

    def __call__(self, spec: StudySpec, study_dir: str, run_id: str, claim_timeout_s: float) -> dict[str, Any]:
        """The job's body (on the cluster node or in a local process): claim, train, evaluate, release."""
        from histotoken.engine.interrupt import RunInterrupted, interruptible
        from histotoken.experiments.grid import execute_run

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        run = _planned_run(spec, run_id)
        split_path = StudyPaths(Path(study_dir)).split_file(run.split_name)
        details = {"job_id": _current_job_id(), "requeues": self.requeues}
        try:
            # SIGTERM (scancel, pre-emption): the run is marked interrupted, its claim freed.
            # USR2 (time limit): the same, but the claim is kept and the job requeued.
            with interruptible(), self._requeue_on_warning():
                outcome = execute_run(spec, Path(study_dir), run, split_path, claim_timeout_s,
                                      claim_token=self.token, claim_details=details)
        except RunInterrupted:
            if self.requeued:
                logger.info("run %s saved; its job is requeued (%d of at most %d requeues)", run_id,
                            self.requeues + 1, self.max_requeues)
                raise SystemExit(self._exit_code) from None  # how submitit ends a requeued job: no result
            raise
        return {"run_id": run_id, "outcome": outcome.outcome, "error": outcome.error}

    def checkpoint(self, spec: StudySpec, study_dir: str, run_id: str, claim_timeout_s: float):
        """Called by submitit on USR2: the job to requeue (this run, one requeue more), or None if the run is done.

        Raises :class:`RequeueLimitReached` (the run is then failed) after ``max_requeues`` requeues.
        """
        from submitit.helpers import DelayedSubmission

        from histotoken.experiments.grid import _folder_state

        if _folder_state(RunPaths(StudyPaths(Path(study_dir)).run_dir(run_id)), spec) == "done":
            self.declined = True
            return None
        if self.requeues >= self.max_requeues:
            raise RequeueLimitReached(
                f"run {run_id} reached its job's time limit {self.requeues + 1} times (requeued {self.requeues} "
                f"times, launcher max_requeues={self.max_requeues}); its finished epochs are saved: re-run the grid "
                "with a longer --timeout-min (launcher: {timeout_min: ...}) to resume it")
        self.requeued = True
        return DelayedSubmission(RunJob(self.max_requeues, self.token, self.requeues + 1),
                                 spec, study_dir, run_id, claim_timeout_s)

    @contextlib.contextmanager
    def _requeue_on_warning(self) -> Iterator[None]:
        """Wrap submitit's USR2 handler (if there is one): only the job's main process acts on it (a forked
        DataLoader worker inherits the handler but must not requeue), and its exit becomes RunInterrupted."""
        from submitit import JobEnvironment
        from submitit.core.utils import UncompletedJobError

        from histotoken.engine.interrupt import RunInterrupted, stop_raising

        warning = JobEnvironment._usr_sig()
        submitit_handler = signal.getsignal(warning)
        if not callable(submitit_handler):  # not started by submitit (e.g. called directly)
            yield
            return
        main_pid = os.getpid()

        def handle(signum: int, frame) -> None:
            if os.getpid() != main_pid:
                return
            try:
                submitit_handler(signum, frame)  # checkpoint(), requeue, sys.exit
            except (SystemExit, RunInterrupted) as leaving:  # RunInterrupted: the requeue's own SIGTERM came first
                if not self.requeued:
                    raise
                self._exit_code = leaving.code if isinstance(leaving, SystemExit) else -1
                locks.keep(self.token)
                stop_raising()  # the SIGTERM that follows a requeue must not cut the clean-up short
                raise RunInterrupted(signum) from None
            except UncompletedJobError:
                if not self.declined:
                    raise
                logger.info("time-limit warning after the run was done: nothing to requeue")

        signal.signal(warning, handle)
        try:
            yield
        finally:
            signal.signal(warning, submitit_handler)


def _planned_run(spec: StudySpec, run_id: str) -> PlannedRun:
    planned = {run.run_id: run for run in expand(spec)}
    if run_id not in planned:
        raise ValueError(f"run {run_id} is not part of study {spec.name}; was the spec changed after submission?")
    return planned[run_id]


def _current_job_id() -> str | None:
    """This job's id as the grid knows it (``ARRAY_TASK`` for an array task), or None outside a submitit job."""
    import submitit

    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return None


def make_executor(kind: str, folder: Path, settings: LauncherSettings, name: str):
    """A submitit executor for ``kind`` (slurm or submitit-local) with the settings applied."""
    import submitit

    if kind not in ("slurm", "submitit-local"):
        raise ValueError(f"launcher {kind!r}: expected one of {', '.join(LAUNCHERS)}")
    cluster = "slurm" if kind == "slurm" else "local"
    interpreter = {f"{cluster}_python": settings.python} if settings.python else {}
    # submitit gives up after its own count of timeouts; ours (RunJob.checkpoint) must come first
    requeues = {"slurm_max_num_timeout": settings.max_requeues + 1} if cluster == "slurm" else {}
    try:
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster, **interpreter, **requeues)
    except RuntimeError as error:  # submitit: 'Could not detect "srun", are you indeed on a slurm cluster?'
        raise ValueError(f"--launcher slurm: {error} Run the grid on the cluster's login node, or use "
                         "--launcher submitit-local or --shard I/N elsewhere") from None
    parameters: dict[str, Any] = {
        "name": name, "timeout_min": int(settings.timeout_min), "tasks_per_node": 1,
        "cpus_per_task": int(settings.cpus_per_task or FALLBACK_CPUS_PER_TASK),
    }
    if kind == "slurm":
        parameters["slurm_signal_delay_s"] = warning_signal_s(settings.timeout_min)
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
    poll_s: float | None = None,
    on_stuck: Callable[[SubmittedRun, str], None] | None = None,
) -> list[SubmittedRun]:
    """Submit one job per run; with ``wait``, return when every job has ended.

    ``slurm``: one job array for all runs (at most ``settings.parallel`` running at once), watched
    with one squeue call every ``poll_s`` (default 10 s). ``submitit-local``: at most
    ``settings.parallel`` (default 2) local jobs at a time, the next submitted as one ends, so
    ``wait=False`` is refused. ``on_done(submitted, result, error)`` is called as each job ends
    (``error``: the job's exception text, or the state of a job that ended without a result, e.g.
    ``CANCELLED``); ``on_stuck(submitted, message)`` once for a job that pends for a reason that
    waiting will not change (e.g. ``PartitionConfig``).
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
                    jobs.append(executor.submit(RunJob(settings.max_requeues), *args))
        except FailedJobError as refusal:  # submitit raises it with sbatch's stderr
            raise ValueError(sbatch_error(str(refusal))) from None
        submitted = [SubmittedRun(run, job) for run, job in zip(runs, jobs)]
        for item in submitted:
            if on_submit:
                on_submit(item)
        if wait:
            wait_slurm(submitted, on_done, SLURM_POLL_S if poll_s is None else poll_s, SlurmStates().poll, on_stuck)
        return submitted
    if not wait:
        raise ValueError("--no-wait needs --launcher slurm: submitit-local jobs are processes of this command")
    return _run_windowed(executor, runs, arguments, settings, on_submit, on_done, 2.0 if poll_s is None else poll_s)


def _run_windowed(executor, runs, arguments, settings, on_submit, on_done, poll_s) -> list[SubmittedRun]:
    queue = list(zip(runs, arguments))
    running: list[SubmittedRun] = []
    finished: list[SubmittedRun] = []
    while queue or running:
        while queue and len(running) < (settings.parallel or 2):
            run, args = queue.pop(0)
            item = SubmittedRun(run, executor.submit(RunJob(settings.max_requeues), *args))
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


# --------------------------------------------------------------------------- watching SLURM jobs

# states in which a job has ended for good (a requeued job is PENDING/REQUEUED again, never one of these)
ENDED_STATES = frozenset({
    "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
})
# pending reasons that waiting does not change (squeue's %r / sacct's Reason), and what they mean
STUCK_REASONS = {
    "PartitionConfig": "it asks for more CPUs, memory or GPUs than the partition's nodes have: lower --cpus-per-task, "
                       "--mem-gb or --gpus-per-task",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows",
    "PartitionTimeLimit": "--timeout-min is above the partition's time limit (`sinfo -o %l`): lower it",
    "ReqNodeNotAvail": "no node that could run it is available (down, drained, reserved or too small)",
    "BadConstraints": "no node has the features or resources it asks for",
    "InvalidAccount": "its account is not valid: set launcher: {extra: {slurm_account: NAME}}",
    "InvalidQOS": "its QOS is not valid: set launcher: {extra: {slurm_qos: NAME}}",
    "DependencyNeverSatisfied": "a job it depends on failed",
    "JobHeldAdmin": "an administrator holds it",
}


@dataclasses.dataclass(frozen=True)
class JobState:
    """One job's state as squeue (``%T``) or sacct (``State``) prints it, and its pending reason."""

    state: str
    reason: str = ""

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def stuck(self) -> str | None:
        """Why this job will pend forever, or None (running, ended, or pending for a reason that passes)."""
        if self.state != "PENDING" or not self.reason:
            return None
        name = self.reason.split(",")[0].strip()
        if name in STUCK_REASONS:
            return STUCK_REASONS[name]
        if "PerJob" in name:  # QOSMaxCpuPerJobLimit, AssocMaxWallDurationPerJobLimit, ...: a limit per job
            return "it asks for more than a limit per job of its QOS or account allows"
        return None

    def describe(self) -> str:
        """``CANCELLED``, ``FAILED (NonZeroExitCode)``: the reason only where it says more than why it queued."""
        queued = self.reason.split(",")[0] in _QUEUE_REASONS
        return self.state + (f" ({self.reason})" if self.reason and not (self.ended and queued) else "")


_QUEUE_REASONS = frozenset({"Resources", "Priority", "BeginTime", "Dependency", "JobArrayTaskLimit", "None"})


def expand_job_ids(text: str) -> list[str]:
    """``123`` -> [123]; ``123_4`` -> [123_4]; ``123_[0-2,5%2]`` (array tasks not yet split) -> 123_0 .. 123_5."""
    base, sep, tasks = text.partition("_")
    if not sep or not tasks.startswith("["):
        return [text]
    ids = []
    for part in tasks.strip("[]").split("%")[0].split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            ids += [f"{base}_{index}" for index in range(int(first), int(last or first) + 1)]
    return ids


def parse_job_states(text: str) -> dict[str, JobState]:
    """``JOBID|STATE|REASON`` lines -> job id -> state.

    Both ``squeue -h -r -t all -o "%i|%T|%r"`` and ``sacct -n -P -X -o JobID,State,Reason`` print
    this. sacct's ``CANCELLED by 1000`` is ``CANCELLED``; a reason ``None`` is no reason; job steps
    (``123.batch``) are skipped; pending array ranges (``123_[2-5]``) give one entry per task.
    """
    states = {}
    for line in text.splitlines():
        fields = [field.strip() for field in line.split("|")]
        if len(fields) < 2 or not fields[0] or not fields[1] or "." in fields[0]:
            continue
        reason = fields[2] if len(fields) > 2 and fields[2] not in ("None", "(null)") else ""
        state = JobState(fields[1].split()[0].upper(), reason)
        for job_id in expand_job_ids(fields[0]):
            states[job_id] = state
    return states


class SlurmStates:
    """The states of many SLURM jobs, asked in one call per poll.

    squeue (``-t all``) lists the jobs the controller holds, ended ones included for MinJobAge
    (default 300 s); for the jobs it no longer lists, sacct answers where the cluster keeps
    accounting. A job that neither knows has ended (its state ``GONE``).
    """

    def __init__(self, run: Callable[..., Any] = subprocess.run) -> None:
        self.run = run
        self.sacct = shutil.which("sacct") is not None

    def poll(self, job_ids: list[str]) -> dict[str, JobState] | None:
        """Job id -> state for every id; None when squeue cannot answer now (the controller is busy)."""
        arrays = ",".join(sorted({job_id.split("_")[0] for job_id in job_ids}))
        answer = self._ask(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r", "-j", arrays])
        if answer is None:
            return None
        if answer.returncode != 0 and "invalid job id" not in (answer.stderr or "").lower():
            logger.warning("squeue failed (%s); asking again in the next poll", (answer.stderr or "").strip())
            return None
        states = parse_job_states(answer.stdout if answer.returncode == 0 else "")
        missing = [job_id for job_id in job_ids if job_id not in states]
        if missing and self.sacct:
            states.update({k: v for k, v in self._ask_sacct(missing).items() if k not in states})
        return {job_id: states.get(job_id, JobState("GONE")) for job_id in job_ids}

    def _ask_sacct(self, job_ids: list[str]) -> dict[str, JobState]:
        arrays = ",".join(sorted({job_id.split("_")[0] for job_id in job_ids}))
        answer = self._ask(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Reason", "-j", arrays])
        if answer is None or answer.returncode != 0:
            return {}
        if "accounting storage is disabled" in (answer.stdout + (answer.stderr or "")).lower():
            self.sacct = False  # this cluster keeps no accounting: squeue alone from now on
            return {}
        return parse_job_states(answer.stdout)

    def _ask(self, command: list[str]):
        try:
            return self.run(command, capture_output=True, text=True, timeout=60, check=False)
        except (OSError, subprocess.SubprocessError) as error:
            logger.warning("%s failed (%s); asking again in the next poll", command[0], error)
            return None


def wait_slurm(
    submitted: list[SubmittedRun],
    on_done,
    poll_s: float,
    states_of: Callable[[list[str]], dict[str, JobState] | None],
    on_stuck: Callable[[SubmittedRun, str], None] | None = None,
) -> None:
    """Return when every job has ended: its result file is written, or SLURM says it ended.

    A job whose state is one of :data:`ENDED_STATES` is done in that poll; one that SLURM no longer
    lists (``GONE``) in the next poll, if still unlisted (and without a result). ``on_stuck`` is
    called once per job pending for a reason in :data:`STUCK_REASONS`.
    """
    pending = list(submitted)
    unlisted: set[str] = set()
    told: set[str] = set()
    while pending:
        states = states_of([item.job_id for item in pending])
        for item in list(pending):
            state = (states or {}).get(item.job_id)
            if _result_written(item.job):
                pending.remove(item)
                _report(item, on_done)
            elif state is None:  # squeue did not answer: ask again next time
                continue
            elif state.ended or (state.state == "GONE" and item.job_id in unlisted):
                pending.remove(item)
                _report(item, on_done, state)
            elif state.state == "GONE":
                unlisted.add(item.job_id)
            else:
                unlisted.discard(item.job_id)
                why = state.stuck()
                if why and item.job_id not in told:
                    told.add(item.job_id)
                    message = (f"job {item.job_id} ({item.run.run_id}) pends with reason {state.reason}, which waiting "
                               f"will not change: {why}; cancel it with `scancel {item.job_id}`")
                    logger.warning("%s", message)
                    if on_stuck:
                        on_stuck(item, message)
        if pending:
            time.sleep(poll_s)


def _result_written(job) -> bool:
    """Whether the job wrote its result file (as submitit checks it, refreshing a network file system's cache)."""
    folder = job.paths.folder
    with contextlib.suppress(OSError):
        folder.chmod(folder.stat().st_mode)
    return job.paths.result_pickle.exists()


def _report(item: SubmittedRun, on_done, state: JobState | None = None) -> None:
    """Tell ``on_done`` how a job ended: its result, its error, or (no result file) the state SLURM gave it."""
    if state is not None and not _result_written(item.job):
        result, error = None, f"{state.describe()}: the job ended without a result"
        logger.error("job %s (%s) ended %s without a result", item.job_id, item.run.run_id, state.describe())
    else:
        try:
            result, error = item.job.result(), None
        except Exception as failure:  # noqa: BLE001 - a job's failure is reported, the others go on
            lines = str(failure).strip().splitlines()
            result, error = None, f"{type(failure).__name__}: {lines[-1] if lines else ''}"
            logger.error("job %s (%s) failed: %s", item.job_id, item.run.run_id, failure)
    if on_done:
        on_done(item, result, error)
