"""Failures a study must meet with one clear line, before the budget is spent, and without Ray where
the check does not need it: bad data, bad storage, a cluster too small, a second driver, NaN metrics."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from test_search import STUDY_TOML
from tiny_model import DATA_DIR, needs_data

from data.files import DataError, load_examples
from model.metrics import NonFiniteMetricError, pearson, task_metric
from search.cluster import ClusterError, check_resources
from search.lease import LEASE_ATTR, DriverLease, Holder, LeaseError, current_holder, machine_id
from search.storage import PROJECT_ROOT, StorageError, masked_url, open_storage
from search.study import load_spec
from search.tune import EXIT_REFUSED, SearchOptions, StudyPaths, command_line, main_exit, run_search


@pytest.fixture
def study_setup(tmp_path, monkeypatch):
    """A study file, a storage URL and a results folder in tmp_path; execute() must never be reached."""
    import search.tune

    def no_execute(*args):
        raise AssertionError("the run should have been refused before Ray starts")

    monkeypatch.setattr(search.tune, "execute", no_execute)
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    options = SearchOptions(study=str(study_file), storage=f"sqlite:///{tmp_path / 'o.db'}", results_dir=tmp_path / "r")
    return options, tmp_path


def copy_data(tmp_path, edit: str, text: bytes):
    """A data folder with the STS files (the study's task), ``edit`` replaced by ``text``."""
    data = tmp_path / "data"
    data.mkdir()
    for source in DATA_DIR.glob("sts-*.csv"):
        shutil.copyfile(source, data / source.name)
    (data / edit).write_bytes(text)
    return data


# ------------------------------------------------------------------------------------- the data


def test_undecodable_bytes_name_the_line_and_column(tmp_path):
    (tmp_path / "ids-sst-train.csv").write_bytes(b"\tid\tsentence\tsentiment\n0\ta\tok\t2\n1\tb\tna\xefve \xff\t2\n")
    with pytest.raises(DataError, match=r"ids-sst-train.csv:3:7 \(byte 0xef\): not valid UTF-8"):
        load_examples("sst", "train", tmp_path)


@needs_data
@pytest.mark.parametrize(
    "file, text, where",
    [
        (
            "sts-dev.csv",
            b"id\tsentence1\tsentence2\tsimilarity\na\tx\ty\t2.5\nb\tx\ty\tseven\n",
            "sts-dev.csv:3: similarity 'seven'",
        ),
        ("sts-test-student.csv", b"id\tsentence1\tsentence2\na\tx\ty\nb\tx\t\xff\n", "sts-test-student.csv:3:"),
        ("sts-train.csv", b"id\tsentence1\tsimilarity\na\tx\t1\n", "sts-train.csv:1: missing column(s) ['sentence2']"),
    ],
)
def test_bad_data_stops_the_study_before_ray_naming_file_and_line(study_setup, file, text, where, capsys):
    options, tmp_path = study_setup
    options.data_dir = str(copy_data(tmp_path, file, text))
    assert main_exit(options) == EXIT_REFUSED
    assert where in capsys.readouterr().err
    assert not (tmp_path / "o.db").exists() and not (tmp_path / "r").exists()  # nothing was created


# ----------------------------------------------------------------------------------- the storage


def test_storage_errors_are_one_line_with_the_password_masked(study_setup, capsys):
    options, _ = study_setup
    options.storage = "postgresql://bob:s3cret@127.0.0.1:9/optuna"  # port 9 (discard): refused at once
    assert main_exit(options) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "s3cret" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "postgresql://bob:***@127.0.0.1:9/optuna" in err
    with pytest.raises(StorageError, match="no such database file"):
        open_storage(f"sqlite:///{study_setup[1] / 'absent.db'}", create=False)
    assert masked_url("postgresql+psycopg://u:p@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"


def test_ensemble_build_reports_a_storage_error_in_one_line(capsys):
    from ensemble import build

    assert build.main(["--study", "sts", "--storage", "postgresql://bob:s3cret@127.0.0.1:9/optuna"]) == 1
    err = capsys.readouterr().err
    assert "s3cret" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "postgresql://bob:***@127.0.0.1:9/optuna" in err


@pytest.mark.parametrize(
    "where, says",
    [
        ("a-file/x.db", "a-file is not a folder"),
        ("no/such/folder/x.db", "the folder {tmp}/no/such/folder does not exist"),
        ("/proc/x.db", "cannot create a file in /proc"),
    ],
)
def test_an_unusable_sqlite_path_is_refused_before_anything_is_written(study_setup, where, says, capsys):
    """Named in one line before Ray starts: no results folder (it would block the study later), no
    folder created for a path the user typed."""
    options, tmp_path = study_setup
    (tmp_path / "a-file").write_text("")
    options.storage = f"sqlite:///{tmp_path / where}"
    assert main_exit(options) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "no").exists()


def test_the_default_storage_folder_is_created(tmp_path, monkeypatch):
    import search.storage

    monkeypatch.setattr(search.storage, "DEFAULT_DB_PATH", tmp_path / "studies" / "optuna.db")
    open_storage(f"sqlite:///{tmp_path / 'studies' / 'optuna.db'}")
    assert (tmp_path / "studies" / "optuna.db").is_file()


def test_refused_commands_create_no_database(study_setup, capsys):
    options, tmp_path = study_setup
    options.resume = True
    assert run_search(options).exit_code == EXIT_REFUSED and "Nothing to resume" in capsys.readouterr().out
    assert not (tmp_path / "o.db").exists()


def test_resume_hints_repeat_every_location(tmp_path):
    options = SearchOptions(
        study="sts",
        storage="postgresql://bob:s3cret@db.example:5432/optuna",
        results_dir=tmp_path / "my results",
        data_dir="/data/cs224n",
        address="10.0.0.1:6379",
        name="sts-2",
    )
    hint = command_line(options, "--resume")
    assert hint == (
        "python run_search.py --study sts --resume --storage 'postgresql://bob:***@db.example:5432/optuna' "
        f"--results-dir '{tmp_path / 'my results'}' --data-dir /data/cs224n --address 10.0.0.1:6379 --name sts-2"
    )


# ----------------------------------------------------------------------------------- the cluster


def test_trials_larger_than_any_node_are_refused():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 2.0}},
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    check_resources(8, 1, nodes)
    with pytest.raises(ClusterError, match=r"asks for 4 CPUs and 2 GPUs.*its nodes: 2 CPUs and 0 GPUs, 8 CPUs and 1 GPUs"):
        check_resources(4, 2, nodes)
    with pytest.raises(ClusterError, match="no live node"):
        check_resources(1, 0, [])


