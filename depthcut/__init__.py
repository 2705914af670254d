"""depthcut: make trained neural networks shallower.

The Python API: find rectifier sites, measure their neuron-state entropy, linearize them, fold
the linear operators around them, and run the depth-reduction methods end to end; work on saved
models (`entropy_report`, `fold_checkpoint`, `heal`, `import_model`).
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
