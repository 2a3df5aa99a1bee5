"""``fwlab sweep FILE``: hyperparameter sweeps over any config keys, with or without a server.

A sweep file (``configs/sweep/<name>.yaml``) uses W&B's sweep vocabulary, so one file serves
both engines::

    name: retrieval_cells
    model: fast_weights          # --model/--data of every trial, unless a parameter picks them
    data: retrieval
    overrides: [trainer.max_steps=1500]      # fixed for every trial
    method: grid                 # grid | random | bayes
    metric: {name: val/acc, goal: maximize}
    trials: 9                    # random/bayes: how many; grid: at most the grid's size
    parameters:
      model: {values: [fast_weights, lstm, irnn]}
      model.hidden_size: {values: [20, 50, 100]}
      optim.lr: {min: 1.0e-4, max: 1.0e-2, distribution: log_uniform_values}

Parameters: ``values`` (a choice), ``value`` (fixed), or ``min``/``max`` with ``distribution``
``uniform``, ``int_uniform`` or ``log_uniform_values``. The metric: ``val/<m>`` is the best
validation value, the one that chose the tested checkpoint (so ``<m>`` must be the model's
checkpoint monitor); ``test/<m>`` is the tested checkpoint's value.

Engines:

- ``--backend optuna`` (no server): an Optuna study in a journal file under the sweep
  directory (safe on shared file systems), grid/random/TPE samplers; ``--workers N`` runs N
  trials at a time here, and ``fwlab slurm sweep FILE --array K`` runs K such workers as a SLURM
  array, all joining the same study. Each trial is a real ``fwlab`` run in
  ``<sweep dir>/trials/<number>``.
- ``--backend wandb``: creates the W&B sweep and runs ``wandb agent`` (``--count``); on a
  cluster, ``fwlab slurm sweep FILE --backend wandb --array K`` runs one agent per array task.
  ``--dry-run`` prints the sweep config and the agent command without contacting W&B.

At the end: a table of every trial's parameters and metric, the best marked.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwlab.config import load_yaml
from fwlab.errors import ConfigError, FwlabError
from fwlab.stop_request import StopRequest

METHODS = ("grid", "random", "bayes")
GOALS = {"maximize": "maximize", "minimize": "minimize"}
DISTRIBUTIONS = ("uniform", "int_uniform", "log_uniform_values")
SWEEP_KEYS = {
    "name", "command", "model", "data", "overrides", "method", "metric", "trials",
    "parameters", "seed", "project", "entity",
}  # fmt: skip


@dataclass
class SweepSpec:
    name: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    command: str = "fit"
    model: str | None = None
    data: str | None = None
    overrides: list[str] = field(default_factory=list)
    trials: int | None = None
    seed: int = 0
    project: str = "fwlab"
    entity: str | None = None

    @property
    def grid(self) -> dict[str, list[Any]]:
        """The search space of a grid: every parameter must be ``values`` or ``value``."""
        space = {}
        for key, spec in self.parameters.items():
            values = listed_values(spec)
            if values is None:
                raise ConfigError(f"sweep {self.name}: grid parameter '{key}' needs values")
            space[key] = values
        return space

    def grid_size(self) -> int:
        return math.prod(len(values) for values in self.grid.values())


def listed_values(parameter: dict[str, Any]) -> list[Any] | None:
    """A parameter's values as listed (``values``, or ``value`` as the one), or ``None`` for a
    ``min``/``max`` range."""
    if "values" in parameter:
        return list(parameter["values"])
    return [parameter["value"]] if "value" in parameter else None


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; every error names the file and the key."""
    path = Path(path)
    raw = load_yaml(path)
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown sweep keys {sorted(unknown)}; known: {sorted(SWEEP_KEYS)}"
        )
    method = raw.get("method", "grid")
    if method not in METHODS:
        raise ConfigError(f"{path}: method '{method}' is not one of {', '.join(METHODS)}")
    metric = raw.get("metric") or {}
    if not isinstance(metric, dict) or "name" not in metric:
        raise ConfigError(f"{path}: metric needs a name, e.g. {{name: val/acc, goal: maximize}}")
    goal = metric.get("goal", "maximize")
    if goal not in GOALS:
        raise ConfigError(f"{path}: metric.goal '{goal}' is not maximize or minimize")
    if not str(metric["name"]).startswith(("val/", "test/")):
        raise ConfigError(f"{path}: metric.name '{metric['name']}' must start with val/ or test/")
    parameters = raw.get("parameters") or {}
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{path}: parameters must map config keys to their ranges")
    for key, spec in parameters.items():
        _check_parameter(path, key, spec)
    spec = SweepSpec(
        name=str(raw.get("name", path.stem)),
        method=method,
        metric=str(metric["name"]),
        goal=goal,
        parameters=parameters,
        command=str(raw.get("command", "fit")),
        model=raw.get("model"),
        data=raw.get("data"),
        overrides=[str(o) for o in raw.get("overrides", [])],
        trials=raw.get("trials"),
        seed=int(raw.get("seed", 0)),
        project=str(raw.get("project", "fwlab")),
        entity=raw.get("entity"),
    )
    if spec.command not in ("fit",):
        raise ConfigError(f"{path}: command '{spec.command}': sweeps run fit")
    if method != "grid" and not spec.trials:
        raise ConfigError(f"{path}: a {method} sweep needs trials: N")
    if method == "grid":
        spec.grid_size()  # every parameter has values
    return spec