# --------------------------------------------------------------------------- one driver per study


def lease_study(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'lease.db'}")
    optuna.create_study(study_name="s", storage=storage)
    return storage


def test_a_second_driver_is_refused_naming_the_holder(tmp_path):
    storage = lease_study(tmp_path)
    with DriverLease("s", storage, interval=0.2) as first:
        time.sleep(0.5)  # a few beats: the lease stays live
        holder = current_holder(optuna.load_study(study_name="s", storage=storage))
        assert holder is not None and holder.token == first.token and holder.age() < 0.5
        with pytest.raises(LeaseError, match=rf"being run by driver pid \d+ on {socket.gethostname()}"):
            DriverLease("s", storage).acquire()
    assert current_holder(optuna.load_study(study_name="s", storage=storage)) is None  # released on exit


def test_a_dead_drivers_lease_does_not_block(tmp_path):
    storage = lease_study(tmp_path)
    study = optuna.load_study(study_name="s", storage=storage)
    # Killed on this machine: its pid is gone (pid 2**22 + 1 is above Linux's pid_max).
    here = {"host": socket.gethostname(), "machine": machine_id(), "pid": 2**22 + 1, "token": "x", "interval": 10}
    study.set_user_attr(LEASE_ATTR, {**here, "beat": time.time()})
    assert current_holder(study) is None
    # Another container of the same host name (its own PID namespace): its pids are not ours to look up,
    # so its lease holds until it misses three beats.
    study.set_user_attr(LEASE_ATTR, {**here, "machine": f"{machine_id()}-other", "beat": time.time()})
    assert current_holder(study) is not None
    study.set_user_attr(LEASE_ATTR, {**here, "machine": f"{machine_id()}-other", "beat": time.time() - 31})
    assert current_holder(study) is None
    # Killed on another machine: live until it misses three beats.
    study.set_user_attr(LEASE_ATTR, {"host": "elsewhere", "pid": 1, "token": "y", "beat": time.time() - 5, "interval": 10})
    assert current_holder(study) is not None
    study.set_user_attr(LEASE_ATTR, {"host": "elsewhere", "pid": 1, "token": "y", "beat": time.time() - 31, "interval": 10})
    assert current_holder(study) is None
    with DriverLease("s", storage):
        assert current_holder(study).pid != 1


