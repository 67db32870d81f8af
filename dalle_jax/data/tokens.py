"""The token dataset the prior trains on: dVAE image tokens + captions, as TFDS array_record.

Features: `tokens` uint16 (h, w) — the argmax codes of the dVAE encoder; `caption`; `id` (the source
example's id, so an image and its tokens can be matched); `source_split`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """What determines a token dataset: its source data and the dVAE checkpoint that encoded it."""

    source_dir: str
    dvae_fingerprint: str  # dVAE directory + checkpoint step + params used; changes when the encoder does
    grid_size: int
    vocab_size: int

    def config_name(self) -> str:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        return f"g{self.grid_size}_v{self.vocab_size}_{digest}"


@dataclasses.dataclass(eq=False)
class TokenConfig(tfds.core.BuilderConfig):
    spec: TokenSpec | None = None


class TokenBuilder(tfds.core.GeneratorBasedBuilder):
    """Writes already-encoded splits (passed in as `encoded`); TFDS only does the storage."""

    name = "image_tokens"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def __init__(self, *, encoded: dict[str, dict[str, Sequence]] | None = None, **kwargs):
        self._encoded = encoded or {}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = self.builder_config.spec
        return tfds.core.DatasetInfo(
            builder=self,
            description="dVAE image tokens + captions (dalle_jax encode). Spec: "
                        + json.dumps(dataclasses.asdict(spec), sort_keys=True),
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(spec.grid_size, spec.grid_size), dtype=np.uint16),
                "caption": tfds.features.Text(),
                "id": tfds.features.Scalar(dtype=np.int64),
            }),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split, data in self._encoded.items() if len(data["id"])}

    def _generate_examples(self, split: str):
        data = self._encoded[split]
        for tokens, caption, example_id in zip(data["tokens"], data["caption"], data["id"], strict=True):
            yield int(example_id), {"tokens": np.asarray(tokens, np.uint16), "caption": caption,
                                    "id": int(example_id)}


def token_builder(data_dir: str, spec: TokenSpec, encoded: dict | None = None) -> TokenBuilder:
    if spec.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocab {spec.vocab_size} does not fit uint16 tokens")
    config = TokenConfig(name=spec.config_name(), description="dVAE tokens", spec=spec)
    return TokenBuilder(data_dir=data_dir, config=config, file_format="array_record", encoded=encoded)
