"""The search loop: an Optuna study (multi-objective, seeded) whose trials are pipeline runs.

Each trial fills the sampled values into the config and runs it with the ordinary runner in a work folder
(runs/<name>/search/work-<slot>/), so a trial whose leading passes match the previous one's reuses their
checkpoints by cache key; and every step a trial finishes is kept in the study's step store
(runs/<name>/search/steps/<key>/, hard links, shared by all work slots), so a step met again in any later trial
(a distillation whose value the sampler returns to) is placed from there instead of computed. A trial is
screened (quality on a slice, size); one that breaks a constraint there is pruned, one that a fully measured
trial beats on every screened objective is pruned too, and the rest get the full harness measurement when an
objective or constraint needs speed or memory. A trial that fails (a config the passes refuse, a check out of
tolerance, an exception) is a FAIL with its reason, never the search's end.

The study lives in runs/<name>/search/study.db (or `--storage URL`), created with load_if_exists, so a rerun
resumes and adds trials up to the budget; several processes can share one storage (each takes its own work
slot). A trial left RUNNING by a process of this machine that is gone is failed as interrupted and retried."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import CompressError, ConfigError

from ..config import validate
from ..runner import Runner
from .config import SearchSetup, start_point
from .figures import METRICS, QUALITY, dominates, is_cheap, with_ratios
from .measure import Measurer

_MAX_SLOTS = 64
_MAX_REPEATS = 25  # a sampler that keeps proposing tried recipes has converged (or the space is small)


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines go to the run's log (through the root logger), not to the terminal."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(optuna.logging.INFO)


def search_dir(setup: SearchSetup, output_dir: str | Path | None = None) -> Path:
    return Path(output_dir or setup.pipeline.config.output_dir) / setup.name / "search"


def storage_url(setup: SearchSetup, output_dir=None, storage: str | None = None) -> str:
    return storage or f"sqlite:///{(search_dir(setup, output_dir) / 'study.db').resolve()}"


def _sampler(setup: SearchSetup, seed: int):
    import optuna

    budget = setup.settings.budget.trials or 40
    kind = setup.settings.sampler
    # Constraints reach the samplers through each trial (`_judge`: Trial.set_constraint), not constraints_func.
    if kind in ("random", "grid"):  # grid: every combination is queued (_queue_grid); random past the queue
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(20, budget // 3)))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, budget // 3)), multivariate=True)


def _resumed_seed(seed: int, earlier: int) -> int:
    """The sampler's seed for a study resumed with `earlier` trials in it: another stream than the first
    run's, and the same one on every rerun from the same point."""
    import numpy as np

    return int(np.random.SeedSequence([seed, earlier]).generate_state(1)[0])


def _judge(trial, violations: list[float]) -> None:
    """Record by how much `trial` breaks each constraint (0: kept) as Optuna's per-trial constraints: the
    samplers read them (feasible when all are <= 0), and so does the report (report.trial_rows)."""
    for i, v in enumerate(violations):
        trial.set_constraint(f"c{i}", v)


def _range_values(p) -> list:
    return [p.low + k * p.step for k in range(p.size())]


def _queue_grid(setup: SearchSetup, study) -> None:
    """Queue every combination no trial has taken yet, in order (Optuna's GridSampler stops the study
    from inside `tell`, which an ask-and-tell loop cannot have)."""
    import itertools

    from optuna.trial import TrialState

    params = setup.space.params
    # a queued (WAITING) trial has no params yet, only the fixed ones it was queued with: taken too, or every
    # rerun of the search would queue the untried combinations once more
    taken = {json.dumps(t.params or t.system_attrs.get("fixed_params", {}), sort_keys=True)
             for t in study.get_trials(deepcopy=False)
             if t.state != TrialState.FAIL or took_budget(t)}
    axes = [[p.encode(v) for v in (p.choices if p.choices is not None else _range_values(p))] for p in params]
    for combo in itertools.product(*axes):
        point = {p.name: v for p, v in zip(params, combo)}
        if json.dumps(point, sort_keys=True) not in taken:
            study.enqueue_trial(point)


