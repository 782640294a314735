"""Study files: the shipped ones load, and every kind of bad file fails at once naming the file and key."""

from __future__ import annotations

import re

import optuna
import pytest

from model.config import TrainConfig
from search.study import STUDIES_DIR, StudyError, load_spec

GOOD = """
tasks = ["sts"]

[objective]
metric = "sts"
direction = "maximize"

[budget]
trials = 4
max_epochs = 3
grace_period = 1

[search]
lr = { low = 1e-5, high = 1e-3, log = true }
dropout = { low = 0.0, high = 0.2 }
batch_size = { choices = [16, 32] }
freeze_layers = { low = 0, high = 3 }

[fixed]
max_length = 64
pair_encoding = "bi"
"""

# Three tasks, the overall objective, gradient surgery searched; same budget as GOOD.
MULTI = (
    GOOD.replace('tasks = ["sts"]', 'tasks = ["sst", "para", "sts"]')
    .replace('metric = "sts"', 'metric = "overall"')
    .split("[search]")[0]
    + '[search]\nsurgery = { choices = ["none", "pcgrad", "gradvac"] }\n'
)


def write(tmp_path, text: str, name: str = "study.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


SHIPPED = ["sts", "sts-diverse", "sst", "sst-diverse", "para", "para-diverse", "multitask", "multitask-gpu"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_studies_load(name):
    study = load_spec(name)
    assert study.name == name and study.path == STUDIES_DIR / f"{name}.toml"
    assert {"lr", "dropout", "weight_decay"} <= set(study.space)
    assert study.space["lr"].log
    if len(study.tasks) > 1:
        assert study.metric == "overall" and set(study.space["surgery"].choices) == {"none", "pcgrad", "gradvac"}
    else:
        assert study.metric == study.tasks[0]
    config = study.train_config({k: p.corner_values()[0] for k, p in study.space.items()})
    assert config["epochs"] == study.budget.max_epochs and config["tasks"] == study.tasks


def test_good_file_parses_into_distributions(tmp_path):
    study = load_spec(write(tmp_path, GOOD))
    dists = study.distributions()
    assert dists["lr"] == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    assert dists["freeze_layers"] == optuna.distributions.IntDistribution(0, 3)
    assert dists["batch_size"] == optuna.distributions.CategoricalDistribution([16, 32])
    assert study.budget.reduction_factor == 2 and study.budget.max_concurrent == 1  # defaults
    assert study.with_budget(trials=9, max_concurrent=None).budget.trials == 9


def test_unknown_study_name_lists_the_available_ones():
    with pytest.raises(StudyError, match=r"no-such-study\.toml: no such study file; studies available: .*'sts'"):
        load_spec("no-such-study")


BAD_CASES = [
    # (replace this, with this, key named in the message, words of the message)
    ('tasks = ["sts"]', 'tasks = ["sts"]\nbogus = 1', "bogus", "unknown key"),
    ('direction = "maximize"', 'direction = "maximize"\nextra = 1', "objective.extra", "unknown key"),
    ("grace_period = 1", "grace_period = 1\npatience = 2", "budget.patience", "unknown key"),
    ('tasks = ["sts"]', 'tasks = ["stsb"]', "tasks", "unknown task 'stsb'"),
    ('tasks = ["sts"]', "tasks = []", "tasks", "non-empty"),
    ('tasks = ["sts"]', 'tasks = "sts"', "tasks", "must be a list"),
    ('metric = "sts"', 'metric = "sst"', "objective.metric", "not a trained task's metric"),
    ('direction = "maximize"', 'direction = "up"', "objective.direction", "'maximize' or 'minimize'"),
    ('direction = "maximize"', 'direction = "minimize"', "objective.direction", "higher-is-better"),
    ("trials = 4", "trials = 0", "budget.trials", "at least 1"),
    ("trials = 4", 'trials = "4"', "budget.trials", "must be an integer"),
    ("trials = 4", "trials = 4.5", "budget.trials", "must be an integer"),
    ("trials = 4", "", "budget.trials", "missing"),
    ("grace_period = 1", "grace_period = 5", "budget.grace_period", "between 1 and max_epochs"),
    ("grace_period = 1", "grace_period = 1\nreduction_factor = 1", "budget.reduction_factor", "greater than 1"),
    ("grace_period = 1", "grace_period = 1\ncpus_per_trial = true", "budget.cpus_per_trial", "must be an integer or a number"),
    ("lr = { low = 1e-5, high = 1e-3, log = true }", "lr = { low = 1e-3, high = 1e-5 }", "search.lr", "must be less than high"),
    ("lr = { low = 1e-5, high = 1e-3, log = true }", "lr = { low = 1e-3, high = 1e-3 }", "search.lr", "must be less than high"),
    ("lr = { low = 1e-5, high = 1e-3, log = true }", "lr = { low = 0.0, high = 1e-3, log = true }", "search.lr.low", "log-scale"),
    ("lr = { low = 1e-5, high = 1e-3, log = true }", "lr = { low = 1e-5 }", "search.lr.high", "missing"),
    ("lr = { low = 1e-5, high = 1e-3, log = true }", 'lr = { low = "a", high = 1e-3 }', "search.lr.low", "must be"),
    (
        "lr = { low = 1e-5, high = 1e-3, log = true }",
        "lr = { low = 1e-5, high = 1e-3, lg = true }",
        "search.lr.lg",
        "unknown key",
    ),
    ("lr = { low = 1e-5, high = 1e-3, log = true }", "lr = { low = 1e-5, high = 1e-3, log = 1 }", "search.lr.log", "true/false"),
    ("lr = { low = 1e-5, high = 1e-3, log = true }", "lr = 1e-4", "search.lr", "must be a table"),
    ("batch_size = { choices = [16, 32] }", "batch_size = { choices = [] }", "search.batch_size.choices", "empty"),
    ("batch_size = { choices = [16, 32] }", "batch_size = { choices = [16, 16] }", "search.batch_size.choices", "repeated"),
    ("batch_size = { choices = [16, 32] }", 'batch_size = { choices = [16, "32"] }', "search.batch_size.choices[1]", "must be"),
    ("freeze_layers = { low = 0, high = 3 }", "freeze_layers = { low = 0, high = 2.5 }", "search.freeze_layers.high", "integer"),
    ("freeze_layers = { low = 0, high = 3 }", "learning_rate = { low = 0.1, high = 0.2 }", "search.learning_rate", "unknown"),
    ("freeze_layers = { low = 0, high = 3 }", "epochs = { low = 1, high = 3 }", "search.epochs", "budget.max_epochs"),
    ("freeze_layers = { low = 0, high = 3 }", "threads = { choices = [1, 2] }", "search.threads", "cannot be searched"),
    ("freeze_layers = { low = 0, high = 3 }", 'pooling = { choices = ["mean", "max"] }', "search.pooling", "'max'"),
    ("freeze_layers = { low = 0, high = 3 }", "pooling = { low = 0, high = 1 }", "search.pooling", "give choices"),
    ("freeze_layers = { low = 0, high = 3 }", 'surgery = { choices = ["none", "pcgrad"] }', "search.surgery", "one task"),
    (
        "freeze_layers = { low = 0, high = 3 }",
        "loss_weight.sts = { low = 0.5, high = 2.0 }",
        "search.loss_weight.sts",
        "relative",
    ),
    ('pair_encoding = "bi"', 'pair_encoding = "cross"\nsts_head = "cosine"', "fixed", "needs pair_encoding 'bi'"),
    ("dropout = { low = 0.0, high = 0.2 }", "dropout = { low = 0.0, high = 1.0 }", "search.dropout", "dropout must be in"),
    ("max_length = 64", "max_length = 64\nepochs = 3", "fixed.epochs", "budget.max_epochs"),
    ("max_length = 64", "max_length = 64\nnum_layers = 3", "fixed.num_layers", "unknown TrainConfig field"),
    ("max_length = 64", "max_length = 64\ndropout = 0.1", "fixed.dropout", "either fixed or searched"),
    ("max_length = 64", 'max_length = 64\nsurgery = "pcgrad"', "fixed.surgery", "one task"),
    ("max_length = 64", "max_length = 4", "fixed", "max_length must be at least 8"),
    ("grace_period = 1", "grace_period = 1\ntrial_seeds = 1", "budget.trial_seeds", "must be true/false"),
    ("max_length = 64", "max_length = 64\n[[start_points]]\nlr = 1.0", "start_points[0].lr", "outside search.lr"),
    ("max_length = 64", "max_length = 64\n[[start_points]]\nwd = 0.1", "start_points[0].wd", "not a searched field"),
    ("max_length = 64", "max_length = 64\n[[start_points]]\nbatch_size = 8", "start_points[0].batch_size", "outside"),
]


@pytest.mark.parametrize("old,new,key,words", BAD_CASES, ids=[case[2] + ":" + case[3] for case in BAD_CASES])
def test_bad_file_names_file_and_key(tmp_path, old, new, key, words):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(StudyError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}"), message
    assert words in message, message


def test_trial_seeds_give_each_trial_its_own_seed(tmp_path):
    plain = load_spec(write(tmp_path, GOOD.replace("max_length = 64", "max_length = 64\nseed = 3")))
    assert [plain.train_config({}, n)["seed"] for n in (0, 5)] == [3, 3]
    seeded = GOOD.replace("grace_period = 1", "grace_period = 1\nseed = 7\ntrial_seeds = true")
    study = load_spec(write(tmp_path, seeded, "seeded.toml"))
    assert [study.train_config({"lr": 1e-4}, n)["seed"] for n in (0, 1, 5)] == [7, 8, 12]
    # A seed set elsewhere would be silently overridden: refuse it, naming both keys.
    searched = "batch_size = { choices = [16, 32] }\nseed = { low = 0, high = 9 }"
    for where, old, new in (
        ("fixed", "max_length = 64", "max_length = 64\nseed = 3"),
        ("search", "batch_size = { choices = [16, 32] }", searched),
    ):
        bad = write(tmp_path, seeded.replace(old, new), f"bad-{where}.toml")
        with pytest.raises(StudyError, match=re.escape(f"{bad}: budget.trial_seeds: ") + f".*remove {where}.seed"):
            load_spec(bad)


def test_multitask_rules(tmp_path):
    study = load_spec(write(tmp_path, MULTI))
    assert study.space["surgery"].choices == ("none", "pcgrad", "gradvac")
    bad = write(tmp_path, MULTI.replace('metric = "overall"', 'metric = "sst"'), "bad.toml")
    with pytest.raises(StudyError, match=re.escape(f"{bad}: objective.metric: a study of several tasks optimises 'overall'")):
        load_spec(bad)
    bad = write(tmp_path, MULTI.replace('"gradvac"]', '"gradvac", "mgda"]'), "bad2.toml")
    with pytest.raises(StudyError, match=re.escape(f"{bad}: search.surgery: value 'mgda'")):
        load_spec(bad)


def test_missing_sections_and_bad_toml(tmp_path):
    path = write(tmp_path, GOOD.replace("[search]", "[searchspace]"))
    with pytest.raises(StudyError, match=re.escape(f"{path}: searchspace: unknown key")):
        load_spec(path)
    path = write(tmp_path, "tasks = [", "broken.toml")
    with pytest.raises(StudyError, match=re.escape(f"{path}: not valid TOML")):
        load_spec(path)
    path = write(tmp_path, GOOD.split("[search]")[0], "nosearch.toml")
    with pytest.raises(StudyError, match=re.escape(f"{path}: search: missing")):
        load_spec(path)


def test_fixed_setting_may_rely_on_a_searched_field(tmp_path):
    # sts_head "cosine" needs pair_encoding "bi": fine when every searched pair_encoding is "bi" ...
    text = GOOD.replace('pair_encoding = "bi"', 'sts_head = "cosine"').replace(
        "[fixed]", 'pair_encoding = { choices = ["bi"] }\n[fixed]'
    )
    assert load_spec(write(tmp_path, text)).fixed == {"max_length": 64, "sts_head": "cosine"}
    # ... and an error naming the searched value that can never work with it.
    path = write(tmp_path, text.replace('choices = ["bi"]', 'choices = ["bi", "cross"]'), "bad.toml")
    with pytest.raises(StudyError, match=re.escape(f"{path}: search.pair_encoding: value 'cross' is not a valid setting")):
        load_spec(path)


VARIANTS = (
    MULTI.replace('surgery = { choices = ["none", "pcgrad", "gradvac"] }', "lr = { low = 1e-5, high = 1e-3, log = true }")
    + """
[variants.encoder]
bi_cosine = { pair_encoding = { para = "bi", sts = "bi" }, sts_head = "cosine" }
mixed = { pair_encoding = { para = "cross", sts = "bi" }, sts_head = "cosine", max_length = 96 }
cross = { pair_encoding = "cross", sts_head = "regression" }

[[start_points]]
lr = 5e-5
encoder = "mixed"
"""
)


def test_variants_set_several_fields_at_once(tmp_path):
    study = load_spec(write(tmp_path, VARIANTS))
    assert study.distributions()["encoder"].choices == ("bi_cosine", "mixed", "cross")
    assert study.start_points == [{"lr": 5e-5, "encoder": "mixed"}]
    config = study.train_config({"lr": 1e-4, "encoder": "mixed"})
    assert config["pair_encoding"] == {"para": "cross", "sts": "bi"} and config["sts_head"] == "cosine"
    assert config["max_length"] == 96 and config["lr"] == 1e-4
    # A variant's field is neither fixed nor searched elsewhere: one owner per field.
    path = write(tmp_path, VARIANTS + "\n[fixed]\nmax_length = 64\n", "owned.toml")
    with pytest.raises(StudyError, match=re.escape(f"{path}: variants.encoder.mixed.max_length: also set by [fixed]")):
        load_spec(path)
    # A choice the trainer refuses fails before anything runs, naming the variant and choice.
    path = write(tmp_path, VARIANTS.replace('sts_head = "regression"', 'sts_head = "cosine"'), "bad.toml")
    with pytest.raises(StudyError, match=re.escape(f"{path}: variants.encoder.cross: value 'cross' is not a valid setting")):
        load_spec(path)
    path = write(tmp_path, VARIANTS.replace('encoder = "mixed"', 'encoder = "tri"'), "start.toml")
    with pytest.raises(StudyError, match=re.escape(f"{path}: start_points[0].encoder: 'tri' lies outside")):
        load_spec(path)


PER_TASK = (
    MULTI.replace(
        'surgery = { choices = ["none", "pcgrad", "gradvac"] }',
        'pair_encoding.sts = { choices = ["bi", "cross"] }\npooling.sst = { choices = ["mean", "cls"] }',
    )
    + '\n[fixed]\nsts_head = "regression"\n'
)


def test_a_per_task_field_is_searched_for_one_task(tmp_path):
    study = load_spec(write(tmp_path, PER_TASK + '\n[[start_points]]\npair_encoding.sts = "bi"\n'))
    assert set(study.space) == {"pair_encoding.sts", "pooling.sst"}
    assert study.start_points == [{"pair_encoding.sts": "bi"}]
    config = study.train_config({"pair_encoding.sts": "bi", "pooling.sst": "cls"})
    assert config["pair_encoding"] == {"para": "cross", "sts": "bi"}
    assert config["pooling"] == {"sst": "cls", "para": "mean", "sts": "mean"}
    # a number per task: a float range, and a table of every task's weight for the trainer
    weighted = PER_TASK.replace("pooling.sst = {", "loss_weight.sts = { low = 0.5, high = 2.0 }\n#")
    study = load_spec(write(tmp_path, weighted, "weighted.toml"))
    assert study.space["loss_weight.sts"].kind == "float"
    config = study.train_config({"pair_encoding.sts": "bi", "loss_weight.sts": 1.5})
    assert config["loss_weight"] == {"sst": 1.0, "para": 1.0, "sts": 1.5}
    path = write(tmp_path, PER_TASK.replace("pooling.sst = {", "loss_weight = { low = 0.5, high = 2.0 }\n#"), "all.toml")
    with pytest.raises(StudyError, match=re.escape(f"{path}: search.loss_weight: one weight for every task only rescales")):
        load_spec(path)
    # an int per task whose default is None (no limit): a distillation's new rows used for one task
    limited = PER_TASK.replace("pooling.sst = {", "augment_limit.para = { low = 0, high = 4000, step = 1000 }\n#")
    study = load_spec(write(tmp_path, limited, "limited.toml"))
    assert study.space["augment_limit.para"].kind == "int"
    config = study.train_config({"pair_encoding.sts": "bi", "augment_limit.para": 2000})
    assert config["augment_limit"] == {"sst": None, "para": 2000, "sts": None}
    assert TrainConfig.from_dict(config).task_value("augment_limit", "para") == 2000
    # a student's alpha for one task, the others at the default
    mixed = PER_TASK.replace("pooling.sst = {", "distill_alpha.sst = { low = 0.5, high = 1.0 }\n#")
    study = load_spec(write(tmp_path, mixed, "alpha.toml"))
    assert study.space["distill_alpha.sst"].kind == "float"
    config = study.train_config({"pair_encoding.sts": "bi", "distill_alpha.sst": 0.9})
    assert TrainConfig.from_dict(config).distill_alpha == {"sst": 0.9, "para": 0.5, "sts": 0.5}
    # a task that the field does not apply to, or that the study does not train
    for bad_key, old in (("pair_encoding.sst", "pair_encoding.sts"), ("pooling.cfimdb", "pooling.sst")):
        path = write(tmp_path, PER_TASK.replace(old, bad_key), f"{bad_key}.toml")
        with pytest.raises(StudyError, match=re.escape(f"{path}: search.{bad_key}: not a task this study trains")):
            load_spec(path)


def test_param_contains_checks_type_range_and_step():
    from search.spec import Param

    batch = Param("batch_size", "categorical", choices=(16, 32))
    assert batch.contains(16) and not batch.contains(16.0) and not batch.contains(True)
    lr = Param("lr", "float", low=1e-5, high=1e-3, log=True)
    assert lr.contains(1e-4) and lr.contains(1e-5) and not lr.contains(2e-3) and not lr.contains("1e-4")
    layers = Param("freeze_layers", "int", low=0, high=4, step=2)
    assert layers.contains(2) and not layers.contains(3) and not layers.contains(2.0) and not layers.contains(False)


def test_multitask_gpu_packs_trials_on_a_gpu_and_ray_is_asked_for_that_share():
    from ray import tune

    from search.cluster import check_resources
    from search.tuner import trial_resources

    budget = load_spec("multitask-gpu").budget
    assert 0 < budget.gpus_per_trial < 1 and budget.max_concurrent * budget.gpus_per_trial <= 1  # all on one GPU
    trainable = tune.with_resources(lambda config: None, trial_resources(budget))
    assert trainable._resources.bundles == [{"CPU": budget.cpus_per_trial, "GPU": budget.gpus_per_trial}]
    check_resources(budget.cpus_per_trial, budget.gpus_per_trial, [{"Alive": True, "Resources": {"CPU": 16, "GPU": 1}}])


def test_a_fractional_gpu_share_parses_and_overrides(tmp_path):
    study = load_spec(write(tmp_path, GOOD.replace("grace_period = 1", "grace_period = 1\ngpus_per_trial = 0.5")))
    assert study.budget.gpus_per_trial == 0.5
    assert study.with_budget(gpus_per_trial=0.125).budget.gpus_per_trial == 0.125  # --gpus-per-trial 0.125
