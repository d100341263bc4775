"""The model zoo: each family registers its config class under a name (see registry.py)."""

from dcmodel.models.registry import build, get_config, names, register  # noqa: F401
from dcmodel.models import cnn, dlrm, mlp, rnn, transformer  # noqa: F401  (registers the families)
