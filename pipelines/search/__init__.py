"""`compress search`: a multi-objective search over the passes' options (Optuna), each trial a pipeline run.

    space.py    the `{search: ...}` options of a config and their checks against the passes' own options
    config.py   the search config: a pipeline config plus objectives, constraints, budget, screen, sampler
    figures.py  metric names and directions, ratios to the source, constraints, Pareto dominance
    measure.py  the cheap screen (quality on a slice, size) and the full harness measurement
    study.py    the Optuna study and the trial loop (runner, screen, prune, measure, resume)
    report.py   trials.json, report.md / report.html with the front plotted, best.yaml"""
from __future__ import annotations


def run_search(config_path, *, overrides=None, trials: int | None = None, minutes: float | None = None,
               pick: int | None = None, storage: str | None = None, output_dir=None, log=print, runner_log=None):
    """Load the search config, run (or, with `pick`, only read) the study, write the outputs; returns
    (Outcome, Search)."""
    from . import report
    from .config import load_search_config
    from .study import Search, open_study, work_slot

    setup = load_search_config(config_path, overrides)
    search = Search(setup, output_dir=output_dir, storage=storage, log=log, runner_log=runner_log)
    if pick is None:
        study = search.run(trials=trials, minutes=minutes)
    else:  # only the outputs for the picked trial: no new trials
        study = open_study(setup, search.url, setup.pipeline.config.seed)
        with work_slot(search.dir) as search.slot:  # the baseline's figures (stored: nothing is measured again)
            search.progress.source = search.source_figures()
    outcome = report.choose(setup, report.trial_rows(study), pick)
    outcome.files = report.write(setup, outcome, search.dir, search.progress.source, search.progress.stopped_by,
                                 conditions=search.measurer.conditions(), screen_slice=search.measurer.slice)
    return outcome, search


__all__ = ["run_search"]