def _check_parameter(path: Path, key: str, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: parameter '{key}' must be a mapping (values/value/min+max)")
    if "values" in spec:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{path}: parameter '{key}': values must be a non-empty list")
    elif "value" not in spec:
        if "min" not in spec or "max" not in spec:
            raise ConfigError(f"{path}: parameter '{key}' needs values, value, or min and max")
        distribution = spec.get("distribution", "uniform")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"{path}: parameter '{key}': distribution '{distribution}' is not one of "
                f"{', '.join(DISTRIBUTIONS)}"
            )


def trial_command(
    spec: SweepSpec, values: dict[str, Any], plugins: list[str], extra: list[str]
) -> list[str]:
    """The ``fwlab`` command line of one trial with these parameter values (``extra``: further
    overrides for every trial, e.g. the devices of a SLURM allocation)."""
    arguments = [spec.command]
    if spec.model and "model" not in spec.parameters:  # model=<choice> would lose to --model
        arguments += ["--model", spec.model]
    if spec.data and "data" not in spec.parameters:
        arguments += ["--data", spec.data]
    for plugin in plugins:
        arguments += ["--plugin", plugin]
    arguments += [*spec.overrides, *extra]
    arguments += [f"{key}={_format(value)}" for key, value in values.items()]
    return [sys.executable, "-m", "fwlab", *arguments]


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


# a grid larger than this is checked as a random sweep is: each parameter's values in turn
MAX_CHECKED_POINTS = 256


