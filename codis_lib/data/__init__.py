"""Data: the offline emoji corpus, ALBEF's JSON formats, transforms, datasets, batching, tokenizer.

Submodules are imported on demand (``from codis_lib.data.datasets import ...``) so that building the
corpus does not pay for importing torch and transformers.
"""
