"""`dlrm` on the planted click log as a production log would arrive: raw int32 ids per field,
hashed into 4x as many table rows as there are categories by the Grain pipeline (feature hashing)."""

import dataclasses
from pathlib import Path

from dcmodel.experiment import from_python


def get_config():
  cfg = from_python(Path(__file__).with_name("clicks_dlrm.py"))
  buckets = tuple(4 * n for n in cfg.data.options["table_sizes"])
  return dataclasses.replace(
      cfg, name="clicks_dlrm_hashed", model=dataclasses.replace(cfg.model, table_sizes=buckets),
      data=dataclasses.replace(cfg.data, options={**cfg.data.options, "hash_buckets": buckets}))
