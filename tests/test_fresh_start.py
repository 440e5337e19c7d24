"""A fresh machine: the demo's Prefect settings are the ones in force, whatever was imported first.

Prefect reads its settings when it is imported; the first start of its ephemeral API server
(database migrations in a new ``PREFECT_HOME``) needs more than its 20 s default on 2 cores.
Each check runs in a new interpreter with a fresh ``HOME`` and ``PREFECT_HOME``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.demo import PREFECT_SETTINGS

REPO = Path(__file__).resolve().parents[1]
CONFIGURED = float(PREFECT_SETTINGS["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
PREFECT_DEFAULT = 20.0


def fresh_python(tmp_path: Path, code: str, timeout: float = 300) -> dict:
    """Run ``code`` in a new interpreter with no Prefect or MLflow state; return its JSON line."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(HOME=str(home), PREFECT_HOME=str(home / ".prefect"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_demo_flow_starts_a_fresh_ephemeral_server_under_its_timeout(tmp_path):
    # The demo's own import path (the CLI, then the workflow demo), then a flow run: that run
    # starts the ephemeral server in the empty PREFECT_HOME, reading the timeout in force.
    out = fresh_python(
        tmp_path,
        """
        import json, sys
        import pipelines.cli
        from pipelines.demo import prefect_settings

        # The libraries whose settings the demo sets before their import (Prefect, MLflow's
        # logging, DeepSpeed's accelerator) are not imported by the CLI's own import path.
        imported_by_cli = [m for m in ("prefect", "mlflow", "deepspeed") if m in sys.modules]
        with prefect_settings():
            from prefect import flow
            from prefect.server.api import server
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as T

            started = []
            start = server.SubprocessASGIServer.start

            def recording_start(self, timeout=None):
                started.append(T.value())
                return start(self, timeout)

            server.SubprocessASGIServer.start = recording_start

            @flow
            def probe() -> float:
                return T.value()

            in_flow = probe()
        print(json.dumps({"cli_imported": imported_by_cli, "at_server_start": started,
                          "in_flow": in_flow}))
        """,
    )
    assert out["cli_imported"] == []
    # start() is called on every client connection and starts the server once.
    assert out["at_server_start"], "the flow run did not start an ephemeral server"
    assert set(out["at_server_start"]) == {CONFIGURED}
    assert out["in_flow"] == CONFIGURED
    assert (tmp_path / "home" / ".prefect").is_dir()  # the fresh home, not ~/.prefect


@pytest.mark.parametrize("first", ["", "import prefect"], ids=["demo-first", "prefect-first"])
def test_configured_timeout_holds_whatever_was_imported_first(tmp_path, first):
    code = "\n".join(
        [
            first,
            "import json",
            "from pipelines.demo import prefect_settings",
            "with prefect_settings():",
            "    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as T",
            "    print(json.dumps({'timeout': T.value()}))",
        ]
    )
    assert fresh_python(tmp_path, code)["timeout"] == CONFIGURED


def test_probe_sees_the_default_when_the_environment_is_set_after_import(tmp_path):
    # What the first `make demo` did: the environment set after Prefect's import is ignored.
    # The probe tells the two apart, so the tests above can fail.
    key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    code = "\n".join(
        [
            "import json, os",
            "import prefect",
            f"os.environ[{key!r}] = {PREFECT_SETTINGS[key]!r}",
            "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as T",
            "print(json.dumps({'timeout': T.value()}))",
        ]
    )
    assert fresh_python(tmp_path, code)["timeout"] == PREFECT_DEFAULT
