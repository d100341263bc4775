"""Quickstart: the design documents' CNN on scikit-learn's handwritten digits, 8 devices (data-parallel)."""

from dcmodel import models
from dcmodel.config import CheckpointConfig, Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="digits_cnn",
      model=models.get_config("cnn", image_size=(8, 8), features=(32, 64), num_outputs=10),
      data=DataConfig(source="digits", global_batch_size=128, eval_batch_size=128, test_fraction=0.2),
      mesh=MeshConfig(data=-1, model=1),
      optimizer=OptimizerConfig(name="adamw", learning_rate=3e-3, schedule="warmup_cosine", warmup_steps=20,
                                weight_decay=1e-4),
      train=TrainConfig(steps=400, log_every=50),
      checkpoint=CheckpointConfig(every_steps=200, max_to_keep=2),
  )