def open_study(setup: SearchSetup, url: str, seed: int):
    """The study named after the run in `url`: created, or loaded when it exists (a resumed search)."""
    import optuna
    from sqlalchemy.exc import ArgumentError

    quiet_optuna()
    directions = [d for _, d in setup.objectives]
    try:
        storage = optuna.storages.RDBStorage(url)
    except (ArgumentError, ImportError) as exc:  # not a URL, an unknown database, or its driver not installed
        raise ConfigError(f"--storage {url}: not a storage this machine can open ({type(exc).__name__}: {exc}); "
                          "give a database URL, e.g. sqlite:////abs/path/study.db or "
                          "postgresql://user@host/db (with its driver installed)") from None
    try:
        study = optuna.create_study(study_name=setup.name, storage=storage, directions=directions,
                                    sampler=_sampler(setup, seed), load_if_exists=True)
    except ValueError as exc:
        raise ConfigError(f"the study {setup.name!r} in {url} was made with other objectives ({exc}); give this "
                          "search another name, or remove the old study (e.g. its study.db)") from None
    # A rerun resumes the study only for the same question: its trials were judged by these objectives and
    # constraints (a trial pruned on the screen has no figures to judge again), and their recipes are points
    # of this space (Optuna refuses other values for a stored parameter, and a recipe of other options cannot
    # be written as this config's best.yaml).
    space = {p.name: list(p.choices) if p.choices is not None else [p.low, p.high, p.step, p.log]
             for p in setup.space.params}
    for key, wanted, verb in (("objectives", [list(o) for o in setup.objectives], "optimizes"),
                              ("constraints", [c.text for c in setup.constraints], "is constrained by"),
                              ("space", space, "searches")):
        stored = study.user_attrs.get(key)
        if stored is None:
            study.set_user_attr(key, wanted)
        elif stored != json.loads(json.dumps(wanted)):
            raise ConfigError(f"the study {setup.name!r} in {url} {verb} {stored}, this config {wanted}; give "
                              "this search another name, or remove the old study (e.g. its study.db)")
    # nor with another model, data, fixed pass option or measurement: its figures would sit beside the old ones
    wanted = json.loads(json.dumps(_conditions(setup)))
    stored = study.user_attrs.get("conditions")
    if stored is not None and "seed" not in stored:  # recorded before the seed was: measured at the default, 0
        stored = {**stored, "seed": 0}
    if stored is None:
        study.set_user_attr("conditions", wanted)
    elif stored != wanted:
        changed = ", ".join(k for k in wanted if stored.get(k) != wanted[k])
        raise ConfigError(f"the study {setup.name!r} in {url} was measured with other {changed} settings than "
                          "this config's; give this search another name, or remove the old study (e.g. its "
                          "study.db)")
    return study


def _conditions(setup: SearchSetup) -> dict:
    """What a trial's figures depend on besides its searched values: the seed too (every pass is seeded from it;
    a study resumed under another seed chose a recipe whose model was never measured)."""
    config = setup.pipeline.config.model_dump(mode="json", include={"model", "task", "data", "passes", "benchmark",
                                                                     "seed"})
    screen = setup.settings.screen
    return {**config, "screen": {"max_tokens": screen.max_tokens, "max_examples": screen.max_examples}}


