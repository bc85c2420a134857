"""docker-compose.yml holds no credential: every secret is a required ${VAR:?} that
.env.example documents; the app uses its own bucket-scoped MinIO user, the MinIO console
is not published, api and worker have resource limits and the api's health is /readyz;
Flower runs only in its profile, on loopback, behind basic auth.
(Docker is not run here: the file is parsed and interpolated the way compose does.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = (ROOT / "docker-compose.yml").read_text()
RAW = yaml.safe_load(COMPOSE)  # compose interpolates the parsed values: comments do not count
# ${VAR}, ${VAR:-default}, ${VAR:?message} (and the forms without a colon); $$ is a literal $.
REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")
SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "S3_SECRET_KEY")


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def interpolate(node, env: dict[str, str]):
    """What compose makes of the parsed file with ``env`` as its .env."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if not isinstance(node, str):
        return node

    def substitute(m: re.Match) -> str:
        name, operator, argument = m.groups()
        if name is None:
            return "$"
        value = env.get(name)
        if operator in (":?", "?") and not (value if operator == ":?" else value is not None):
            raise KeyError(f"{name}: {argument}")
        if operator in (":-", "-") and not (value if operator == ":-" else value is not None):
            return argument
        return value or ""
    return REFERENCE.sub(substitute, node)


def services(env: dict[str, str] | None = None) -> dict:
    return interpolate(RAW, env if env is not None else env_example())["services"]


def test_every_variable_is_in_env_example_and_secrets_are_required():
    used = {m.group(1) for text in strings(RAW) for m in REFERENCE.finditer(text) if m.group(1)}
    example = env_example()
    assert used and used <= set(example), f"not in .env.example: {sorted(used - set(example))}"
    for secret in SECRETS:
        assert "${" + secret + ":?" in COMPOSE and secret in used
        assert not re.search(r"\$\{" + secret + r":-", COMPOSE), f"{secret} has a default"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD|MINIO_ROOT|S3_"):
        services({})  # no .env: compose stops, naming the variable
    assert all(example[name] for name in SECRETS)


def test_no_credential_is_written_in_the_file():
    assert "robustact-secret" not in COMPOSE and "minioadmin" not in COMPOSE
    example = env_example()
    for name in SECRETS + ("MINIO_ROOT_USER", "S3_ACCESS_KEY"):
        assert example[name] not in COMPOSE
    for service_name, service in RAW["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER", key):
                assert str(value).startswith("${"), f"{service_name}.{key} = {value!r}"
    assert "${POSTGRES_PASSWORD:?" in RAW["x-robustact-env"]["ROBUSTACT_DATABASE_URL"]


def test_the_app_uses_a_bucket_scoped_user_not_root():
    resolved = services()
    example = env_example()
    for name in ("api", "worker"):
        env = resolved[name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == example["S3_ACCESS_KEY"] != example["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == example["S3_SECRET_KEY"]
        assert env["ROBUSTACT_STORE_URL"].startswith(f"s3://{example['S3_BUCKET']}/")
        assert not any("MINIO_ROOT" in key for key in env)
    script = resolved["createbucket"]["command"][0]
    for step in ("mc admin policy create store robustact-bucket", "mc admin user add store",
                 "mc admin policy attach store robustact-bucket --user", "arn:aws:s3:::%s\", \"arn:aws:s3:::%s/*"):
        assert step in script, step
    assert '"$S3_BUCKET" "$S3_BUCKET"' in script  # the policy names the bucket, nothing wider


def test_console_closed_limits_set_and_readiness_checked():
    resolved = services()
    assert not any("9001" in str(port) for port in resolved["minio"].get("ports", []))
    assert all("9000" not in str(port) for port in resolved["minio"].get("ports", []))
    for name in ("api", "worker"):
        limits = resolved[name]["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[mg]", limits["memory"])
    assert "/readyz" in " ".join(resolved["api"]["healthcheck"]["test"])
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_flower_is_optional_on_loopback_behind_basic_auth(tmp_path):
    raw = RAW["services"]
    default_up = {name for name, service in raw.items() if not service.get("profiles")}
    assert raw["flower"]["profiles"] == ["flower"] and "flower" not in default_up
    assert {"api", "worker", "postgres", "redis", "minio", "createbucket"} <= default_up
    assert not any("flower" in (service.get("depends_on") or {}) for service in raw.values())  # nothing pulls it in
    resolved = services()  # FLOWER_BASIC_AUTH empty, as in .env.example: compose itself does not stop
    flower = resolved["flower"]
    assert flower["ports"] and all(str(port).startswith("127.0.0.1:") for port in flower["ports"])
    env = flower["environment"]
    assert set(env) == {"CELERY_BROKER_URL", "FLOWER_BASIC_AUTH"}  # the broker, no other credential
    assert env["CELERY_BROKER_URL"] == resolved["worker"]["environment"]["ROBUSTACT_BROKER_URL"]
    assert env["FLOWER_BASIC_AUTH"] == "" and services({**env_example(), "FLOWER_BASIC_AUTH": "u:p"})["flower"][
        "environment"]["FLOWER_BASIC_AUTH"] == "u:p"

    # The container's script, with a stand-in `celery` that prints its arguments.
    (tmp_path / "celery").write_text('#!/bin/sh\necho "celery $*"\n')
    (tmp_path / "celery").chmod(0o755)
    assert flower["entrypoint"] == ["/bin/sh", "-c"]
    script = flower["command"][0]

    def run(basic_auth: str) -> subprocess.CompletedProcess:
        return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=10,
                              env={"PATH": f"{tmp_path}:/usr/bin:/bin", "FLOWER_BASIC_AUTH": basic_auth,
                                   "CELERY_BROKER_URL": env["CELERY_BROKER_URL"]})

    refused = run("")
    assert refused.returncode == 1 and "FLOWER_BASIC_AUTH" in refused.stderr and "celery" not in refused.stdout
    started = run("admin:secret")
    assert started.returncode == 0
    assert started.stdout.strip() == f"celery --broker={env['CELERY_BROKER_URL']} flower --port=5555"


def test_the_gpu_worker_is_one_profile_flag_away():
    resolved = services()
    gpu = resolved["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in resolved["worker"]  # the CPU worker always runs
    assert "whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"] and gpu["image"] != resolved["worker"]["image"]
    assert gpu["environment"]["ROBUSTACT_DEVICE"] == "cuda"
    assert gpu["environment"]["ROBUSTACT_BROKER_URL"] == resolved["worker"]["environment"]["ROBUSTACT_BROKER_URL"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