def assert_one_driver_wins_a_race(url: str, before: dict | None) -> None:
    """Driver B reads the lease free (``before``: never written, or a released one); driver A takes it
    before B writes: B must be refused (with a read, write, sleep, read, both went on until A's next
    heartbeat)."""
    storage = open_storage(url)
    study = optuna.create_study(study_name="race", storage=storage)
    if before is not None:
        study.set_user_attr(LEASE_ATTR, before)
    first, second = DriverLease("race", storage), DriverLease("race", open_storage(url))
    parse, raced = Holder.from_attr.__func__, []

    def from_attr(cls, value):
        holder = parse(cls, value)
        if not raced:  # B has just read the lease: A takes it now
            raced.append(True)
            first.acquire()
        return holder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Holder, "from_attr", classmethod(from_attr))
        with pytest.raises(LeaseError, match="another driver took it at the same moment"):
            second.acquire()
    try:
        assert raced and current_holder(optuna.load_study(study_name="race", storage=storage)).token == first.token
    finally:
        first.release()
        second.release()


@pytest.mark.parametrize("before", [None, {"released": 1.0}], ids=["never-held", "released"])
def test_two_drivers_never_hold_the_lease_at_once(tmp_path, before):
    assert_one_driver_wins_a_race(f"sqlite:///{tmp_path / 'race.db'}", before)


def test_start_points_are_queued_only_under_the_lease(study_setup, monkeypatch):
    """Two drivers start a new study at once; B looked for it just before A created it and took the
    lease. B, refused the lease, has added nothing (before: it queued the start points a second time)."""
    import search.tuner

    options, tmp_path = study_setup
    monkeypatch.setattr(search.tuner, "start_ray", lambda *args: None)
    monkeypatch.setattr(search.tuner, "wait_for_resources", lambda *args: None)
    monkeypatch.setattr(optuna.study, "get_all_study_names", lambda storage: [])  # what B saw
    study = optuna.create_study(study_name="tiny", storage=open_storage(options.storage))
    study.set_user_attr(LEASE_ATTR, {"host": "gpu-7", "pid": 4242, "token": "z", "beat": time.time(), "interval": 10})
    with pytest.raises(LeaseError):
        search.tuner.run_on_ray(load_spec(options.study), options, StudyPaths(tmp_path / "r" / "tiny"), DATA_DIR)
    assert study.get_trials() == []


def test_a_driver_whose_lease_was_taken_over_stops_and_leaves_the_run_alone(study_setup, monkeypatch):
    """Another driver took the lease while this one was stalled: the heartbeat stops fit() as Ctrl-C
    would, and this driver ends with a LeaseError instead of reporting an interrupted run (or writing
    finished.json) for a run that goes on elsewhere."""
    import functools

    import search.tuner
    from search.records import STUDY_STOP

    options, tmp_path = study_setup
    monkeypatch.setattr(search.tuner, "start_ray", lambda *args: None)
    monkeypatch.setattr(search.tuner, "wait_for_resources", lambda *args: None)
    monkeypatch.setattr(search.tuner, "DriverLease", functools.partial(DriverLease, interval=0.2))

    def fit(study, options, paths, data_dir):  # Ray's fit, which Ctrl-C ends cleanly
        taken = {"host": "gpu-7", "pid": 4242, "token": "z", "beat": time.time(), "interval": 10}
        optuna.load_study(study_name="tiny", storage=open_storage(options.storage)).set_user_attr(LEASE_ATTR, taken)
        # Python's own Ctrl-C, whatever handler an earlier Ray Tune run in this process left installed.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            time.sleep(10)
        except KeyboardInterrupt:
            return [], STUDY_STOP
        finally:
            signal.signal(signal.SIGINT, previous)
        raise AssertionError("the lease's heartbeat did not stop this driver")

    monkeypatch.setattr(search.tuner, "fit", fit)
    with pytest.raises(LeaseError, match="another driver took it over while this one was stalled"):
        search.tuner.run_on_ray(load_spec(options.study), options, StudyPaths(tmp_path / "r" / "tiny"), DATA_DIR)
    assert current_holder(optuna.load_study(study_name="tiny", storage=open_storage(options.storage))).token == "z"


