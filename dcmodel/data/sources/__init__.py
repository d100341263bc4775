"""Every source kind, one module each; importing this package registers them all."""

from dcmodel.data.sources import builtin, files, stored, tables  # noqa: F401
