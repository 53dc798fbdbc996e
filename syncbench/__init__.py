"""syncbench: time-to-accuracy of sync, local-SGD and async training of a Lightning module.

The installed package is this one import name; its parts are ``syncbench.experiments``,
``syncbench.strategies``, ``syncbench.sweeps`` and ``syncbench.analysis`` (docs/README.md).
"""

from __future__ import annotations

from pathlib import Path

# In a source tree the parts are the repository's top-level folders (the project's layout), not
# subfolders of this one: let this package's search path reach them. Whichever copy of this file
# Python imports (an editable install, a copy of the tree on PYTHONPATH as the mutation check
# makes) then takes its parts from that same tree. A wheel has them as real subpackages.
_tree = Path(__file__).resolve().parent.parent
if (_tree / "pyproject.toml").is_file() and (_tree / "experiments" / "__init__.py").is_file():
    __path__.append(str(_tree))  # noqa: F821 - the package's own __path__