def test_resume_and_fresh_are_refused_while_a_driver_runs(study_setup, capsys):
    options, tmp_path = study_setup
    storage = open_storage(options.storage)
    study = optuna.create_study(study_name="tiny", storage=storage)
    study.set_user_attr(LEASE_ATTR, {"host": "gpu-7", "pid": 4242, "token": "z", "beat": time.time(), "interval": 10})
    for flag in ("resume", "fresh"):
        setattr(options, flag, True)
        assert main_exit(options) == EXIT_REFUSED
        assert "being run by driver pid 4242 on gpu-7" in capsys.readouterr().err
        setattr(options, flag, False)
    assert run_search(options).exit_code == EXIT_REFUSED
    assert "is running now" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- metrics


def test_metrics_of_non_finite_values_are_errors_never_zero():
    with pytest.raises(NonFiniteMetricError, match=r"sts: 1 of 3 output values are NaN or infinite \(first at row 1\)"):
        task_metric("sts", np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, 3.0]))
    with pytest.raises(NonFiniteMetricError, match="sst: 1 of 2"):
        task_metric("sst", np.array([[0.2, 0.8], [np.inf, 0.0]]), np.array([1, 0]))
    with pytest.raises(NonFiniteMetricError, match="para"):
        task_metric("para", np.array([np.nan, 0.7]), np.array([0, 1]))
    with pytest.raises(NonFiniteMetricError):
        pearson(np.array([1.0, 2.0]), np.array([np.nan, np.nan]))
    assert pearson(np.array([1.0, 1.0]), np.array([1.0, 2.0])) == 0.0  # constant but finite: uninformative


@needs_data
def test_a_trial_larger_than_the_cluster_is_refused_before_any_record(tmp_path, capsys):
    """A real local Ray cluster of 1 CPU: --cpus-per-trial 4 would wait forever; it is refused at once."""
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(STUDY_TOML)
    options = SearchOptions(
        study=str(study_file), storage=f"sqlite:///{tmp_path / 'o.db'}", results_dir=tmp_path / "r", num_cpus=1, cpus_per_trial=4
    )
    assert main_exit(options) == EXIT_REFUSED
    err = capsys.readouterr().err
    assert "a trial asks for 4 CPUs and 0 GPUs" in err and "its nodes: 1 CPUs and 0 GPUs" in err
    assert not (tmp_path / "o.db").exists() and not StudyPaths(tmp_path / "r" / "tiny").has_run()
    shutil.rmtree(StudyPaths(tmp_path / "r" / "tiny").ray_temp_dir(), ignore_errors=True)


def test_a_database_that_fails_mid_run_is_one_masked_line():
    import sqlalchemy
    from ray.tune.error import TuneError

    from search.tuner import storage_failures_in_one_line

    options = SearchOptions(study="sts", storage="postgresql://bob:s3cret@db:5432/optuna")
    lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection (password s3cret)"))
    with pytest.raises(StorageError) as raised, storage_failures_in_one_line(options):
        try:  # what Ray Tune does with an exception of a callback
            raise lost
        except Exception:
            raise TuneError("Traceback (most recent call last): ...") from None
    message = str(raised.value)
    assert "s3cret" not in message and "\n" not in message
    assert message.startswith("the Optuna storage failed during the run: postgresql://bob:***@db:5432/optuna: Exception:")
    assert "Once it works again: python run_search.py --study sts --resume" in message
    with pytest.raises(ValueError), storage_failures_in_one_line(options):
        raise ValueError("not the storage")


# ------------------------------------------------------------------------------- Ray's processes

DRIVER = """
import subprocess, sys, time
from search.reaper import reaping
with reaping():
    # Like a Ray worker: a descendant in its own session, which a kill of the driver's group misses.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(float(sys.argv[1]))
"""


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until_gone(pid: int, seconds: float, poll: float = 0.05) -> None:
    """Return once ``pid`` is dead (or a zombie), or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(poll)


def start_driver(seconds: float):
    import subprocess
    import sys

    from search.storage import PROJECT_ROOT

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(seconds)], stdout=subprocess.PIPE, cwd=PROJECT_ROOT)
    return driver, int(driver.stdout.readline())


def test_a_killed_drivers_processes_die_with_it():
    driver, child = start_driver(120)
    time.sleep(1.5)  # the reaper notes the driver's descendants every half second
    driver.kill()
    driver.wait()
    wait_until_gone(child, 10, poll=0.1)
    assert not alive(child)


ORPHANED = """
import subprocess, sys, time
from search.reaper import reaping
with reaping():
    # A process with the run's environment that is no descendant the reaper can see, as a worker that a
    # dying raylet starts after the reaper's last look: started through a parent that exits at once.
    sleeper = "import time; time.sleep(120)"
    quiet = "stdout=s.DEVNULL, stderr=s.DEVNULL"  # else run() waits for the sleeper to close the pipes
    code = f"import subprocess as s, sys; print(s.Popen([sys.executable, '-c', {sleeper!r}], {quiet}).pid)"
    print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip(), flush=True)
    time.sleep(120)
