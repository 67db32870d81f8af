"""The token dataset the prior trains on: dVAE image tokens + captions, as TFDS array_record.

Features: `tokens` uint16 (h, w) — the argmax codes of the dVAE encoder; `caption`; `id` (the source
example's id, so an image and its tokens can be matched). With `TokenSpec.posterior_topk = k > 0` also the
encoder's k most likely codes per token and their logits, `posterior_codes` uint16 and `posterior_logits` float32
(h, w, k), so the prior can train on sampled tokens or soft targets (`prior_train.input_tokens`, `soft_targets`).
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
    posterior_topk: int = 0  # > 0: also keep the encoder's k most likely codes and their logits per token

    def to_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        if not fields["posterior_topk"]:  # argmax-only datasets keep the names and description they always had
            del fields["posterior_topk"]
        return fields

    def config_name(self) -> str:
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
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
        grid = (spec.grid_size, spec.grid_size)
        features = {"tokens": tfds.features.Tensor(shape=grid, dtype=np.uint16), "caption": tfds.features.Text(),
                    "id": tfds.features.Scalar(dtype=np.int64)}
        if spec.posterior_topk:
            top = (*grid, spec.posterior_topk)
            features["posterior_codes"] = tfds.features.Tensor(shape=top, dtype=np.uint16)
            features["posterior_logits"] = tfds.features.Tensor(shape=top, dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self,
            description="dVAE image tokens + captions (dalle_jax encode). Spec: "
                        + json.dumps(spec.to_dict(), sort_keys=True),
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split, data in self._encoded.items() if len(data["id"])}

    def _generate_examples(self, split: str):
        data = self._encoded[split]
        for i, example_id in enumerate(data["id"]):
            example = {"tokens": np.asarray(data["tokens"][i], np.uint16), "caption": data["caption"][i],
                       "id": int(example_id)}
            if self.builder_config.spec.posterior_topk:
                example["posterior_codes"] = np.asarray(data["posterior_codes"][i], np.uint16)
                example["posterior_logits"] = np.asarray(data["posterior_logits"][i], np.float32)
            yield int(example_id), example


def token_builder(data_dir: str, spec: TokenSpec, encoded: dict | None = None) -> TokenBuilder:
    if spec.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocab {spec.vocab_size} does not fit uint16 tokens")
    config = TokenConfig(name=spec.config_name(), description="dVAE tokens", spec=spec)
    return TokenBuilder(data_dir=data_dir, config=config, file_format="array_record", encoded=encoded)
