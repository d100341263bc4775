"""The benchmark GPT written plainly in PyTorch, nanoGPT style: the peer of dcmodel's `gpt`.

The same computation as dcmodel's model for the two variants the LM peers benchmark runs
(no biases, RMSNorm with eps 1e-6, tanh-approximated GELU or SwiGLU, learned positions or
half-split RoPE with base 10000, tied or untied unembedding), so the parameter count is equal
and the FLOPs are the same. Attention is `F.scaled_dot_product_attention`, causal; Q, K and V
come from one fused projection, as in nanoGPT. Decoding keeps a KV cache per layer, written in
place, one token per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
  def __init__(self, d: int, heads: int, rope: bool):
    super().__init__()
    self.heads, self.head_dim, self.rope = heads, d // heads, rope
    self.qkv = nn.Linear(d, 3 * d, bias=False)
    self.out = nn.Linear(d, d, bias=False)

  def forward(self, x, rope_cs=None, cache=None, pos: int = 0):
    b, t, d = x.shape
    q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)     # (b, t, h, hd) each
    if self.rope:
      q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)           # (b, h, t, hd)
    if cache is None:
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:   # decode: write this step's keys and values at `pos`, attend to slots [0, pos + t)
      cache[0][:, :, pos:pos + t] = k
      cache[1][:, :, pos:pos + t] = v
      k, v = cache[0][:, :, :pos + t], cache[1][:, :, :pos + t]
      y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)                # prefill from an empty cache is causal
    return self.out(y.transpose(1, 2).reshape(b, t, d))


def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
  """(cos, sin) of shape (t, 1, head_dim / 2), dcmodel's frequencies (base^(-i / half))."""
  half = head_dim // 2
  freq = base ** (-torch.arange(half, dtype=torch.float32) / half)
  angle = positions.float()[:, None] * freq
  return angle.cos()[:, None, :], angle.sin()[:, None, :]


def apply_rope(x, cos, sin):
  """Half-split rotation on (b, t, h, hd), as dcmodel.models.transformer.rope."""
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLP(nn.Module):
  def __init__(self, d: int, f: int, swiglu: bool):
    super().__init__()
    self.swiglu = swiglu
    self.up = nn.Linear(d, f, bias=False)
    self.gate = nn.Linear(d, f, bias=False) if swiglu else None
    self.down = nn.Linear(f, d, bias=False)

  def forward(self, x):
    h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x), approximate="tanh")
    return self.down(h)


class Block(nn.Module):
  def __init__(self, d, heads, f, swiglu, rope):
    super().__init__()
    self.norm1, self.attn = nn.RMSNorm(d, eps=1e-6), Attention(d, heads, rope)
    self.norm2, self.mlp = nn.RMSNorm(d, eps=1e-6), MLP(d, f, swiglu)

  def forward(self, x, rope_cs=None, cache=None, pos: int = 0):
    x = x + self.attn(self.norm1(x), rope_cs, cache, pos)
    return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
  def __init__(self, vocab: int, max_len: int, d: int, layers: int, heads: int, d_ff: int, swiglu: bool, rope: bool,
               tie: bool):
    super().__init__()
    self.rope, self.head_dim, self.max_len = rope, d // heads, max_len
    self.embed = nn.Embedding(vocab, d)
    self.pos = None if rope else nn.Embedding(max_len, d)
    self.blocks = nn.ModuleList(Block(d, heads, d_ff, swiglu, rope) for _ in range(layers))
    self.norm = nn.RMSNorm(d, eps=1e-6)
    self.unembed = None if tie else nn.Linear(d, vocab, bias=False)
    # dcmodel's initialisers: N(0, 0.02) embeddings, fan-in (LeCun) normal matrices
    for name, p in self.named_parameters():
      if "norm" in name:
        continue
      nn.init.normal_(p, std=0.02 if ("embed" in name or "pos" in name) else 1 / math.sqrt(p.shape[1]))

  @classmethod
  def from_config(cls, m):
    """From dcmodel's TransformerConfig (a `gpt` model config)."""
    return cls(m.vocab_size, m.max_len, m.d_model, m.num_layers, m.num_heads, m.d_ff, m.mlp == "swiglu",
               m.positions == "rope", m.tie_embeddings)

  def forward(self, tokens, caches=None, pos: int = 0):
    t = tokens.shape[1]
    positions = torch.arange(pos, pos + t)
    x = self.embed(tokens)
    if self.pos is not None:
      x = x + self.pos(positions)
    rope_cs = rope_tables(positions, self.head_dim) if self.rope else None
    for i, block in enumerate(self.blocks):
      x = block(x, rope_cs, None if caches is None else caches[i], pos)
    x = self.norm(x)
    return x @ self.embed.weight.T if self.unembed is None else self.unembed(x)

  def new_caches(self, batch: int, slots: int):
    blk = self.blocks[0].attn
    shape = (batch, blk.heads, slots, blk.head_dim)
    return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks]


def warmup_cosine(step: int, peak: float, warmup: int, total: int, end_ratio: float) -> float:
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, peak * end_ratio) at `step`, as a
  multiplier of `peak` (for LambdaLR)."""
  if step < warmup:
    return step / warmup
  frac = min((step - warmup) / max(total - warmup, 1), 1.0)
  return end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def dynamo_stats() -> dict:
  """What torch.compile has done in this process so far: frames compiled (each compilation,
  recompilations included), distinct graphs, graph breaks. Taken after the warm-up and again
  at the end, the difference in frames is the recompilations inside the timed region."""
  from torch._dynamo.utils import counters
  return {"frames_compiled": counters["frames"]["ok"], "unique_graphs": counters["stats"]["unique_graphs"],
          "graph_breaks": sum(counters["graph_break"].values())}
