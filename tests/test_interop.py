"""Hugging Face interop: tiny random GPT-2 and Llama models built with transformers (no hub),
imported into gpt and compared with transformers' own forward pass and greedy decoding, round
trips back out, and bad inputs."""

import io
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT
from dcmodel import cli
from dcmodel import experiment as experiment_lib
from dcmodel.infer.load import load
from dcmodel.interop import hf as interop
from dcmodel.train import state as state_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 384          # splits over model=4; the tokenizer below has 380 tokens
TEXTS = ([f"the quick brown fox jumps over the lazy dog {i} times" for i in range(200)]
         + [f"def f(x):\n    return x * {i}\n" for i in range(200)])
LAYOUTS = {"1 device": ["mesh.fsdp=1"], "DP x TP": ["mesh.fsdp=1", "mesh.data=2", "mesh.model=4"], "FSDP": ["mesh.fsdp=8"]}
EMBED_SHARD = {"1 device": (VOCAB, 64), "DP x TP": (VOCAB // 4, 64), "FSDP": (VOCAB, 64 // 8)}   # vocab over model, embed over fsdp


def _tokenizer():
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(TEXTS, vocab_size=380, min_frequency=2, show_progress=False)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def _save(model, path, tok=None, **kw):
  model.save_pretrained(path, **kw)
  if tok is not None:
    tok.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Tiny random models saved by transformers: GPT-2 (tied, float32), Llama with GQA (8 query
  heads on 4 KV heads, rope theta 5e5, untied, stored in bfloat16), and a tied Llama in two
  safetensors shards with an index. Weights are drawn wider than the default (std 0.2) so greedy
  decoding has clear winners."""
  root = tmp_path_factory.mktemp("hf")
  tok = _tokenizer()
  torch.manual_seed(0)
  gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
  llama_cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.2)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_cfg, rope_theta=5e5, tie_word_embeddings=False))
  tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_cfg, tie_word_embeddings=True))
  return {"gpt2": _save(gpt2, root / "gpt2", tok),
          "llama": _save(llama.to(torch.bfloat16), root / "llama", tok),
          "llama_tied": _save(tied, root / "llama_tied", tok, max_shard_size="100KB")}


def _hf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_logits(path, ids):
  with torch.no_grad():
    return _hf_model(path)(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def _ids(seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (2, 24)).astype(np.int32)


def _logits(placed, state, ids):
  with placed.context():
    return np.asarray(jax.jit(lambda s, x: placed.model(s)(x))(state, ids))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_imported_logits_equal_transformers_on_every_layout(hf_dirs, family, tmp_path):
  """Weights streamed straight into each layout's shardings give transformers' logits; the
  step-0 checkpoint restores them onto another mesh (1 device) unchanged."""
  ids = _ids()
  want = _hf_logits(hf_dirs[family], ids)
  diffs = {}
  for name, sets in LAYOUTS.items():
    src = interop.read_source(hf_dirs[family], sets)
    placed = state_lib.place(src.cfg)
    with placed.context():
      params = interop.load_params(src, placed)
    embed = interop._flat(params)["trunk.embed.embedding"]
    assert {s.data.shape for s in embed.addressable_shards} == {EMBED_SHARD[name]}     # each device holds its slice
    got = _logits(placed, placed.fresh_optimizer(params), ids)
    diffs[name] = float(np.abs(got - want).max())
  print(f"{family}: max abs logit diff vs transformers {diffs}")
  assert max(diffs.values()) <= 1e-4, diffs

  got = interop.import_hf(hf_dirs[family], tmp_path / "w")          # default layout: FSDP over all 8
  assert got.mesh == {"fsdp": 8}
  cfg = experiment_lib.load(tmp_path / "w" / "config.json", LAYOUTS["1 device"])
  trained = load(cfg, tmp_path / "w")
  assert trained.step == 0
  opt = jax.tree.leaves(trained.state[1])
  assert all(float(np.abs(np.asarray(x)).max()) == 0 for x in opt)        # a fresh optimizer: zero moments, step 0
  assert np.abs(_logits(trained.placed, trained.state, ids) - want).max() <= 1e-4


def _load_report(path):
  """transformers' model and every line it logged while loading it."""
  buf = io.StringIO()
  handler = logging.StreamHandler(buf)
  logger = transformers.logging.get_logger("transformers")
  level = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_info()
  logger.addHandler(handler)
  try:
    model = _hf_model(path)
  finally:
    logger.removeHandler(handler)
    transformers.logging.set_verbosity(level)
  return model, buf.getvalue()


def _no_key_warnings(log):
  return not any(w in log for w in ("LOAD REPORT", "MISSING", "UNEXPECTED", "MISMATCH", "newly initialized"))


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama_tied"])
def test_import_export_round_trip_is_exact(hf_dirs, family, tmp_path):
  interop.import_hf(hf_dirs[family], tmp_path / "w")
  assert cli.main(["export-hf", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 0
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))
  original = _hf_model(hf_dirs[family])
  exported, log = _load_report(tmp_path / "out")
  assert _no_key_warnings(log), log
  a, b = original.state_dict(), exported.state_dict()
  assert set(a) == set(b)
  assert all(torch.equal(a[k], b[k]) for k in a)                                 # bitwise
  ids = torch.tensor(_ids(1), dtype=torch.long)
  with torch.no_grad():
    assert float((original(ids).logits - exported(ids).logits).abs().max()) == 0.0
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  assert tok("def f(x)")["input_ids"] == transformers.AutoTokenizer.from_pretrained(hf_dirs[family])("def f(x)")["input_ids"]

  # The capture above can see a bad load: the same files with a tensor renamed are reported.
  bad = tmp_path / "bad"
  shutil.copytree(tmp_path / "out", bad)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(bad / "model.safetensors")
  name = sorted(tensors)[0]
  tensors["renamed." + name] = tensors.pop(name)
  save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
  assert not _no_key_warnings(_load_report(bad)[1])


@pytest.mark.slow
def test_greedy_generate_equals_transformers_after_moving_the_workdir(hf_dirs, tmp_path):
  """`dcmodel generate DIR/config.json --workdir DIR` (the tokenizer found beside config.json
  after the directory moved) decodes transformers' greedy tokens, 40 per prompt, prompts of
  different lengths in one left-padded batch."""
  interop.import_hf(hf_dirs["llama"], tmp_path / "a")
  moved = tmp_path / "moved"
  shutil.move(tmp_path / "a", moved)
  prompts = ["the quick brown", "def f(x):\n    return", "lazy dog 1", "x"]
  args = [sys.executable, "-m", "dcmodel.cli", "generate", str(moved / "config.json"), "--workdir", str(moved),
          "--max-new-tokens", "40", "--json"] + [a for p in prompts for a in ("--prompt", p.replace("\n", "\\n"))]
  out = subprocess.run(args, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout)["tokens"]
  tok = tokenizers.Tokenizer.from_file(str(hf_dirs["llama"] / "tokenizer.json"))
  model = _hf_model(hf_dirs["llama"])
  model.generation_config.eos_token_id = None          # fixed length, as dcmodel decodes
  for prompt, tokens in zip(prompts, got):
    ids = tok.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
      want = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0)[0, len(ids):]
    assert tokens == want.tolist(), prompt


@pytest.mark.slow
def test_finetune_then_export_loads_in_transformers_with_dcmodels_logits(hf_dirs, tmp_path):
  work = tmp_path / "w"
  interop.import_hf(hf_dirs["llama"], work)
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
  assert cli.main(["train", str(work / "config.json"), "--workdir", str(work), "--set", f"data.path={corpus}",
                   "--set", "train.steps=20", "--set", "train.progress=false", "--set", "optimizer.learning_rate=1e-3",
                   "--set", "train.final_eval=false"]) == 0
  assert cli.main(["export-hf", str(work), "--out", str(tmp_path / "out")]) == 0
  exported, log = _load_report(tmp_path / "out")
  assert _no_key_warnings(log), log
  ids = _ids(2)
  trained = load(experiment_lib.load(work / "config.json"), work)
  assert trained.step == 20
  ours = _logits(trained.placed, trained.state, ids)
  with torch.no_grad():
    theirs = exported(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-4
  assert np.abs(theirs - _hf_logits(hf_dirs["llama"], ids)).max() > 1e-2     # fine-tuning changed the model


def _edit_config(src, dst, **changes):
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  cfg.update(changes)
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def _replace_tensor(src, dst, name, value):
  from safetensors.numpy import load_file, save_file
  shutil.copytree(src, dst)
  tensors = load_file(dst / "model.safetensors")
  tensors[name] = value
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
  return dst


def bad_sources(hf_dirs, tmp):
  """(description, HF directory, expected fragment of the one-line message)."""
  g = hf_dirs["gpt2"]
  empty = tmp / "empty"
  empty.mkdir()
  no_weights = tmp / "no_weights"
  no_weights.mkdir()
  shutil.copy(g / "config.json", no_weights)
  truncated = tmp / "truncated"
  shutil.copytree(g, truncated)
  data = (g / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
  small_vocab = tmp / "small_vocab"
  torch.manual_seed(0)
  _save(transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=16, n_embd=16, n_layer=1, n_head=2)),
        small_vocab, _tokenizer())
  return [
      ("no config.json", empty, "has no config.json"),
      ("no weights", no_weights, "has no *.safetensors weights"),
      ("unsupported architecture", _edit_config(g, tmp / "mistral", architectures=["MistralForCausalLM"]), "MistralForCausalLM is not supported"),
      ("rope scaling", _edit_config(hf_dirs["llama"], tmp / "yarn", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
       "rope scaling of type 'yarn'"),
      ("attention bias", _edit_config(hf_dirs["llama"], tmp / "bias", attention_bias=True), "attention_bias=true"),
      ("exact GELU", _edit_config(g, tmp / "gelu", activation_function="gelu"), "activation_function='gelu'"),
      ("truncated safetensors", truncated, "is not a readable safetensors file"),
      ("integer weights", _replace_tensor(g, tmp / "int", "transformer.ln_f.weight", np.ones(64, np.int32)), "has dtype I32"),
      ("shape mismatch", _edit_config(g, tmp / "shape", n_positions=32), "has shape (64, 64), but the model config implies (32, 64)"),
      ("weights of another config", _edit_config(g, tmp / "layers", n_layer=3), "are missing from the weights, e.g. transformer.h.2."),
      ("tokenizer vocabulary too big", small_vocab, "has 380 tokens, more than the model's vocab_size 256"),
  ]


def test_bad_sources_are_one_line_and_write_nothing(hf_dirs, tmp_path, capsys):
  sources = bad_sources(hf_dirs, tmp_path)
  capsys.readouterr()
  for what, source, fragment in sources:
    work = tmp_path / f"work-{what.replace(' ', '_')}"
    code = cli.main(["import-hf", str(source), "--workdir", str(work)])
    err = capsys.readouterr().err.strip()
    assert code == 2, (what, err)
    assert err.startswith("dcmodel: error: ") and "\n" not in err, (what, err)
    assert fragment in err, (what, err)
    assert not work.exists(), what


def test_import_and_export_never_overwrite(hf_dirs, tmp_path, capsys):
  work = tmp_path / "w"
  interop.import_hf(hf_dirs["gpt2"], work)
  before = sorted(p.relative_to(work) for p in work.rglob("*"))
  assert cli.main(["import-hf", str(hf_dirs["llama"]), "--workdir", str(work)]) == 2
  assert "already holds a run" in capsys.readouterr().err
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert cli.main(["export-hf", str(work), "--out", str(out)]) == 2
  assert "exists and is not empty" in capsys.readouterr().err
  assert sorted(p.relative_to(work) for p in work.rglob("*")) == before and os.listdir(out) == ["keep.txt"]
