"""One file per dataset; each registers its `DatasetSpec` with `depthcut.data.registry`.

Importing this package imports every module in it, in name order, so a new dataset is one new
file here (plus its test): nothing else lists the datasets.
"""

from __future__ import annotations

import importlib
import pkgutil

DATASET_MODULES: tuple[str, ...] = tuple(
    sorted(module.name for module in pkgutil.iter_modules(__path__))
)
for _name in DATASET_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