@contextlib.contextmanager
def work_slot(root: Path):
    """The first free work folder (work-0, work-1, ...): one per search process, held by a lock file, so
    processes sharing a study never write into each other's checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    for slot in range(_MAX_SLOTS):
        fh = open(root / f".work-{slot}.lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            continue
        try:
            yield slot
        finally:
            fh.close()
        return
    raise ConfigError(f"{root}: all {_MAX_SLOTS} work slots are held by running searches")


@dataclass
class Progress:
    ran: int = 0  # trials this process ran
    passes_run: int = 0  # passes the runner computed (not reused) in them
    from_store: int = 0  # steps of them placed from the step store instead of computed
    stopped_by: str = ""
    source: dict = field(default_factory=dict)


class Search:
    def __init__(self, setup: SearchSetup, *, output_dir=None, storage: str | None = None, log=print,
                 runner_log=None, store_steps: bool = True):
        self.setup, self.log = setup, log
        self.runner_log = runner_log or (lambda *_: None)
        self.dir = search_dir(setup, output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store = self.dir / "steps" if store_steps else None  # finished steps by cache key, for all trials
        self.url = storage_url(setup, output_dir, storage)
        self.measurer = Measurer(setup, self.dir / ".measure", log=log)
        self.progress = Progress()

    # ------------------------------------------------------------------ the loop
    def run(self, trials: int | None = None, minutes: float | None = None):
        budget = self.setup.settings.budget
        trials = trials or budget.trials
        minutes = minutes or budget.minutes
        from optuna.trial import TrialState

        start = time.monotonic()
        with work_slot(self.dir) as slot:
            self.slot = slot
            seed = self.setup.pipeline.config.seed + slot
            study = open_study(self.setup, self.url, seed)
            self._recover_interrupted(study)
            earlier = len(study.get_trials(deepcopy=False))
            if not earlier:  # a new study: the given recipes first
                for recipe in self.setup.settings.start_with:
                    study.enqueue_trial(start_point(self.setup.space, recipe))
            else:  # resumed: a sampler seeded as before would propose the earlier run's recipes again, in order
                study.sampler = _sampler(self.setup, _resumed_seed(seed, earlier))
            if self.setup.settings.sampler == "grid":
                _queue_grid(self.setup, study)
            self.log(f"measuring the baseline{' (screen and full harness)' if self.setup.needs_full else ''}")
            self.progress.source = self.source_figures()
            size = self.setup.space.size()
            repeats = 0  # proposals in a row of recipes already tried
            while True:
                done = _finished(study)
                if repeats >= _MAX_REPEATS:
                    self.progress.stopped_by = (f"the sampler proposed {repeats} recipes in a row that were tried "
                                                "already or that the passes refuse")
                    break
                done = [t for t in done if t.user_attrs.get("same_as") is None]
                counted = _counted(done)
                if trials is not None and len(counted) >= trials:
                    self.progress.stopped_by = f"budget: {len(counted)} trial{'s' * (len(counted) != 1)}"
                    break
                if minutes is not None and time.monotonic() - start > minutes * 60:
                    self.progress.stopped_by = f"budget: {minutes:g} minutes"
                    break
                if size is not None and len({_values_key(t) for t in done}) >= size:
                    self.progress.stopped_by = f"every one of the {size} combinations has been tried"
                    break
                trial = study.ask({p.name: p.distribution() for p in self.setup.space.params})
                if trials is not None and _budget_taken(study, trial) >= trials:  # others started the last ones
                    trial.set_user_attr("reason", f"{NOT_RUN}: trials other processes started took the budget")
                    study.tell(trial, state=TrialState.FAIL)
                    self.progress.stopped_by = f"budget: {trials} trials, with those other processes are running"
                    break
                idle = self._trial(study, trial)
                repeats = repeats + 1 if idle else 0
                self.progress.ran += not idle
            if self.progress.ran:
                self.log(f"{self.progress.ran} trials: {self.progress.passes_run} passes run, "
                         f"{self.progress.from_store} steps taken from the step store")
            return study

    def _recover_interrupted(self, study) -> None:
        """Fail the trials a dead process of this machine left RUNNING, and queue their values again."""
        import optuna
        from optuna.trial import TrialState

        from ..runner import _pid_alive

        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("host") != socket.gethostname() or _pid_alive(str(t.user_attrs.get("pid", ""))):
                continue
            optuna.trial.Trial(study, t._trial_id).set_user_attr("reason", "interrupted (its process ended); "
                                                                  "queued again")
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params)
            self.log(f"trial {t.number}: interrupted by an earlier search process; queued again")

    def _baseline(self) -> tuple[str, str]:
        """What ratios divide by: the source model, or the step `benchmark.baseline` names (its fixed passes run
        once through the runner, in the work folder, so the trials reuse them)."""
        setup = self.setup
        k = setup.baseline_step
        if k is None:
            return setup.pipeline.config.model.source, "torch"
        raw = setup.pipeline_raw(setup.space.first())
        raw.update(name=f"work-{self.slot}", benchmark=None, passes=raw["passes"][:k])
        steps = Runner(validate(raw), output_dir=self.dir, show_progress=False, log=self.runner_log,
                       store=self.store).run().steps
        return steps[-1].path, steps[-1].kind

    def source_figures(self) -> dict:
        """The baseline's screened and (when needed) fully measured figures: what ratios divide by."""
        target, kind = self._baseline()
        out = {"target": str(target), "screen": self.measurer.screen(target)}
        if self.setup.needs_full:
            full = self.measurer.full(target, kind)
            if "error" in full:
                raise CompressError(f"measuring the baseline {target} failed: {full['error']}")
            out["full"] = full
        return out

    # ------------------------------------------------------------------ one trial
    def _trial(self, study, trial) -> bool:
        """Run one trial; True when nothing ran: it repeated a finished one (its result copied) or the passes
        refuse its combination of values (each value is valid alone, checked before the search: e.g. minmax
        with weight_bits 8), which costs no budget."""
        from optuna.trial import TrialState

        space = self.setup.space
        values = {p.name: p.decode(trial.params[p.name]) for p in space.params}
        options = space.options(values)
        for k, v in {"values": values, "options": options, "host": socket.gethostname(),
                     "pid": os.getpid()}.items():
            trial.set_user_attr(k, v)
        same = _same_values(study, values, trial.number)
        if same is not None:  # the sampler proposed a finished recipe again: its result, not a second run
            for k in ("figures", "screen", "feasible", "reason", "backend"):
                if k in same.user_attrs:
                    trial.set_user_attr(k, same.user_attrs[k])
            for key, v in same.constraints.items():
                trial.set_constraint(key, v)
            trial.set_user_attr("same_as", same.number)
            study.tell(trial, same.values if same.state == TrialState.COMPLETE else None, state=same.state)
            self._say(trial.number, options, f"same as trial {same.number} ({same.state.name.lower()})")
            return True
        self._say(trial.number, options, "running")  # a trial's passes and measurement can take minutes
        started = time.monotonic()
        state, objective_values, note = self._evaluate(study, trial, values)
        trial.set_user_attr("seconds", round(time.monotonic() - started, 2))
        study.tell(trial, objective_values, state=state)
        self._say(trial.number, options, note)
        return bool(trial.user_attrs.get("refused"))

    def _evaluate(self, study, trial, values):
        from optuna.trial import TrialState

        setup = self.setup

        def fail(reason: str):
            trial.set_user_attr("reason", reason)
            return TrialState.FAIL, None, f"failed: {reason}"

        raw = setup.pipeline_raw(values)
        raw.update(name=f"work-{self.slot}", benchmark=None)
        try:
            pipeline = validate(raw)
        except ConfigError as exc:
            trial.set_user_attr("refused", True)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            trial.set_user_attr("reason", reason)
            return TrialState.FAIL, None, f"refused by the passes (not counted): {reason}"
        try:
            result = Runner(pipeline, output_dir=self.dir, show_progress=False, log=self.runner_log,
                            store=self.store).run()
        except CompressError as exc:
            return fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except Exception as exc:  # a pass's own failure (an unsupported shape, a library error): the trial's
            return fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))
        self.progress.passes_run += sum(not s.reused for s in result.steps)
        self.progress.from_store += sum(s.from_store for s in result.steps)
        last = result.steps[-1] if result.steps else None
        target, kind = (last.path, last.kind) if last else (setup.pipeline.config.model.source, "torch")
        try:
            screen = with_ratios(self.measurer.screen(target), self.progress.source["screen"])
        except Exception as exc:
            return fail(f"screening failed: {type(exc).__name__}: {exc}")
        trial.set_user_attr("screen", screen)
        broken = self._broken(screen)
        if broken:
            trial.set_user_attr("figures", screen)
            _judge(trial, self._violations(screen))
            trial.set_user_attr("feasible", False)
            trial.set_user_attr("reason", f"screen: {broken}")
            return TrialState.PRUNED, None, f"pruned on the screen: {broken}"
        figures = screen
        if setup.needs_full:
            better = self._beaten_on_screen(study, screen)
            if better is not None:
                trial.set_user_attr("figures", screen)
                _judge(trial, [0.0] * len(setup.constraints))
                reason = f"screen: trial {better} is as good or better on every screened objective"
                trial.set_user_attr("reason", reason)
                return TrialState.PRUNED, None, f"pruned: {reason}"
            full = self.measurer.full(target, kind)
            if "error" in full:
                return fail(f"measurement failed: {full['error']}")
            trial.set_user_attr("backend", full.pop("backend"))
            figures = with_ratios(full, self.progress.source["full"])
        trial.set_user_attr("figures", figures)
        # a constraint whose figure is unknown here would be skipped, and the trial counted as meeting it
        missing = list(dict.fromkeys([n for n, _ in setup.objectives if figures.get(n) is None]
                                     + [c.name for c in setup.constraints if figures.get(c.name) is None]))
        if missing:
            return fail(f"{', '.join(missing)} not known for this checkpoint (not measured, or a ratio to a "
                        "baseline figure of 0)")
        broken = self._broken(figures)
        _judge(trial, self._violations(figures))
        trial.set_user_attr("feasible", not broken)
        if broken:
            trial.set_user_attr("reason", broken)
        return TrialState.COMPLETE, [figures[n] for n, _ in setup.objectives], \
            "complete" + (f", breaks {broken}" if broken else "")

    def _violations(self, figures: dict) -> list[float]:
        return [c.violation(figures) or 0.0 for c in self.setup.constraints]

    def _broken(self, figures: dict) -> str:
        """The constraints `figures` break (those whose figure is known), as text; "" when none."""
        out = []
        for c in self.setup.constraints:
            v = c.violation(figures)
            if v:
                out.append(f"{c.text} ({c.name} = {figures[c.name]:.4g})")
        return "; ".join(out)

    def _beaten_on_screen(self, study, screen: dict) -> int | None:
        """A fully measured trial at least as good on every screened objective and on screened quality, and
        better on one (None: none, or skipping is off, or no objective is screened). A model larger and worse
        than a measured one is rarely faster; larger alone says nothing of speed (low-rank or 4-bit grids
        trade size and speed differently), so quality is always part of the comparison."""
        from optuna.trial import TrialState

        cheap = [(n, d) for n, d in self.setup.objectives if is_cheap(n)]
        if not cheap or not self.setup.settings.screen.skip_dominated:
            return None
        quality = QUALITY.get(self.setup.pipeline.config.task)
        if quality and quality not in dict(cheap):
            cheap.append((quality, METRICS[quality][0]))
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            other = t.user_attrs.get("screen") or {}
            if t.user_attrs.get("feasible", True) and dominates(other, screen, cheap):
                return t.number
        return None

    def _say(self, number: int, options: dict, note: str) -> None:
        opts = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in options.items())
        self.log(f"trial {number}: {opts} -> {note}")


