"""`gru`: the documents' RNN classifier on the same stdlib-snippet task as `bert`."""

from dcmodel import models
from dcmodel.config import CheckpointConfig, Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="stdlib_gru",
      model=models.get_config("gru", vocab_size=256, seq_len=256, embed_dim=32, hidden=128, num_outputs=10),
      data=DataConfig(source="stdlib_snippets", global_batch_size=64, eval_batch_size=128,
                      options={"snippet_len": 256, "max_per_class": 3000}),
      mesh=MeshConfig(data=-1),
      optimizer=OptimizerConfig(name="adamw", learning_rate=3e-3, schedule="warmup_cosine", warmup_steps=50,
                                grad_clip_norm=1.0),
      train=TrainConfig(steps=1500, log_every=50, eval_every=500),
      checkpoint=CheckpointConfig(every_steps=500),
  )
