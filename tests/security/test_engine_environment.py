"""The processing engine works on hostile input, so it gets none of the service's secrets.

Attack: a dataset that makes the engine (ODM, or whatever `SCALEODM_ENGINE_COMMAND` runs) print
or send its environment. The local runner holds the S3 keys and the MongoDB/NATS passwords in its
own environment; the engine it starts must see none of them (``runner.engine_environment``).
Argo runs are covered by the Workflow tests: the ODM container gets no credentials there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from scaleodm.common import localruns
from scaleodm.common.contracts.commands import RunSpec
from scaleodm.common.settings import EngineKind, SchedulerSettings
from scaleodm.run import runner

T = "5c0a4a4e-8f5e-4a55-9a0e-6a8e9b2c1d3f"
SECRETS = {
    "SCALEODM_S3__SECRET_ACCESS_KEY": "s3-secret-value",
    "SCALEODM_S3__ACCESS_KEY_ID": "s3-key-id-value",
    "SCALEODM_MONGO__PASSWORD": "mongo-password-value",
    "SCALEODM_NATS__PASSWORD": "nats-password-value",
    "SCALEODM_TOKEN": "node-token-value",
}
DUMP = "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))"


async def test_engine_sees_no_service_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    spec = RunSpec(task_id=T, attempt=1, name="env", options=[], sources=[],
                   output_prefix=f"s3://scaleodm/tasks/{T}/outputs/")
    rd = localruns.RunDir(tmp_path / "runs" / f"odm-{T}-1")
    rd.path.mkdir(parents=True)
    localruns.write_json_atomic(rd.file(localruns.RUN_FILE),
                                {"spec": spec.model_dump(mode="json"),
                                 "engine": EngineKind.COMMAND.value})
    dumped = tmp_path / "engine-env.json"
    settings = SchedulerSettings(
        engine=EngineKind.COMMAND, engine_command=f'{sys.executable} -c "{DUMP}" {dumped}'
    )
    assert settings.s3.secret_access_key.get_secret_value() == SECRETS[
        "SCALEODM_S3__SECRET_ACCESS_KEY"], "the runner itself holds the secrets"

    assert await runner.Runner(rd, settings)._run_engine([]) == 0

    env = json.loads(dumped.read_text())
    assert env.get("ODM_NONINTERACTIVE") == "1"
    assert not [k for k in env if k.upper().startswith("SCALEODM_")]
    assert not [v for v in SECRETS.values() if v in json.dumps(env)]
