"""depthcut: make trained neural networks shallower.

The Python API: every method on your own model and data (`depthcut.easier(model, train, val)`,
`depthcut.egp(...)`, ...: `depthcut.api`); find rectifier sites, measure their neuron-state
entropy, linearize them, fold the linear operators around them; work on saved models
(`entropy_report`, `fold_checkpoint`, `heal`, `import_model`).
"""

from depthcut.entropy import SiteCounts, count_states, measure_entropy, neuron_entropy
from depthcut.errors import ConfigError, DepthcutError
from depthcut.fold import FoldError, FoldReport, fold
from depthcut.models import ModelSpec, build_model
from depthcut.sites import SiteError, find_sites, linearize, silence
from depthcut.workflows import entropy_report, fold_checkpoint, heal, import_model

__all__ = [
    "ConfigError",
    "DepthcutError",
    "FoldError",
    "FoldReport",
    "ModelSpec",
    "SiteCounts",
    "SiteError",
    "build_model",
    "count_states",
    "entropy_report",
    "find_sites",
    "fold",
    "fold_checkpoint",
    "heal",
    "import_model",
    "linearize",
    "measure_entropy",
    "neuron_entropy",
    "silence",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`depthcut.easier(model, train, val, ...)`, `depthcut.egp(...)`, ...: every registered
    method on a user's own model and data (`depthcut.api.run_on_model`)."""
    from depthcut.api import method_function
    from depthcut.errors import ConfigError as _ConfigError

    try:
        return method_function(name)
    except _ConfigError:
        raise AttributeError(f"module 'depthcut' has no attribute {name!r}") from None
