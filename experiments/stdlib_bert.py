"""`bert` classifying 256-byte stdlib snippets by package (10 classes, split by file)."""

from dcmodel import models
from dcmodel.config import CheckpointConfig, Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="stdlib_bert",
      model=models.get_config("bert", vocab_size=256, max_len=256, d_model=64, num_layers=2, num_heads=4,
                              d_ff=256, positions="rope", num_outputs=10),
      data=DataConfig(source="stdlib_snippets", global_batch_size=32, eval_batch_size=128,
                      options={"snippet_len": 256, "max_per_class": 3000}),
      mesh=MeshConfig(data=-1),
      optimizer=OptimizerConfig(name="adamw", learning_rate=2e-3, schedule="warmup_cosine", warmup_steps=100,
                                weight_decay=0.01),
      train=TrainConfig(steps=1200, log_every=50, eval_every=600),
      checkpoint=CheckpointConfig(every_steps=500),
  )
