"""The documented PostgreSQL storage, against a real server that this module starts on 127.0.0.1 (a
throwaway cluster in a temp folder, stopped afterwards). Skipped, with the reason, where PostgreSQL's
server programs (initdb, pg_ctl: Debian's `postgresql` package) or psycopg 3 are not installed.

With MINBERT_CLUSTER_TEST=1 it also runs a tiny study on a real local Ray cluster (`ray start --head`)
that the driver joins with --address, as README's cluster section does (about a minute)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_search import STUDY_TOML
from test_search_failures import assert_one_driver_wins_a_race
from tiny_model import DATA_DIR

from search.lease import DriverLease, LeaseError, current_holder
from search.storage import PROJECT_ROOT, StorageError, open_storage, study_in_storage

PASSWORD = "s3cret-pw"
SERVER_USER = "postgres"  # initdb refuses to run as root; Debian's package creates this user


def server_programs() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_server_user(command: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", SERVER_USER, "--", *command]


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg", reason='psycopg 3 is not installed (pip install -e ".[postgres]")')
    bin_dir = server_programs()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server programs are not installed (apt-get install postgresql)")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam(SERVER_USER)
        except KeyError:
            pytest.skip(f"running as root, and there is no {SERVER_USER!r} user for the server to run as")
    folder = Path(tempfile.mkdtemp(prefix="minbert-pg-"))  # not under pytest's root-only tmp folders
    data, password_file = folder / "data", folder / "password"
    password_file.write_text(PASSWORD)
    if os.geteuid() == 0:
        for path in (folder, password_file):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = free_port()
    pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            as_server_user(
                [str(bin_dir / "initdb"), "-D", str(data), "-U", "optuna", "--auth=scram-sha-256", f"--pwfile={password_file}"]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}"
        subprocess.run(
            as_server_user([*pg_ctl, "-o", options, "-l", str(folder / "server.log"), "-w", "start"]),
            check=True,
            capture_output=True,
        )
    except (subprocess.CalledProcessError, OSError) as error:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server: {getattr(error, 'stderr', b'') or error}")
    try:
        yield f"postgresql://optuna:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(as_server_user([*pg_ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_documented_url_works_with_psycopg_3(postgres_url):
    storage = open_storage(postgres_url)
    study = optuna.create_study(study_name="pg", storage=storage, direction="maximize")
    study.tell(study.ask(), 0.5)
    assert study_in_storage("pg", postgres_url)
    assert optuna.load_study(study_name="pg", storage=postgres_url).best_value == 0.5


def test_wrong_credentials_are_one_line_without_the_password(postgres_url):
    wrong = postgres_url.replace(PASSWORD, "not-the-password")
    with pytest.raises(StorageError) as raised:
        open_storage(wrong)
    message = str(raised.value)
    assert "not-the-password" not in message and PASSWORD not in message and "\n" not in message
    assert "postgresql://optuna:***@127.0.0.1" in message and "password authentication failed" in message


def test_the_lease_holds_across_connections(postgres_url):
    storage = open_storage(postgres_url)
    optuna.create_study(study_name="leased", storage=storage)
    with DriverLease("leased", storage):
        # Another driver, with its own connection (as on another machine), sees the lease and refuses.
        with pytest.raises(LeaseError, match="being run by driver pid"):
            DriverLease("leased", open_storage(postgres_url)).acquire()
    assert current_holder(optuna.load_study(study_name="leased", storage=storage)) is None


@pytest.mark.parametrize("before", [None, {"released": 1.0}], ids=["never-held", "released"])
def test_two_drivers_never_hold_the_lease_at_once(postgres_url, before):
    if "race" in optuna.study.get_all_study_names(postgres_url):
        optuna.delete_study(study_name="race", storage=postgres_url)
    assert_one_driver_wins_a_race(postgres_url, before)


def wait_for_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


@pytest.mark.skipif(os.environ.get("MINBERT_CLUSTER_TEST") != "1", reason="set MINBERT_CLUSTER_TEST=1 (about a minute)")
def test_a_study_on_a_ray_cluster_with_postgres(postgres_url, tmp_path):
    """`ray start --head` with token authentication and no CPUs, a second node that joins it as README
    says (so the trials can only run there), then run_search.py --address HOST:PORT --storage postgresql://.

    Both nodes run with --block in their own process groups, which are killed at the end: `ray stop`
    would also stop every other Ray cluster of this machine."""
    port = free_port()
    ray = str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path(tempfile.mkdtemp(prefix="ray-"))
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    head_command = [ray, "start", "--head", "--block", "--port", str(port), "--num-cpus", "0", "--include-dashboard=false"]
    nodes = [start_node([*head_command, "--temp-dir", str(temp)], env)]
    try:
        wait_for_port(port, 120)
        nodes.append(start_node([ray, "start", "--block", "--address", f"127.0.0.1:{port}", "--num-cpus", "2"], env))
        study_file = tmp_path / "tiny.toml"
        study_file.write_text(STUDY_TOML.replace("trials = 6", "trials = 2").replace("startup_trials = 6", "startup_trials = 2"))
        command = [sys.executable, str(PROJECT_ROOT / "run_search.py"), "--study", str(study_file), "--storage", postgres_url]
        command += ["--address", f"127.0.0.1:{port}", "--results-dir", str(tmp_path / "r"), "--data-dir", str(DATA_DIR)]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        trials = optuna.load_study(study_name="tiny", storage=postgres_url).trials
        assert len(trials) == 2 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
        shutil.rmtree(temp, ignore_errors=True)


def start_node(command: list[str], env: dict) -> subprocess.Popen:
    """A Ray node in its own process group, with token authentication (the token: ~/.ray/auth_token)."""
    return subprocess.Popen(
        command,
        env={**env, "RAY_AUTH_MODE": "token"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
