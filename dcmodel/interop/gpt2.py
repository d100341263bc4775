"""GPT-2 (`GPT2LMHeadModel`) <-> gpt: the config fields and the one mapping table.

Layout differences, all here: GPT-2's Conv1D stores kernels (in, out), as gpt does (no
transpose); c_attn fuses Q | K | V along its output axis (weight and bias); gpt keeps heads as
their own axis ((d, heads, head_dim), output (heads, head_dim, d)); the LM head is tied to wte
unless tie_word_embeddings is false (then lm_head.weight is (vocab, d), gpt's unembed (d, vocab)).
GELU is gelu_new (tanh approximation) = jax.nn.gelu.
"""

from __future__ import annotations

import re

from dcmodel.interop.table import Row, fused, refuse, reshaped, same, transposed

ARCHITECTURE = "GPT2LMHeadModel"
# Buffers that older GPT-2 files carry beside the parameters (the causal mask), not weights.
IGNORED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def gpt_fields(hf: dict) -> dict:
  """gpt's model fields from GPT-2's config.json; what gpt cannot express is refused."""
  if hf.get("activation_function", "gelu_new") not in TANH_GELU:
    refuse(ARCHITECTURE, f"activation_function={hf.get('activation_function')!r} (gpt's GELU is the tanh approximation, "
                         f"{' or '.join(TANH_GELU)})")
  for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False), ("scale_attn_weights", True)):
    if hf.get(key, ok) != ok:
      refuse(ARCHITECTURE, f"{key}={hf.get(key)}")
  d = hf.get("n_embd", 768)
  return dict(vocab_size=hf.get("vocab_size", 50257), max_len=hf.get("n_positions", 1024), d_model=d,
              num_layers=hf.get("n_layer", 12), num_heads=hf.get("n_head", 12), num_kv_heads=0,
              d_ff=hf.get("n_inner") or 4 * d, mlp="gelu", norm="layernorm", positions="learned",
              norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
              use_bias=True, dropout=0.0)


def mismatch(m) -> str | None:
  """Why a gpt config is not a GPT-2 (None if it is one)."""
  want = {"mlp": "gelu", "norm": "layernorm", "positions": "learned", "use_bias": True}
  bad = [f"model.{k}={getattr(m, k)!r}" for k, v in want.items() if getattr(m, k) != v]
  if m.kv_heads != m.num_heads:
    bad.append(f"model.num_kv_heads={m.num_kv_heads} (GPT-2 has no grouped-query attention)")
  return ", ".join(bad) or None


def hf_config(m, base: dict) -> dict:
  return {**base, "architectures": [ARCHITECTURE], "model_type": "gpt2", "vocab_size": m.vocab_size,
          "n_positions": m.max_len, "n_embd": m.d_model, "n_layer": m.num_layers, "n_head": m.num_heads,
          "n_inner": m.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
          "tie_word_embeddings": m.tie_embeddings, "scale_attn_weights": True,
          "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "dtype": "float32"}


def canonical(name: str) -> str:
  """Names as GPT2LMHeadModel writes them: a bare GPT2Model file (the original `gpt2` upload)
  lacks the `transformer.` prefix."""
  return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


def table(m) -> list[Row]:
  d, h, hd, f, v = m.d_model, m.num_heads, m.head_dim, m.d_ff, m.vocab_size
  rows = [same("transformer.wte.weight", "trunk.embed.embedding", (v, d)),
          same("transformer.wpe.weight", "trunk.pos", (m.max_len, d)),
          same("transformer.ln_f.weight", "trunk.final_norm.scale", (d,)),
          same("transformer.ln_f.bias", "trunk.final_norm.bias", (d,))]
  for i in range(m.num_layers):
    hf, us = f"transformer.h.{i}.", f"trunk.blocks.{i}."
    qkv = tuple(us + f"attn.w{x}" for x in "qkv")
    rows += [
        same(hf + "ln_1.weight", us + "norm1.scale", (d,)),
        same(hf + "ln_1.bias", us + "norm1.bias", (d,)),
        fused(hf + "attn.c_attn.weight", qkv, (d, 3 * d), [(d, h, hd)] * 3, axis=1),
        fused(hf + "attn.c_attn.bias", tuple(us + f"attn.b{x}" for x in "qkv"), (3 * d,), [(h, hd)] * 3, axis=0),
        reshaped(hf + "attn.c_proj.weight", us + "attn.wo", (d, d), (h, hd, d)),
        same(hf + "attn.c_proj.bias", us + "attn.bo", (d,)),
        same(hf + "ln_2.weight", us + "norm2.scale", (d,)),
        same(hf + "ln_2.bias", us + "norm2.bias", (d,)),
        same(hf + "mlp.c_fc.weight", us + "mlp.wi", (d, f)),
        same(hf + "mlp.c_fc.bias", us + "mlp.bi", (f,)),
        same(hf + "mlp.c_proj.weight", us + "mlp.wo", (f, d)),
        same(hf + "mlp.c_proj.bias", us + "mlp.bo", (d,)),
    ]
  if not m.tie_embeddings:
    rows.append(transposed("lm_head.weight", "unembed", (v, d)))
  return rows
