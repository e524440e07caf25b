"""rgref: a NumPy reference implementation of RecurrentGemma (Griffin).

`import rgref` imports NumPy only. The model, the loaders and the compiled
kernels are imported on first use.
"""

from rgref.config import PRESET_NAMES, Config, ConfigError

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "PRESET_NAMES", "Model", "load", "__version__"]


def __getattr__(name):
    # Lazy imports keep `import rgref` cheap for projects that import it in tests.
    if name == "Model":
        from rgref.model import Model
        return Model
    if name == "load":
        from rgref.loading import load
        return load
    raise AttributeError(f"module 'rgref' has no attribute {name!r}")
