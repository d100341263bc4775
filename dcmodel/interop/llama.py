"""Llama (`LlamaForCausalLM`) <-> gpt: the config fields and the one mapping table.

Layout differences, all here: torch Linear stores (out, in), gpt (in, out), so every kernel is
transposed; q/k/v_proj's flat (heads x head_dim) output is gpt's two axes, o_proj's input too.
RoPE needs no permutation: Hugging Face's Llama rotates halves (dimension i with i + head_dim/2),
as gpt does (Meta's original interleaved layout is permuted by transformers' own converter).
GQA: query head n reads KV head n // (heads / kv_heads) in both (transformers' repeat_kv).
SwiGLU: silu(x gate_proj) * (x up_proj) -> down_proj is gpt's silu(x wg) * (x wi) -> wo.
"""

from __future__ import annotations

import re

from dcmodel.interop.table import Row, refuse, reshaped, same, transposed

ARCHITECTURE = "LlamaForCausalLM"
IGNORED = re.compile(r"rotary_emb\.inv_freq$")   # a buffer older files carry


def _rope(hf: dict) -> float:
  """RoPE's theta: transformers 5 writes rope_parameters, 4 wrote rope_theta (+ rope_scaling)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  if params and "rope_type" not in params and "rope_theta" not in params:
    refuse(ARCHITECTURE, f"per-layer-type rope_parameters {sorted(params)}")
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    refuse(ARCHITECTURE, f"rope scaling of type {kind!r} (gpt has plain RoPE with a theta)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def gpt_fields(hf: dict) -> dict:
  """gpt's model fields from Llama's config.json; what gpt cannot express is refused."""
  if hf.get("hidden_act", "silu") != "silu":
    refuse(ARCHITECTURE, f"hidden_act={hf.get('hidden_act')!r} (gpt's gated MLP is SwiGLU: silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      refuse(ARCHITECTURE, f"{key}=true (gpt's Llama shape has no biases)")
  for key in ("sliding_window", "layer_types"):
    if hf.get(key) and (key != "layer_types" or set(hf[key]) != {"full_attention"}):
      refuse(ARCHITECTURE, f"{key}={hf[key]!r} (gpt attends over the whole causal context in every layer)")
  d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
  if hf.get("head_dim") not in (None, d // heads):
    refuse(ARCHITECTURE, f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {d // heads}")
  kv = hf.get("num_key_value_heads") or heads
  return dict(vocab_size=hf.get("vocab_size", 32000), max_len=hf.get("max_position_embeddings", 2048), d_model=d,
              num_layers=hf.get("num_hidden_layers", 32), num_heads=heads, num_kv_heads=0 if kv == heads else kv,
              d_ff=hf.get("intermediate_size", 11008), mlp="swiglu", norm="rmsnorm", positions="rope",
              rope_theta=_rope(hf), norm_eps=hf.get("rms_norm_eps", 1e-6),
              tie_embeddings=hf.get("tie_word_embeddings", False), use_bias=False, dropout=0.0)


def mismatch(m) -> str | None:
  """Why a gpt config is not a Llama (None if it is one)."""
  want = {"mlp": "swiglu", "norm": "rmsnorm", "positions": "rope", "use_bias": False}
  return ", ".join(f"model.{k}={getattr(m, k)!r}" for k, v in want.items() if getattr(m, k) != v) or None


def hf_config(m, base: dict) -> dict:
  drop = ("rope_scaling", "rope_theta")          # superseded by rope_parameters in transformers 5
  return {**{k: v for k, v in base.items() if k not in drop}, "architectures": [ARCHITECTURE], "model_type": "llama",
          "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
          "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads,
          "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_len,
          "rms_norm_eps": m.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
          "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False, "dtype": "float32"}


def canonical(name: str) -> str:
  """Names as LlamaForCausalLM writes them: a bare LlamaModel file lacks the `model.` prefix."""
  return name if name.startswith(("model.", "lm_head.")) else "model." + name


def table(m) -> list[Row]:
  d, h, k, hd, f, v = m.d_model, m.num_heads, m.kv_heads, m.head_dim, m.d_ff, m.vocab_size
  rows = [same("model.embed_tokens.weight", "trunk.embed.embedding", (v, d)),
          same("model.norm.weight", "trunk.final_norm.scale", (d,))]
  for i in range(m.num_layers):
    hf, us = f"model.layers.{i}.", f"trunk.blocks.{i}."
    rows += [
        same(hf + "input_layernorm.weight", us + "norm1.scale", (d,)),
        reshaped(hf + "self_attn.q_proj.weight", us + "attn.wq", (h * hd, d), (d, h, hd), transpose=True),
        reshaped(hf + "self_attn.k_proj.weight", us + "attn.wk", (k * hd, d), (d, k, hd), transpose=True),
        reshaped(hf + "self_attn.v_proj.weight", us + "attn.wv", (k * hd, d), (d, k, hd), transpose=True),
        reshaped(hf + "self_attn.o_proj.weight", us + "attn.wo", (d, h * hd), (h, hd, d), transpose=True),
        same(hf + "post_attention_layernorm.weight", us + "norm2.scale", (d,)),
        transposed(hf + "mlp.gate_proj.weight", us + "mlp.wg", (f, d)),
        transposed(hf + "mlp.up_proj.weight", us + "mlp.wi", (f, d)),
        transposed(hf + "mlp.down_proj.weight", us + "mlp.wo", (d, f)),
    ]
  if not m.tie_embeddings:
    rows.append(transposed("lm_head.weight", "unembed", (v, d)))
  return rows