def checked_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The parameter values whose trial configs :func:`check_trials` composes: every point of
    a grid (of at most :data:`MAX_CHECKED_POINTS`), else each parameter at each of its values,
    or at its min and max, the others at their first."""
    candidates = {}
    for key, parameter in spec.parameters.items():
        listed = listed_values(parameter)
        candidates[key] = [parameter["min"], parameter["max"]] if listed is None else listed
    if spec.method == "grid" and spec.grid_size() <= MAX_CHECKED_POINTS:
        return [dict(zip(candidates, point)) for point in itertools.product(*candidates.values())]
    first = {key: values[0] for key, values in candidates.items()}
    return [first | {key: value} for key, values in candidates.items() for value in values]


def check_trials(
    spec: SweepSpec, plugins: list[str], extra: list[str], build_models: bool = True
) -> None:
    """Raise :class:`ConfigError` before any trial runs if a trial's config would not compose
    (a mistyped key, a value out of its field's bounds) or a ``val/`` metric is not its model's
    checkpoint monitor: otherwise every trial fails the same way, one after another.
    ``build_models=False`` composes only: where the trials will run elsewhere (a SLURM login
    node may lack what building a model checks for, a GPU for ``model.kernel=triton``)."""
    from fwlab.config import compose
    from fwlab.objective import objective_of
    from fwlab.registry import default_registry
    from fwlab.training import build_model_and_data

    registry = default_registry(plugins)
    monitors: dict[str, str] = {}  # by model name: built once each
    for values in checked_points(spec):
        overrides = [*spec.overrides, *extra, *(f"{k}={_format(v)}" for k, v in values.items())]
        model = None if "model" in values else spec.model
        try:
            config = compose(registry, model=model, data=spec.data, overrides=overrides)
            wants_monitor = build_models and spec.metric.startswith("val/")
            if wants_monitor and config.model.name not in monitors:
                built, _ = build_model_and_data(config, registry)
                monitors[config.model.name] = f"val/{objective_of(built).monitor}"
        except FwlabError as error:
            raise ConfigError(f"sweep {spec.name}, trial {_describe(values)}: {error}") from None
        monitor = monitors.get(config.model.name, spec.metric)
        if monitor != spec.metric:
            raise ConfigError(
                f"sweep {spec.name}: metric {spec.metric} is not the checkpoint monitor of "
                f"model {config.model.name} ({monitor}): use that, or a test/ metric"
            )


def metric_value(results: dict[str, Any], metric: str) -> float:
    """The sweep metric from a run's ``results.json``."""
    best = results.get("best") or {}
    if metric.startswith("val/"):
        if best.get("monitor") != metric or best.get("value") is None:
            raise FwlabError(
                f"sweep metric {metric} is not this run's checkpoint monitor "
                f"({best.get('monitor')}): use that, or a test/ metric"
            )
        return float(best["value"])
    if metric not in results.get("metrics", {}):
        raise FwlabError(f"sweep metric {metric} is not among {sorted(results['metrics'])}")
    return float(results["metrics"][metric])


def published_value(results: dict[str, Any], metric: str) -> float | None:
    """The published value of ``metric`` that a run's ``results.json`` sets beside its own (from
    its config's ``published`` entries: :mod:`fwlab.published`), or ``None``."""
    for comparison in results.get("published") or []:
        if metric in comparison["metrics"]:
            return float(comparison["metrics"][metric]["published"])
    return None


# -- Optuna, no server ------------------------------------------------------------------------
class TrialFailed(Exception):
    """A trial's fwlab run exited with an error (its log names it)."""


class TrialInterrupted(Exception):
    """The sweep was stopped while the trial ran, or before it started (Ctrl-C, SIGTERM)."""


INTERRUPTED = "interrupted"  # the user attribute that marks such a trial


def _sampler(spec: SweepSpec) -> Any:
    import optuna

    if spec.method == "grid":
        return optuna.samplers.GridSampler(spec.grid, seed=spec.seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def _suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    if "values" in spec:
        return trial.suggest_categorical(key, spec["values"])
    if "value" in spec:
        return spec["value"]
    distribution = spec.get("distribution", "uniform")
    if distribution == "int_uniform" or (
        isinstance(spec["min"], int) and isinstance(spec["max"], int) and "distribution" not in spec
    ):
        return trial.suggest_int(key, int(spec["min"]), int(spec["max"]))
    log = distribution == "log_uniform_values"
    return trial.suggest_float(key, float(spec["min"]), float(spec["max"]), log=log)


def open_study(spec: SweepSpec, sweep_dir: Path) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    sweep_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
    # ERROR: a failed trial is reported in one line by run_optuna, not by Optuna's warning
    # with the exception's traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=_sampler(spec),
        direction=GOALS[spec.goal],
        load_if_exists=True,
    )


def available_cpus() -> int:
    """The CPUs this process may run on (a SLURM job's or a container's share, not the
    machine's)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def trial_environment(workers: int) -> dict[str, str]:
    """What a trial's environment adds so that ``workers`` trials at a time share the CPUs: each
    an equal part of them (``OMP_NUM_THREADS``, which sizes torch's intra-op threads and so fwlab's
    C kernels' too), unless the user set it. Left to itself every trial starts a thread per CPU:
    two trials at a time on 2 cores, each with 2 threads, took 3.3× as long per training step as
    with 1 each (fast weights at the retrieval shape; lru_ntm 2.8×), so ``--workers 2`` ran the
    sweep slower than ``--workers 1``. (Lightning shares out the CPUs the same way among the
    processes of a DDP run it starts.)"""
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, available_cpus() // workers))}


def run_optuna(
    spec: SweepSpec,
    sweep_dir: Path,
    workers: int,
    plugins: list[str],
    extra: list[str],
    requeue: bool = True,
) -> tuple[Any, int | None]:
    """Run trials until the sweep has ``spec.trials`` (grid: the grid) done trials, at most
    ``workers`` at a time, sharing the CPUs (:func:`trial_environment`); returns the study and
    the signal that stopped the sweep, if one did (:mod:`fwlab.stop_request`). Trials a stop
    interrupted are not done: ``requeue`` runs their parameters again first (a SLURM array's
    workers leave that to ``fwlab slurm sweep``, so that they do not each queue them)."""
    import optuna

    study = open_study(spec, sweep_dir)
    total = spec.grid_size() if spec.method == "grid" else int(spec.trials or 0)
    if spec.method == "grid" and spec.trials:
        total = min(total, int(spec.trials))
    if requeue:
        requeue_interrupted(study)
    lock = threading.Lock()
    shared_cpus = trial_environment(workers)
    stop = StopRequest()

    def objective(trial: optuna.Trial) -> float:
        values = {key: _suggest(trial, key, p) for key, p in spec.parameters.items()}
        run_dir = sweep_dir / "trials" / f"{trial.number:04d}"
        command = trial_command(spec, values, plugins, extra)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("command", shlex.join(command))
        started = stop.signal is None
        if started:
            with lock:
                print(f"trial {trial.number}: {_describe(values)}", flush=True)
            env = {**os.environ, **shared_cpus, "FWLAB_RUN_DIR": str(run_dir.resolve())}
            log_path = sweep_dir / "logs" / f"trial-{trial.number:04d}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "w") as log:
                status = stop.call(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if stop.signal is not None:
            trial.study.stop()  # no new trial; one that ended well as it came stays complete
            if not started or status != 0:  # stopped, or never started: run again on a rerun
                trial.set_user_attr(INTERRUPTED, True)
                raise TrialInterrupted(f"trial {trial.number}")
        try:
            if status != 0:
                raise TrialFailed(f"exit {status}: {_error_line(log_path)}")
            results = json.loads((run_dir / "results.json").read_text())
            published = published_value(results, spec.metric)
            if published is not None:  # the trial's config carries the paper's number for it
                trial.set_user_attr("published", published)
            return metric_value(results, spec.metric)
        except (TrialFailed, FwlabError) as error:  # one line here; the table marks it failed
            with lock:
                print(f"trial {trial.number} failed ({error}); log: {log_path}", flush=True)
            raise

    def stop_when_all_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if done(study) >= total:
            study.stop()

    remaining = total - done(study)
    if remaining > 0 and shared_cpus:
        threads = shared_cpus["OMP_NUM_THREADS"]
        print(f"{workers} trials at a time, {threads} CPU thread(s) each (OMP_NUM_THREADS)")
    if remaining > 0:
        with stop.on_signals():
            study.optimize(
                objective,
                n_trials=remaining,
                n_jobs=workers,
                catch=(TrialFailed, FwlabError, TrialInterrupted),
                callbacks=[stop_when_all_done],
            )
    return study, stop.signal


def interrupted(trial: Any) -> bool:
    """Whether a stop of the sweep interrupted ``trial`` (or came before it started)."""
    return bool(trial.user_attrs.get(INTERRUPTED))


def done(study: Any) -> int:
    """The trials that count towards the sweep's total: those that completed or failed, not
    those a stop interrupted."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    return sum(not interrupted(t) for t in study.get_trials(deepcopy=False, states=states))


def requeue_interrupted(study: Any) -> int:
    """Queue the parameters of every interrupted trial again, unless a trial that is not an
    interrupted one has them (done, running, or queued: a queued trial's are its
    ``fixed_params``); returns how many were queued. Optuna takes queued trials first."""
    trials = study.get_trials(deepcopy=False)
    taken = [t.params or t.system_attrs.get("fixed_params", {}) for t in trials
             if not interrupted(t)]  # fmt: skip
    queued = 0
    for trial in trials:
        if interrupted(trial) and trial.params and trial.params not in taken:
            study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number})
            taken.append(trial.params)
            queued += 1
    return queued


