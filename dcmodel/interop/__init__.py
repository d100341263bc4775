"""Weights in and out of the Hugging Face format: `import-hf` and `export-hf`.

files.py reads and writes a Hugging Face model directory (config.json, safetensors shards);
table.py is the shape of a mapping table; gpt2.py and llama.py hold one table per family (every
layout difference, in one place each); hf.py turns a directory into a dcmodel workdir and back.
"""
