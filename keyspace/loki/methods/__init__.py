"""Selection methods for masked mode, one file each, all in one registry (`METHODS`).

Importing this package registers every method in it; `get_method(name)` looks one up. A new
method is one file here that calls `register_method`, plus its test: the files not named below
are imported after them, in name order.
"""

import importlib
import pkgutil

# Each import registers one method; their order is the order validate runs and reports list them.
# isort: off
import keyspace.loki.methods.loki  # noqa: F401
import keyspace.loki.methods.full  # noqa: F401
import keyspace.loki.methods.exact_topk  # noqa: F401
import keyspace.loki.methods.h2o  # noqa: F401
import keyspace.loki.methods.pcaattn  # noqa: F401
import keyspace.loki.methods.sparq  # noqa: F401
import keyspace.loki.methods.streaming  # noqa: F401
import keyspace.loki.methods.adaptive  # noqa: F401

# isort: on
from keyspace.loki.methods.base import (
    DECODE_PATHS,
    METHODS,
    Method,
    Style,
    default_methods,
    get_method,
    register_method,
)
from keyspace.loki.methods.common import LayerInputs

_SUPPORT = {"base", "common"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_module}")  # already imported: a no-op

__all__ = [
    "DECODE_PATHS",
    "METHODS",
    "LayerInputs",
    "Method",
    "Style",
    "default_methods",
    "get_method",
    "register_method",
]
