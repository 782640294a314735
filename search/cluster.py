"""Joining a Ray cluster, and checking that it can run a trial at all.

Ray 2.60's ``ray start --head`` turns on token authentication as soon as a token exists on the head
(``~/.ray/auth_token``, which any earlier local ``ray.init()`` creates). A driver that joins with an
explicit ``--address`` gets token mode only from the environment, and Ray reads ``RAY_AUTH_MODE``
once, when it is imported. So ``prepare_token_auth`` runs before anything imports Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


class ClusterError(RuntimeError):
    """The Ray cluster cannot be joined or cannot run the study's trials; one line saying why."""


def token_available() -> bool:
    """Whether this machine has a Ray auth token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get(TOKEN_ENV):
        return True
    path = Path(os.environ[TOKEN_PATH_ENV]) if os.environ.get(TOKEN_PATH_ENV) else DEFAULT_TOKEN_PATH
    return path.is_file() and bool(path.read_text(encoding="utf-8").strip())


def prepare_token_auth(address: str | None) -> None:
    """Before Ray is imported: join a cluster at an explicit address in token mode when a token is here.

    An explicit RAY_AUTH_MODE (e.g. ``disabled`` for a cluster started without auth) is left alone."""
    if address and AUTH_MODE_ENV not in os.environ and token_available():
        os.environ[AUTH_MODE_ENV] = "token"


def join_error(address: str, error: BaseException) -> ClusterError:
    """A one-line ClusterError for a failed ``ray.init(address=...)``."""
    from ray.exceptions import AuthenticationError

    if isinstance(error, AuthenticationError):
        return ClusterError(
            f"cannot join the Ray cluster at {address}: it refused this driver's authentication token. "
            f"Copy the head's token (`ray get-auth-token` there) into {DEFAULT_TOKEN_PATH} or ${TOKEN_ENV} here, "
            f"and run with {AUTH_MODE_ENV}=token"
        )
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return ClusterError(f"cannot join the Ray cluster at {address}: {first}")


def check_resources(cpus_per_trial: float, gpus_per_trial: float, nodes: list[dict[str, Any]]) -> None:
    """ClusterError when no live node has the CPUs and GPUs that one trial asks for (Ray would wait forever).

    ``nodes`` is ``ray.nodes()``: one dict per node with "Alive" and "Resources"."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    fits = [r for r in alive if r.get("CPU", 0) >= cpus_per_trial and r.get("GPU", 0) >= gpus_per_trial]
    if fits:
        return
    largest = ", ".join(f"{r.get('CPU', 0):g} CPUs and {r.get('GPU', 0):g} GPUs" for r in alive) or "no live node"
    raise ClusterError(
        f"a trial asks for {cpus_per_trial:g} CPUs and {gpus_per_trial:g} GPUs (--cpus-per-trial/--gpus-per-trial "
        f"or the study's budget), but no node of the Ray cluster has that much (its nodes: {largest}). "
        f"Lower the request or add a larger node"
    )