"""


def test_a_process_with_the_runs_mark_dies_with_the_driver_though_the_reaper_never_saw_it():
    import subprocess
    import sys

    driver = subprocess.Popen([sys.executable, "-c", ORPHANED], stdout=subprocess.PIPE, cwd=PROJECT_ROOT)
    orphan = int(driver.stdout.readline())
    try:
        assert alive(orphan)
        driver.kill()
        driver.wait()
        wait_until_gone(orphan, 5)
        assert not alive(orphan)
    finally:
        with contextlib.suppress(OSError):
            os.kill(orphan, signal.SIGKILL)


PARENT = """
import subprocess, sys, time
worker = "from search.reaper import die_with_parent; die_with_parent(); print('ready', flush=True); import time; time.sleep(120)"
child = subprocess.Popen([sys.executable, "-c", worker], start_new_session=True, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "ready\\n"
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_trial_worker_dies_with_its_raylet_at_once():
    """A worker that the reaper never saw (it started after its last look) still ends with its parent."""
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, cwd=PROJECT_ROOT)
    worker = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    wait_until_gone(worker, 2)
    try:
        assert not alive(worker)
    finally:
        with contextlib.suppress(OSError):
            os.kill(worker, signal.SIGKILL)


def test_a_driver_that_ends_normally_leaves_its_processes_alone():
    import os
    import signal

    driver, child = start_driver(0.5)
    driver.wait()
    time.sleep(1.0)
    try:
        assert alive(child)  # the reaper was told "done": Ray's own shutdown is trusted
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_full_disk_on_the_drivers_side_is_one_line(study_setup, monkeypatch, capsys):
    import errno

    import search.tune

    options, _ = study_setup

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "/results/tiny/finished.json")

    monkeypatch.setattr(search.tune, "execute", no_space)
    options.data_dir = str(DATA_DIR)
    assert main_exit(options) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device writing /results/tiny/finished.json. Free some space, then:")
    assert "--resume" in err and len(err.strip().splitlines()) == 1


def test_cluster_join_errors_say_what_to_do(monkeypatch, tmp_path):
    from ray.exceptions import AuthenticationError

    from search import cluster
    from search.cluster import join_error, prepare_token_auth

    refused = join_error("10.0.0.1:6379", AuthenticationError("InvalidAuthToken"))
    assert str(refused).startswith("cannot join the Ray cluster at 10.0.0.1:6379: it refused this driver's authentication token")
    assert "ray get-auth-token" in str(refused) and "RAY_AUTH_MODE=token" in str(refused)
    unreachable = join_error("10.0.0.1:6379", ConnectionError("Could not find any running Ray instance.\nPlease specify..."))
    assert str(unreachable) == "cannot join the Ray cluster at 10.0.0.1:6379: Could not find any running Ray instance."
    # Token mode for an explicit address when this machine has a token, and only then.
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # set, then deleted: monkeypatch restores them afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    prepare_token_auth("10.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in os.environ
    (tmp_path / "token").write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    prepare_token_auth(None)  # a local cluster: Ray decides itself
    assert "RAY_AUTH_MODE" not in os.environ
    prepare_token_auth("10.0.0.1:6379")
    assert os.environ["RAY_AUTH_MODE"] == "token" and cluster.token_available()


def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path):
    """SIGINT while run_search.py imports its libraries (the first seconds): no traceback."""
    command = [sys.executable, "-X", "importtime", str(PROJECT_ROOT / "run_search.py"), "--study", "sts"]
    command += ["--storage", f"sqlite:///{tmp_path / 'o.db'}", "--results-dir", str(tmp_path / "r")]
    driver = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    said = []
    for line in driver.stderr:  # -X importtime writes a line per module imported: wait until optuna's
        said.append(line)
        if line.startswith("import time:") and line.split("|")[-1].strip() == "optuna":
            driver.send_signal(signal.SIGINT)
            break
    said += driver.stderr.readlines()
    assert driver.wait(timeout=60) == 130
    told = [line for line in said if line.strip() and not line.startswith("import time:")]
    assert told == ["Interrupted while starting; nothing was run.\n"], told