def _error_line(log_path: Path) -> str:
    """What a failed trial's log says went wrong: its ``fwlab: error:`` line, or its last."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("fwlab: error:")]
    return (errors or lines or ["(an empty log)"])[-1]


def completed(study: Any) -> int:
    """How many of the study's trials completed."""
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def results_table(spec: SweepSpec, study: Any, sweep_dir: Path) -> str:
    """Every trial's parameters and metric, the best marked; also written as CSV and JSON."""
    import optuna

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = study.best_trial.number if complete else None
    keys = list(spec.parameters)
    # a column of the papers' numbers where trials' configs carry them (experiment presets)
    published = any("published" in trial.user_attrs for trial in trials)
    rows = []
    for trial in trials:
        rows.append({
            "trial": trial.number,
            **{key: trial.params.get(key, spec.parameters[key].get("value")) for key in keys},
            spec.metric: trial.value,
            **({"published": trial.user_attrs.get("published")} if published else {}),
            "state": INTERRUPTED if interrupted(trial) else trial.state.name.lower(),
            "best": trial.number == best,
            "run_dir": trial.user_attrs.get("run_dir", ""),
        })  # fmt: skip
    with open(sweep_dir / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")

    numbers = [spec.metric, *(["published"] if published else [])]
    header = ["", "trial", *keys, *numbers, "state"]
    body = [
        ["★" if row["best"] else "", str(row["trial"]), *(str(row[k]) for k in keys),
         *("" if row[n] is None else f"{row[n]:.4f}" for n in numbers), row["state"]]
        for row in rows
    ]  # fmt: skip
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in
             [header, *body]]  # fmt: skip
    goal = "highest" if spec.goal == "maximize" else "lowest"
    lines.append(f"★ best ({goal} {spec.metric})" if best is not None else "no trial completed")
    return "\n".join(lines)


