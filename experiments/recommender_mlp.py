"""The documents' recommender MLP (100 -> 64 -> 32 -> 1, sigmoid, binary cross-entropy) on planted data."""

from dcmodel import models
from dcmodel.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="recommender_mlp",
      model=models.get_config("mlp", input_dim=100, hidden=(64, 32), num_outputs=1, task="binary"),
      data=DataConfig(source="planted_tabular", global_batch_size=128,
                      options={"rows": 20_000, "num_features": 100}),
      mesh=MeshConfig(data=-1),
      optimizer=OptimizerConfig(name="adam", learning_rate=1e-3),
      train=TrainConfig(steps=1000, log_every=100),
  )
