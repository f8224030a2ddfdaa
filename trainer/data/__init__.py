"""Training data, from a JSONL file to batches on the GPU.

parse (formats and per-line checks), tokenize (loss masks), validate (a file's report) and dataset
(tokenized, mixed, packed examples) import no torch, so the API can check a file without it;
batch (padded tensors) is the only part that needs torch. Import from the submodules.
"""
