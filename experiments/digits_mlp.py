"""The design documents' 256 -> 128 -> 10 MLP classifier on the digits, data x model = 4 x 2."""

from dcmodel import models
from dcmodel.config import Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="digits_mlp",
      model=models.get_config("mlp", input_dim=64, hidden=(256, 128), num_outputs=10),
      data=DataConfig(source="digits", global_batch_size=128),
      mesh=MeshConfig(data=-1, model=2),
      optimizer=OptimizerConfig(name="adamw", learning_rate=2e-3, schedule="warmup_cosine", warmup_steps=20),
      train=TrainConfig(steps=400, log_every=50),
  )
