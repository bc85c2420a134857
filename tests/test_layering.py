"""models/ is pure PyTorch: importing all of it pulls in no web, queue, database or S3 code."""

import pkgutil
import subprocess
import sys

from robustact import models

FORBIDDEN = ("fastapi", "starlette", "celery", "kombu", "sqlalchemy", "alembic", "boto3", "botocore",
             "robustact.service", "robustact.worker")


def test_models_imports_no_service_libraries():
    names = [m.name for m in pkgutil.walk_packages(models.__path__, "robustact.models.")]
    assert {"robustact.models.attacks", "robustact.models.i3d", "robustact.models.hcn", "robustact.models.amr",
            "robustact.models.data.ntu"} <= set(names)
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"models/ imported: {out.stdout.strip()}"
