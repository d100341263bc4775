"""`dlrm` on a planted click log: tables split by rows over the model axis (data x model = 4 x 2)."""

from dcmodel import models
from dcmodel.config import CheckpointConfig, Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  sizes = (1000, 500, 200, 100)
  return Config(
      name="clicks_dlrm",
      model=models.get_config("dlrm", num_dense=13, table_sizes=sizes, embed_dim=16, bottom=(64, 16), top=(64, 32)),
      data=DataConfig(source="clicks", global_batch_size=512, eval_batch_size=1024,
                      options={"rows": 1_000_000, "num_dense": 13, "table_sizes": sizes, "latent": 4}),
      mesh=MeshConfig(data=-1, model=2),
      optimizer=OptimizerConfig(name="adam", learning_rate=3e-3, schedule="warmup_cosine", warmup_steps=100),
      train=TrainConfig(steps=6000, log_every=100, eval_every=2000),
      checkpoint=CheckpointConfig(every_steps=2000),
  )
