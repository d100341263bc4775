"""`gpt` on a user's own corpus: name it with --set data.path=PATH (a .jsonl, a .parquet, a
database with data.query, a text file, a directory or a glob), its text field with
--set data.text_field=NAME and its tokenizer with --set data.tokenizer=FILE|bytes (train one with
`dcmodel tokenizer train experiments/corpus_gpt.py --set data.path=... --vocab-size N --out tok.json`;
then set model.vocab_size to at least its size). Documents are packed into rows of max_len + 1
tokens; attention and positions restart at every document; every 50th document is held out.
"""

from dcmodel import models
from dcmodel.config import CheckpointConfig, Config, DataConfig, MeshConfig, OptimizerConfig, TrainConfig


def get_config() -> Config:
  return Config(
      name="corpus_gpt",
      model=models.get_config("gpt", vocab_size=256, max_len=128, d_model=128, num_layers=4, num_heads=4,
                              d_ff=512, mlp="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=True,
                              use_bias=False),
      data=DataConfig(source="corpus", text_field="text", tokenizer="bytes", global_batch_size=64,
                      eval_batch_size=128, test_fraction=0.02),
      mesh=MeshConfig(data=-1),
      optimizer=OptimizerConfig(name="adamw", learning_rate=3e-3, schedule="warmup_cosine", warmup_steps=100,
                                min_learning_rate_ratio=0.1, weight_decay=0.01, b2=0.95, grad_clip_norm=1.0),
      train=TrainConfig(steps=800, log_every=50, eval_every=400),
      checkpoint=CheckpointConfig(every_steps=400),
  )
