"""Every source kind, one module each. `sources.load(cfg)` loads a source by name with every
kind registered (the registry itself knows none: sources register themselves into it)."""

from dcmodel.data.registry import load  # noqa: F401
from dcmodel.data.sources import builtin, files, stored, tables  # noqa: F401  (register their sources)