NOT_RUN = "not run"  # the reason of a trial asked for and given back: other processes took the budget meanwhile


def given_back(t) -> bool:
    """A trial asked for and given back unrun (no recipe was tried)."""
    return (t.user_attrs.get("reason") or "").startswith(NOT_RUN)


def took_budget(t) -> bool:
    """A trial that is part of the study's budget: not one failed as interrupted (it is retried) or given
    back unrun."""
    return "interrupted" not in (t.user_attrs.get("reason") or "") and not given_back(t)


def _finished(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                 TrialState.FAIL)) if took_budget(t)]


def _budget_taken(study, trial) -> int:
    """Trials that count against the budget ahead of `trial` (just asked for): the finished ones, and those
    other processes sharing the storage started before it (they are running; most will count)."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len(_counted(_finished(study))) + sum(t.number < trial.number for t in running)


def _counted(finished: list) -> list:
    """The finished trials the budget counts: repeats of a recipe and refusals are free."""
    return [t for t in finished if t.user_attrs.get("same_as") is None and not t.user_attrs.get("refused")]


def _values_key(t) -> str:
    return json.dumps(t.user_attrs.get("values"), sort_keys=True)


def _same_values(study, values: dict, number: int):
    """A finished trial (not failed by an interruption, not itself a repeat) with these values, else None."""
    key = json.dumps(values, sort_keys=True)
    for t in _finished(study):
        if t.number != number and _values_key(t) == key and t.user_attrs.get("same_as") is None:
            return t
    return None

