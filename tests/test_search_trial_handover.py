"""A trial whose thread is still ending when the next trial starts must not hang the study.

Ray Tune can hand a finished trial's process to the next trial (``reuse_actors``): it then waits
``TUNE_FUNCTION_THREAD_TIMEOUT_S`` (2 s by default) for the old trial's thread to end and, when it has
not, marks the new trial ERROR without telling the searcher or the callbacks. The Optuna trial then
stays RUNNING, the concurrency limiter keeps its slot, and Ray waits for a next trial forever. A
trial that ASHA stops unwinds from its report, which takes longer than that on a loaded machine
(the Ray workers run niced: a training run beside the study starved them into exactly this).

Here the timeout is 0, so every handover to a process whose thread is still unwinding would fail:
the study must end anyway, every trial recorded as it ended."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
from optuna.trial import TrialState
from tiny_model import DATA_DIR, TINY_BERT, needs_data

from search.storage import PROJECT_ROOT

TRIALS = 4
STUDY_TOML = f"""
description = "tiny random BERT; ASHA stops some trials after their first epoch"
tasks = ["sts"]

[objective]
metric = "sts"
direction = "maximize"

[budget]
trials = {TRIALS}
max_epochs = 2
grace_period = 1
reduction_factor = 2
max_concurrent = 1
cpus_per_trial = 1
seed = 9
startup_trials = {TRIALS}  # random sampling

[search]
# On these 32 dev rows the untrained model (lr 1e-9) scores r 0.290 and one trained at 1e-3 0.275 at
# epoch 1: ASHA stops a 1e-3 trial at the first rung.
lr = {{ choices = [1e-9, 1e-3] }}

[fixed]
model_config = {json.dumps(TINY_BERT).replace('": ', '" = ')}
train_limit = 32
eval_limit = 32
max_length = 32
batch_size = 8
steps_per_epoch = 4

[[start_points]]
lr = 1e-9
"""


@needs_data
def test_a_trial_stopped_mid_run_does_not_hang_the_next_one(tmp_path):
    study_file = tmp_path / "handover.toml"
    study_file.write_text(STUDY_TOML)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    command = [sys.executable, str(PROJECT_ROOT / "run_search.py"), "--study", str(study_file), "--storage", url]
    command += ["--results-dir", str(tmp_path / "results"), "--data-dir", str(DATA_DIR)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "TUNE_FUNCTION_THREAD_TIMEOUT_S": "0"}
    # A hang is what this guards against: a few trials take well under a minute, Ray's wait is endless.
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420, start_new_session=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    trials = optuna.load_study(study_name="handover", storage=url).get_trials()
    states = [t.state for t in trials]
    assert len(trials) == TRIALS and TrialState.RUNNING not in states, states
    # The case that hung: a trial stopped at the first rung, then another trial started after it.
    assert TrialState.PRUNED in states[:-1], states
    assert "Could not re-use actor" not in run.stdout + run.stderr
