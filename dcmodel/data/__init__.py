"""Input data, in layers whose imports only point down:

types (columns, the batch a model declares, reports) <- tokenizers, clean, transforms (Grain
stages: tokenize, pack, hash) <- registry <- sources/ (one module per kind) <- documents (a
corpus cleaned, split, tokenized) <- pipeline (the Grain graph) <- dataset (`Dataset`, what the
loop, predict, baselines and benchmarks use) <- ingest (ArrayRecord shards + manifest).
"""
