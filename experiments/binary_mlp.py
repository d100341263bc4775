"""The documents' binary classifier (10 -> 100 -> 50 -> 1) on 1,000 x 10 planted data."""

from dcmodel import models
from dcmodel.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="binary_mlp",
      model=models.get_config("mlp", input_dim=10, hidden=(100, 50), num_outputs=1, task="binary"),
      data=DataConfig(source="planted_tabular", global_batch_size=32, eval_batch_size=40,
                      options={"rows": 1000, "num_features": 10}),
      mesh=MeshConfig(data=-1),
      optimizer=OptimizerConfig(name="adam", learning_rate=1e-3),
      train=TrainConfig(steps=500, log_every=50),
  )
