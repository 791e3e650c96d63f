"""torch.hub entry points: ``torch.hub.load(repo_dir, "resnet50", source="local", mode="sact")``.

Every model of :func:`sact.list_models` is an entry point taking the keyword arguments of
:func:`sact.create_model` (``mode``, ``pretrained``, ``features_only``, ``num_classes``...).
The repository's own ``src/`` is used unless ``sact`` is already imported.
"""

import os as _os
import sys as _sys

dependencies = ["torch", "torchvision", "safetensors", "numpy", "PIL"]

if "sact" not in _sys.modules:
    _sys.path.insert(0, _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "src"))

import sact as _sact  # noqa: E402


def _entry(name):
    def entry(**kwargs):
        return _sact.create_model(name, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"sact.create_model({name!r}, **kwargs): keyword arguments as sact.create_model."
    return entry


for _name in _sact.list_models():
    globals()[_name] = _entry(_name)
