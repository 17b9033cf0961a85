"""keyspace: how low-dimensional a model's attention keys are, and Loki sparse attention built on it.

`keyspace.Loki` is the one way into Loki decoding; it is imported on first use, so `import
keyspace` (and `keyspace --help`) stays light.
"""

__version__ = "0.1.0"

__all__ = ["Loki", "__version__"]


def __getattr__(name: str):
    if name == "Loki":
        from keyspace.loki.api import Loki

        return Loki
    raise AttributeError(f"module 'keyspace' has no attribute {name!r}")
