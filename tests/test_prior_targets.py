"""The prior trained on the dVAE posterior (prior_train.input_tokens=sampled, soft_targets=true): the stored top-k
posterior, the soft cross-entropy against a numpy reference, soft = hard as the temperature goes to 0, sampled
tokens follow the posterior, and an end-to-end run."""

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax import config as config_lib
from dalle_jax.config import PriorTrainConfig
from dalle_jax.data.pipeline import open_split
from dalle_jax.data.tokenizer import TextTokenizer
from dalle_jax.data.tokens import TokenSpec
from dalle_jax.errors import ConfigError
from dalle_jax.runs import find_dataset_dir
from dalle_jax.train import prior as prior_train
from tests.test_transformer import TINY, _model, _random_inputs
from tests.token_data import TEXT_LEN, make_token_data


def _batch(rng, k, temperature):
    text, image = _random_inputs(TINY, 3, rng)
    text = text % TINY.text_vocab_size
    codes = (np.asarray(image)[..., None] + np.arange(k)) % TINY.image_vocab_size  # the token first, k distinct
    logits = -np.sort(rng.exponential(2.0, codes.shape), axis=-1)
    probs = prior_train.posterior_probs(logits, temperature)
    batch = {"text": text, "image_tokens": image, "target_codes": jnp.asarray(codes, jnp.int32),
             "target_probs": jnp.asarray(probs)}
    return prior_train.count_tokens(batch, TINY.text_vocab_size)


def test_soft_targets_equal_hard_targets_as_temperature_goes_to_zero():
    model, rng = _model(TINY), np.random.default_rng()
    cfg = PriorTrainConfig()
    batch = _batch(rng, k=5, temperature=1e-6)
    hard = {k: v for k, v in batch.items() if not k.startswith("target")}
    soft_loss, soft_metrics = prior_train.prior_loss(model, batch, jax.random.key(0), jnp.asarray(0), cfg,
                                                     TINY.text_vocab_size)
    hard_loss, hard_metrics = prior_train.prior_loss(model, hard, jax.random.key(0), jnp.asarray(0), cfg,
                                                     TINY.text_vocab_size)
    np.testing.assert_allclose(soft_metrics["image_loss"], hard_metrics["image_loss"], rtol=1e-6)
    np.testing.assert_allclose(soft_loss, hard_loss, rtol=1e-6)
    # a warm posterior is a different target: the loss moves
    warm = _batch(np.random.default_rng(rng.integers(1 << 30)), k=5, temperature=1.0)
    warm_loss, _ = prior_train.prior_loss(model, warm, jax.random.key(0), jnp.asarray(0), cfg, TINY.text_vocab_size)
    assert abs(float(warm_loss) - float(hard_loss)) > 1e-3


def test_soft_image_loss_matches_numpy_reference():
    model, rng = _model(TINY), np.random.default_rng()
    batch = _batch(rng, k=4, temperature=0.7)
    _, metrics = prior_train.prior_loss(model, batch, jax.random.key(0), jnp.asarray(0), PriorTrainConfig(),
                                        TINY.text_vocab_size)
    _, image_logits = model(batch["text"], batch["image_tokens"])
    logits = np.asarray(image_logits, np.float64)
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    codes, probs = np.asarray(batch["target_codes"]), np.asarray(batch["target_probs"], np.float64)
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-6)
    expected = -(probs * np.take_along_axis(log_softmax, codes, -1)).sum(-1).mean()
    np.testing.assert_allclose(metrics["image_loss"], expected, rtol=1e-5)


@pytest.fixture(scope="module")
def posterior_data(tmp_path_factory):
    return make_token_data(tmp_path_factory.mktemp("posterior"), posterior_topk=4)


def test_sampled_input_tokens_follow_the_posterior(posterior_data):
    tokenizer = TextTokenizer.load(posterior_data / "tokenizer.json")
    example = open_split(find_dataset_dir(posterior_data / "tokens"), "train")[0]
    codes = np.asarray(example["posterior_codes"]).reshape(-1, 4)
    for temperature in (1.0, 0.5):
        cfg = PriorTrainConfig(input_tokens="sampled", posterior_topk=4, posterior_temperature=temperature)
        transform = prior_train.token_transform(tokenizer, True, cfg)
        probs = prior_train.posterior_probs(np.asarray(example["posterior_logits"]).reshape(-1, 4), temperature)
        draws = np.stack([transform(example, np.random.default_rng(i))["image_tokens"] for i in range(2000)])
        frequency = (draws[:, :, None] == codes[None]).mean(0)  # (tokens, k)
        assert np.allclose(frequency.sum(-1), 1.0)  # every draw is one of the stored codes
        np.testing.assert_allclose(frequency, probs, atol=0.045)  # 2000 draws: sd <= 0.011
    cold = PriorTrainConfig(input_tokens="sampled", posterior_topk=4, posterior_temperature=1e-6)
    cold_draw = prior_train.token_transform(tokenizer, True, cold)(example, np.random.default_rng())
    np.testing.assert_array_equal(cold_draw["image_tokens"], np.asarray(example["tokens"]).reshape(-1))
    # validation reads the argmax tokens, whatever the training recipe
    argmax = prior_train.token_transform(tokenizer, False, cfg)(example, np.random.default_rng())
    np.testing.assert_array_equal(argmax["image_tokens"], np.asarray(example["tokens"]).reshape(-1))
    assert "target_probs" not in argmax


def test_argmax_token_datasets_keep_their_name_and_spec():
    spec = TokenSpec("src", "dvae", 8, 512)
    assert "posterior_topk" not in spec.to_dict()
    # the name every argmax token dataset had before the field existed: the hash of the four fields alone
    before = {"source_dir": "src", "dvae_fingerprint": "dvae", "grid_size": 8, "vocab_size": 512}
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:12]
    assert spec.config_name() == f"g8_v512_{digest}"
    assert TokenSpec("src", "dvae", 8, 512, posterior_topk=4).config_name() != spec.config_name()


def test_soft_sampled_prior_trains_and_a_missing_posterior_is_named(posterior_data, tmp_path):
    sets = [f"text.text_len={TEXT_LEN}", "prior_train.steps=3", "prior_train.eval_every=3", "prior_train.save_every=3",
            "prior_train.input_tokens=sampled", "prior_train.soft_targets=true", "prior_train.posterior_topk=4"]
    config = config_lib.resolve("quick", sets)
    tokens = find_dataset_dir(posterior_data / "tokens")
    summary = prior_train.train_prior(config, tokens, posterior_data / "tokenizer.json", tmp_path / "soft",
                                      progress=False)
    assert summary["step"] == 3 and np.isfinite(summary["metrics"]["eval/image_loss"])
    plain = make_token_data(tmp_path / "plain")
    with pytest.raises(ConfigError, match="--posterior-topk 4"):
        prior_train.train_prior(config, find_dataset_dir(plain / "tokens"), plain / "tokenizer.json",
                                tmp_path / "refused", progress=False)
