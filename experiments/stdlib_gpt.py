"""`gpt` on the Python standard library's source files: one document per file, every 50th held out,
byte-level tokens (data.tokenizer=bytes) packed into rows of 128 + 1 with document boundaries kept."""

from dcmodel import models
from dcmodel.config import CheckpointConfig, Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  seq = 128
  return Config(
      name="stdlib_gpt",
      model=models.get_config("gpt", vocab_size=256, max_len=seq, d_model=128, num_layers=4, num_heads=4,
                              d_ff=512, mlp="gelu", norm="rmsnorm", positions="rope", tie_embeddings=True,
                              use_bias=False),
      data=DataConfig(source="stdlib_text", global_batch_size=64, eval_batch_size=128, test_fraction=0.02),
      mesh=MeshConfig(data=-1),
      optimizer=OptimizerConfig(name="adamw", learning_rate=3e-3, schedule="warmup_cosine", warmup_steps=100,
                                min_learning_rate_ratio=0.1, weight_decay=0.01, b2=0.95, grad_clip_norm=1.0),
      train=TrainConfig(steps=800, log_every=50, eval_every=400),
      checkpoint=CheckpointConfig(every_steps=400),
  )
