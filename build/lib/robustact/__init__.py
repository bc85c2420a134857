"""robustact: train, attack and evaluate RGB + skeleton action-recognition models with
adversarial defences (AMR), as a library, a CLI (``robustact``) and a REST service.

The small public Python API::

    from robustact import attack, evaluate, load_model

    model, meta = load_model("runs/amr/model")              # safetensors + config.json
    result = attack(model, rgb, skel, labels, "pgd20", mode="RS", eps=8)
    result.rgb, result.skel, result.broken                  # adversarial inputs, which clips broke
    report, records = evaluate(model, meta, "cache/tiny", attacks=["fgsm", "pgd20"], eps=[8])

Everything else is in the subpackages: ``robustact.models`` (pure PyTorch: networks,
attacks, training, evaluation, data), ``robustact.service`` (REST API, CLI, database),
``robustact.worker`` (Celery tasks) and ``robustact.migrations`` (Alembic). In a source
checkout these are the repository's top-level folders; an installed wheel holds them under
``robustact/``, so nothing named ``models`` or ``service`` lands in site-packages.
"""

from __future__ import annotations

from pathlib import Path as _Path

# A source checkout keeps the subpackages in the repository's top-level folders (models/,
# service/, ...): let ``robustact.<name>`` find them there. An installed wheel has them
# inside this directory (pyproject's package-dir) and needs nothing.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "models" / "__init__.py").is_file():
    if str(_checkout) not in __path__:
        __path__.append(str(_checkout))

from robustact.api import attack, evaluate, load_model  # noqa: E402

__all__ = ["attack", "evaluate", "load_model"]
__version__ = "0.1.0"