def default_sweep_dir(spec: SweepSpec) -> Path:
    return Path("sweeps") / spec.name


def _describe(values: dict[str, Any]) -> str:
    return " ".join(f"{key}={_format(value)}" for key, value in values.items())


# -- W&B sweeps ---------------------------------------------------------------------------------
def wandb_sweep_config(spec: SweepSpec, plugins: list[str], extra: list[str]) -> dict[str, Any]:
    """The sweep config sent to W&B: the agent runs the trial command with each run's values
    as ``key=value`` (``${args_no_hyphens}``); the metric is read from the run's summary, where
    fwlab stores the best validation value as ``best/<monitor>``."""
    fixed = trial_command(spec, {}, plugins, extra)
    metric = f"best/{spec.metric}" if spec.metric.startswith("val/") else spec.metric
    config: dict[str, Any] = {
        "name": spec.name,
        "method": spec.method,
        "metric": {"name": metric, "goal": spec.goal},
        "parameters": spec.parameters,
        "command": ["${env}", *fixed, "logger=wandb", "${args_no_hyphens}"],
    }
    if spec.method == "grid" or spec.trials:
        config["run_cap"] = spec.grid_size() if spec.method == "grid" else spec.trials
    return config


def wandb_agent_command(spec: SweepSpec, sweep_id: str, count: int | None) -> list[str]:
    path = "/".join(p for p in (spec.entity, spec.project, sweep_id) if p)
    return ["wandb", "agent", *(["--count", str(count)] if count else []), path]


def create_wandb_sweep(spec: SweepSpec, config: dict[str, Any]) -> str:
    """Create the sweep on the W&B server; a clear error, at once, when it cannot be reached."""
    from fwlab.loggers import wandb_online

    if not wandb_online("auto"):
        raise FwlabError(
            "W&B sweeps need the W&B server (credentials and network), which is not reachable "
            "from here: use --backend optuna, or --dry-run to see what would be sent"
        )
    import wandb

    return wandb.sweep(config, project=spec.project, entity=spec.entity)


def run_wandb(
    spec: SweepSpec, plugins: list[str], extra: list[str], count: int | None, dry_run: bool
) -> int:
    config = wandb_sweep_config(spec, plugins, extra)
    if dry_run:
        print("W&B sweep config (not sent):")
        print(json.dumps(config, indent=2))
        print("agent command:   " + shlex.join(wandb_agent_command(spec, "<SWEEP_ID>", count)))
        return 0
    sweep_id = create_wandb_sweep(spec, config)
    command = wandb_agent_command(spec, sweep_id, count)
    print(f"W&B sweep {sweep_id}; agent: {shlex.join(command)}", flush=True)
    return subprocess.call(command)
