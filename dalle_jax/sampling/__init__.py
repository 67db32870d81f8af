"""Sampling: the KV-cached token sampler (`sampler`) and captions -> decoded, CLIP-reranked images (`rerank`)."""
