"""Configs: frozen dataclasses, named presets, command-line overrides, validation.

A run is described by one `Config`: mesh, data, text, and a model + training section per stage.
Presets are plain functions returning a `Config`; `--set section.field=value` overrides any leaf:

    dalle-jax ... --preset demo --set dvae_train.batch_size=64 --set mesh.ici_parallelism=2,2,2

Values are parsed by the field's type: ints, floats, bools (true/false/1/0/yes/no), strings, and tuples
written comma-separated (`1,2,4`) or as JSON (`[["batch", ["data", "fsdp"]]]`). The resolved config is
written to the run directory as `config.json` and can be read back with `load_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from dalle_jax.errors import ConfigError
from dalle_jax.models.clip import CLIPConfig
from dalle_jax.models.dvae import DVAEConfig
from dalle_jax.models.prior import PriorConfig
from dalle_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset and how to read it."""

    dataset: str = "shapes"  # "shapes" (built in) or "folder"
    data_dir: str = ""  # dataset version dir; empty = build the shapes data inside the run dir
    image_size: int = 64
    num_train: int = 10000
    num_validation: int = 1000
    num_test: int = 1000
    holdout: str = "red triangle,blue circle,yellow cross,green square"
    seed: int = 0
    grid: int = 1  # shapes: object corners snap to multiples of this many px (ShapesSpec.grid)
    # shapes: fraction of the (colour, shape, size, position) combinations single-object train images cover
    # (ShapesSpec.train_coverage; a composition lever, 1 = all)
    train_coverage: float = 1.0
    # shapes: fraction of single-object train captions that name one concept, the shape ("a triangle") or the
    # colour ("a red object"), half each (ShapesSpec.one_concept_captions; a composition lever, 0 = none)
    one_concept_captions: float = 0.0
    read_threads: int = 2
    prefetch: int = 2

    def __post_init__(self):
        if self.dataset not in ("shapes", "folder"):
            raise ConfigError(f"data.dataset='{self.dataset}': choose 'shapes' or 'folder'")
        if self.image_size < 8 or self.image_size % 8:
            raise ConfigError(f"data.image_size={self.image_size} must be a multiple of 8 and >= 8")
        if not 1 <= self.grid <= self.image_size // 4:
            raise ConfigError(f"data.grid={self.grid} must be in [1, data.image_size / 4 = {self.image_size // 4}] "
                              "(1 = objects at any pixel; the dVAE's downsampling puts them on the token grid)")
        if not 0.0 < self.train_coverage <= 1.0:
            raise ConfigError(f"data.train_coverage={self.train_coverage} must be in (0, 1] (1 = every combination)")
        if not 0.0 <= self.one_concept_captions <= 1.0:
            raise ConfigError(f"data.one_concept_captions={self.one_concept_captions} must be in [0, 1] (0 = every "
                              "caption names colour and shape)")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """BPE tokenizer settings (paper: vocab 16384, 256 tokens, BPE-dropout 0.1, a pad per position)."""

    vocab_size: int = 16384
    text_len: int = 256
    # "per_position" is the paper's (one learned pad per text position); "shared" is the ablation.
    pad_mode: str = "per_position"
    bpe_dropout: float = 0.1

    def __post_init__(self):
        if self.pad_mode not in ("per_position", "shared"):
            raise ConfigError(f"text.pad_mode='{self.pad_mode}': choose 'per_position' or 'shared'")
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise ConfigError(f"text.bpe_dropout={self.bpe_dropout} must be in [0, 1)")
        if self.text_len < 1 or self.vocab_size < 1:
            raise ConfigError("text.text_len and text.vocab_size must be positive")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Loop settings shared by every trainer."""

    section: ClassVar[str] = "train"  # the Config field holding it, for error messages (not a config field)

    batch_size: int = 32  # global batch, split over (data, fsdp)
    steps: int = 1000
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 3
    # A step whose loss, gradient or update is not finite is skipped (parameters unchanged); after this many in a
    # row the run stops with an error and keeps its last (finite) checkpoint.
    max_nonfinite_steps: int = 10
    # Fine-tuning (not in the paper): a run or stage directory whose latest parameters and EMA this stage starts
    # from, with a fresh optimizer ("" = a fresh init). Shapes must match (train.init_from names any that differ).
    init_from: str = ""

    def __post_init__(self):
        if self.batch_size < 1 or self.steps < 0:
            raise ConfigError(f"batch_size={self.batch_size} / steps={self.steps} out of range")
        counts = (self.log_every, self.eval_every, self.save_every, self.keep_checkpoints, self.max_nonfinite_steps)
        if min(counts) < 1:
            raise ConfigError("log_every, eval_every, save_every, keep_checkpoints and max_nonfinite_steps must be "
                              ">= 1")
        section = self.section
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{field.name}={value} must be a finite number")
        if hasattr(self, "learning_rate") and self.learning_rate <= 0:
            raise ConfigError(f"{section}.learning_rate={self.learning_rate} must be > 0")
        for name in ("learning_rate_end", "weight_decay", "clip_norm", "adam_eps"):
            if hasattr(self, name) and getattr(self, name) < 0:
                raise ConfigError(f"{section}.{name}={getattr(self, name)} must be >= 0")
        for name in ("ema_decay", "adam_b1", "adam_b2"):
            if hasattr(self, name) and not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{section}.{name}={getattr(self, name)} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class DVAETrainConfig(TrainConfig):
    """The paper's dVAE recipe (appendix A). Schedule lengths are the paper's at 1.2M updates;
    `scaled_to(steps)` keeps their proportions for shorter runs."""

    section: ClassVar[str] = "dvae_train"

    batch_size: int = 512
    steps: int = 1_200_000
    kl_weight: float = 6.6  # beta; cosine-annealed from 0 over kl_warmup_steps
    kl_warmup_steps: int = 5000
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16
    temperature_steps: int = 150_000
    temperature_schedule: str = "cosine"  # the paper's; "linear" for the ablation (it diverged there)
    learning_rate: float = 1e-4  # cosine-decayed to learning_rate_end over lr_decay_steps
    learning_rate_end: float = 1.25e-6
    lr_decay_steps: int = 1_200_000
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    # Deviation (paper silent): EMA decay warms up as min(decay, (1+t)/(10+t)), so short runs do not
    # evaluate an average still dominated by the random init; inert after ~10k steps at 0.999.
    ema_warmup: bool = True
    # Paper silent on which tensors AdamW decays; we follow common practice and skip biases.
    decay_biases: bool = False
    likelihood: str = "logit_laplace"  # the paper's; "mse" for the ablation
    # Deviation option (paper: plain Gumbel-softmax): decoder sees hard one-hot codes, gradients flow through
    # the relaxation (straight-through Gumbel-softmax).
    straight_through: bool = False
    # Deviation option (paper silent; VQ-VAE practice, needs dvae.logits="distance"): every `revive_every` steps
    # until `revive_until` x steps, each code no token of the batch picks gets the encoder feature of a badly
    # quantised token (k-means++ draw) as its code vector and that token's current decoder embedding, so it takes
    # over the token without changing its reconstruction and is then trained apart. Short demo runs otherwise
    # settle on ~11 of 512 codes (train/dvae.py `revive_dead_codes`). 0 = off.
    revive_every: int = 0
    revive_until: float = 0.8
    num_eval_images: int = 64  # held validation batch for codebook usage and reconstructions

    def __post_init__(self):
        super().__post_init__()
        if self.temperature_schedule not in ("cosine", "linear"):
            raise ConfigError(f"dvae_train.temperature_schedule='{self.temperature_schedule}': cosine or linear")
        if self.likelihood not in ("logit_laplace", "mse"):
            raise ConfigError(f"dvae_train.likelihood='{self.likelihood}': logit_laplace or mse")
        if self.revive_every < 0 or not 0 < self.revive_until <= 1:
            raise ConfigError(f"dvae_train.revive_every={self.revive_every} must be >= 0 (0 = off) and "
                              f"revive_until={self.revive_until} in (0, 1]")

    def scaled_to(self, steps: int, **overrides) -> DVAETrainConfig:
        """The same recipe over `steps` updates: every schedule keeps its fraction of the paper's 1.2M."""
        fraction = steps / 1_200_000
        scaled = dict(steps=steps, kl_warmup_steps=max(1, round(5000 * fraction)),
                      temperature_steps=max(1, round(150_000 * fraction)), lr_decay_steps=max(1, steps))
        return dataclasses.replace(self, **{**scaled, **overrides})


@dataclasses.dataclass(frozen=True)
class PriorTrainConfig(TrainConfig):
    """The paper's prior recipe (section 2.4 / appendix B)."""

    section: ClassVar[str] = "prior_train"

    batch_size: int = 1024
    steps: int = 430_000
    learning_rate: float = 4.5e-4
    warmup_steps: int = 5000  # linear from 0
    # "plateau" (paper): halve the lr when the training loss stops improving; "cosine" decays to
    # learning_rate * lr_end_fraction at `steps`; "constant" after warm-up.
    lr_schedule: str = "plateau"
    plateau_patience: int = 10  # checks without improvement (a check averages plateau_window steps)
    plateau_window: int = 1000
    lr_end_fraction: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.96
    adam_eps: float = 1e-8
    weight_decay: float = 4.5e-2  # not on gains, biases or embeddings
    clip_norm: float = 4.0
    ema_decay: float = 0.99
    ema_warmup: bool = True  # see DVAETrainConfig.ema_warmup
    microbatches: int = 1  # gradient accumulation inside the jitted step
    text_loss_weight: float = 1.0 / 8  # image weight is 1 - this
    # Deviation for the sampler's classifier-free guidance (not in the paper): replace the caption by pads
    # with this probability, so the model also learns p(image).
    caption_dropout: float = 0.0
    # Deviation options (the paper trains on the argmax of the encoder logits, §2.2; its authors found sampled
    # tokens with soft targets useful when the prior overfits, openai/DALL-E issue 1): "sampled" draws each
    # training image's input tokens from the dVAE posterior softmax(logits / posterior_temperature), fresh every
    # epoch; soft_targets=True trains on that distribution instead of one code. Both read the top
    # `posterior_topk` codes `dalle-jax encode --posterior-topk` stores. Validation stays argmax in, argmax out.
    input_tokens: str = "argmax"
    soft_targets: bool = False
    posterior_topk: int = 8
    posterior_temperature: float = 1.0
    eval_batches: int = 8  # validation batches per evaluation (0 = the whole split)

    @property
    def encoded_topk(self) -> int:
        """How many posterior codes per token the token dataset must hold for this recipe (0: argmax only)."""
        return self.posterior_topk if self.input_tokens == "sampled" or self.soft_targets else 0

    def __post_init__(self):
        super().__post_init__()
        if self.input_tokens not in ("argmax", "sampled"):
            raise ConfigError(f"prior_train.input_tokens='{self.input_tokens}': argmax or sampled")
        if self.posterior_topk < 1 or self.posterior_temperature <= 0:
            raise ConfigError(f"prior_train.posterior_topk={self.posterior_topk} must be >= 1 and "
                              f"posterior_temperature={self.posterior_temperature} > 0")
        if self.lr_schedule not in ("plateau", "cosine", "constant"):
            raise ConfigError(f"prior_train.lr_schedule='{self.lr_schedule}': plateau, cosine or constant")
        if not 0.0 <= self.text_loss_weight <= 1.0:
            raise ConfigError(f"prior_train.text_loss_weight={self.text_loss_weight} must be in [0, 1]")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"prior_train.caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.microbatches < 1 or self.batch_size % self.microbatches:
            raise ConfigError(f"prior_train.microbatches={self.microbatches} must divide batch_size="
                              f"{self.batch_size}")


@dataclasses.dataclass(frozen=True)
class ClipTrainConfig(TrainConfig):
    """The reranker's contrastive recipe, after CLIP (Radford et al. 2021; DALL·E itself used OpenAI's CLIP):
    AdamW (0.9, 0.98, 1e-6), wd 0.2 on matrices only, linear warm-up then cosine decay, batch 32768."""

    section: ClassVar[str] = "clip_train"

    batch_size: int = 32768  # global; every other example in the batch is a negative
    steps: int = 390_000  # CLIP: 32 epochs of 400M pairs
    learning_rate: float = 5e-4
    warmup_steps: int = 2000  # linear from 0, then cosine to learning_rate * lr_end_fraction at `steps`
    lr_end_fraction: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-6
    weight_decay: float = 0.2  # not on gains, biases, embeddings or the temperature
    clip_norm: float = 0.0  # global-norm gradient clipping; 0 = off (CLIP did not clip)
    ema_decay: float = 0.999  # the parameter EMA the shared loop keeps (CLIP had none)
    ema_warmup: bool = True  # see DVAETrainConfig.ema_warmup
    eval_ema: bool = True  # evaluate (and load_clip by default) the EMA parameters
    # Tokenise training captions with the tokenizer's BPE-dropout, as the prior trainer does. (CLIP had none;
    # the reranker scores deterministic tokenisations, and on the demo it cost ~5 points of retrieval.)
    bpe_dropout: bool = True
    # Deviation option (CLIP: none; NegCLIP, Yuksekgonul et al. 2023): each training caption also brings a copy
    # with one concept swapped ("a blue square" -> "a blue circle" / "a red square"), which its image must rank
    # below its own caption. Random in-batch negatives rarely differ from a caption in one word, so a reranker
    # can rank by colour alone and then cannot tell a blue circle from the blue squares the prior draws for it.
    # Shapes captions only (data.scorer.swap_one_concept); swaps never name a held-out pair.
    hard_negatives: bool = False
    retrieval_batch: int = 32  # eval: candidates per retrieval query (chance = 1 / this)
    eval_batches: int = 0  # retrieval batches per evaluation (0 = every full batch of the split)

    def __post_init__(self):
        super().__post_init__()
        if self.retrieval_batch < 2:
            raise ConfigError(f"clip_train.retrieval_batch={self.retrieval_batch} must be >= 2")
        if self.warmup_steps < 0:  # ema_decay and clip_norm: TrainConfig's checks
            raise ConfigError(f"clip_train.warmup_steps={self.warmup_steps} must be >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "default"
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    text: TextConfig = TextConfig()
    dvae: DVAEConfig = DVAEConfig()
    dvae_train: DVAETrainConfig = DVAETrainConfig()
    prior: PriorConfig = PriorConfig()
    prior_train: PriorTrainConfig = PriorTrainConfig()
    clip: CLIPConfig = CLIPConfig()
    clip_train: ClipTrainConfig = ClipTrainConfig()

    def __post_init__(self):
        # The prior's vocabularies and grid are derived, never set by hand: one source of truth each
        # (text.* for the tokenizer, dvae.vocab_size, data.image_size / the dVAE's downsampling).
        downsample = self.dvae.downsample
        grid = self.data.image_size // downsample if self.data.image_size % downsample == 0 else 1
        derived = dict(text_vocab_size=self.text.vocab_size, text_len=self.text.text_len, pad_mode=self.text.pad_mode,
                       image_vocab_size=self.dvae.vocab_size, image_factor_codes=self.dvae.factor_codes,
                       grid_size=grid)
        object.__setattr__(self, "prior", dataclasses.replace(self.prior, **derived))
        # The reranker sees the same images and BPE ids (its trainer narrows text_vocab_size to the tokenizer's).
        clip_derived = dict(image_size=self.data.image_size, text_vocab_size=self.text.vocab_size,
                            text_len=self.text.text_len, pad_mode=self.text.pad_mode)
        object.__setattr__(self, "clip", dataclasses.replace(self.clip, **clip_derived))
        if self.clip_train.hard_negatives and self.data.dataset != "shapes":
            raise ConfigError(f"clip_train.hard_negatives swaps a concept of captioned-shapes captions; "
                              f"data.dataset='{self.data.dataset}' has free-form captions: drop the option")


# --------------------------------------------------------------------------------------------------
# Presets

def _demo_dvae_train(steps: int) -> DVAETrainConfig:
    """The demo's dVAE recipe (its deviations: _ablation's docstring) over `steps` updates, tau annealed over all."""
    return DVAETrainConfig(batch_size=32, log_every=50, eval_every=250, save_every=250).scaled_to(
        steps, learning_rate=1e-3, learning_rate_end=1e-4, likelihood="mse", kl_weight=0.0,
        temperature_steps=steps, revive_every=50, num_eval_images=256)


def _ablation() -> Config:
    """Fits this 2-core CPU: 32 px shapes -> 8x8 tokens from a 512-code dVAE (one code table, as the paper's),
    short captions. The base of every experiment under experiments/ and of the small and quick presets; it was the
    demo preset until the demo adopted colour/shape codes (2026-12-07, `_demo`), and stays fixed so the experiments'
    published cells stay comparable.

    Measured on the 2-core CPU (batch 32, fwd+bwd): 64 px with 4 groups costs ~4.4 s/step (XLA:CPU conv
    weight-gradients are slow), 32 px with 3 groups ~0.3 s/step at n_hid 32.

    The dVAE deviates from the paper's recipe, each a named option, because 1-2k updates on flat synthetic
    images is not the paper's regime (1.2M updates on photos); README "Stage 1" has the measurements:
    - dvae.logits=distance, dvae.codebook_init_std=1: the released linear logits and tiny code embeddings
      collapse a short run onto 1-3 codes (reconstructions lose colour; scorer accuracy 0%).
    - likelihood=mse: the logit-Laplace density on exactly flat colours is unbounded (b -> 0; gradient norms
      100-500) and reached 19% where MSE reached 36% after 500 steps.
    - kl_weight=0: any KL to the uniform prior (beta 0.1-6.6) drove short runs into posterior collapse
      (q = uniform, the decoder ignores the codes).
    - temperature_steps = the whole run (paper: the first 12.5%): annealing tau to 1/16 within 125 steps
      froze the codes before the decoder could tell them apart.
    - revive_every=50: the run still settles on 11 of 512 codes; reviving unused codes every 50 steps (until
      80% of the run) ends with 205 in use, reconstruction accuracy 44% -> 52%, MSE 0.0058 -> 0.0057.
    """
    return Config(
        name="ablation",
        # grid=4 (the dVAE's downsampling): object corners on the token grid, so every (colour, shape, size) has one
        # token pattern instead of 16 sub-token offsets. Full demo: best-of-16 caption match (colour + shape key)
        # in-distribution 25% -> 81%, position 22% -> 62%, but held-out 31% -> 12.5%: the prior learns whole-object
        # patterns and draws a trained shape of the asked colour (README "What the demo produces"). grid=1 for the
        # other trade.
        data=DataConfig(image_size=32, num_train=10000, num_validation=1000, num_test=1000, grid=4),
        text=TextConfig(vocab_size=512, text_len=24),
        dvae=DVAEConfig(vocab_size=512, n_hid=32, n_init=32, group_count=3, blocks_per_group=1, logits="distance",
                        codebook_init_std=1.0),
        # 2000 updates (was 1000): the 1000-update dVAE kept the colour and shape of small objects (8 px, 2x2 tokens)
        # in 33-40% of round trips, so the prior could not show them; at 2000 in 81% (experiments/composition_dvae).
        dvae_train=_demo_dvae_train(2000),
        # 4 layers (row, column, row, conv) over 24 + 64 tokens; the 11x11 conv at 32x32 becomes 3x3 at 8x8.
        # remat "dots": recomputing softmax/GELU/LayerNorm moves less memory than saving them (faster on CPU).
        prior=PriorConfig(d_model=256, n_layers=4, n_heads=8, head_dim=32, conv_kernel=3, remat="dots"),
        # Short runs: cosine instead of plateau halving (there is no plateau to detect in 1200 steps); caption
        # dropout so the sampler's classifier-free guidance has an unconditional model. Batch 16 x 1200 steps sees
        # the same 19.2k sequences as 32 x 600 at ~1.1x the time and learns more from them: in the full demo,
        # validation image loss 0.635 vs 0.664, per-sample caption match 18.9 / 19.9 / 15.4% vs 18.0 / 17.6 / 10.0%
        # (in-distribution / held-out / position; README "What the demo produces").
        prior_train=PriorTrainConfig(batch_size=16, steps=1200, learning_rate=1e-3, warmup_steps=120,
                                     lr_schedule="cosine", caption_dropout=0.1, log_every=50, eval_every=400,
                                     save_every=400, eval_batches=16),
        # CLIP reranker: a 3-layer ViT over 4x4 patches of 8 px (attention pooling) and a 2-layer text transformer,
        # 1.15M parameters. Measured on 32 px shapes (10k train), 2 busy cores (load 6-7): 800 steps in 4 min 40 s
        # wall (0.3 s/step; ~0.22 quiet); caption -> image top-1 among 32: 0.83 in-distribution, 0.65 held-out
        # (the scorer's ceiling: 0.94 / 0.85). 4 px patches learned a little more per step at ~3.5x the cost;
        # BPE-dropout cost 5 points at 600 steps (one seed); lr 2e-3 or 3e-3 did worse than 1e-3.
        clip=CLIPConfig(patch_size=8, image_width=128, image_layers=3, image_heads=4, text_width=128,
                        text_layers=2, text_heads=4, embed_dim=128),
        clip_train=ClipTrainConfig(batch_size=64, steps=800, learning_rate=1e-3, warmup_steps=100,
                                   weight_decay=0.1, ema_decay=0.99, bpe_dropout=False, log_every=50,
                                   eval_every=200, save_every=200),
    )


def _demo() -> Config:
    """The main job (`dalle-jax demo`): the ablation preset with colour/shape product codes, the one lever measured
    to draw held-out colour/shape pairs (issue 17; experiments/composition_tokens, colour_shape_codes). Not in the
    paper, and specific to flat-coloured objects on a light background (the shapes dataset): each of 1024 codes is
    a pair of entries from a 32-entry table that reads only each 4 px patch's colour range and a 32-entry table
    that reads a colour-free image (dvae.factor_inputs=colour_shape), and the prior predicts one entry per table
    (prior.product_head), so "red triangle" is a red entry the prior drew for red circles and a triangle entry it
    drew for blue triangles. On holdout set 0 at the same 1200 prior updates: held-out pairs best of 16 9.4% ->
    81.2%, in-distribution 71.9% -> 90.6%, size + position 53.1% -> 78.1%, relations 18.8% -> 25.0%."""
    base = _ablation()
    dvae = dataclasses.replace(base.dvae, vocab_size=1024, factor_codes=32, factor_inputs="colour_shape")
    return dataclasses.replace(base, name="demo", dvae=dvae)


def _compose() -> Config:
    """The demo with 4x the prior's updates (4800; the whole pipeline ~25-30 min on 2 quiet cores): the one lever
    measured to lift two-object relations (experiments/composition_compute, on the one-table 1000-update dVAE:
    relations best of 16 3% -> 30%, +27 points [5, 49] over three holdout sets; in-distribution 44% -> 72%). With
    the ablation preset's one-table dVAE (experiments/composition_preset, compose_one_table, holdout sets 0-1):
    in-distribution 96.9 / 93.8%, size + position 75.0 / 78.1%, relations 65.6 / 65.6%, held-out pairs 0 / 9.4%
    best of 16. With the demo's colour/shape codes, holdout set 0 (sets 1-2 not yet run): in-distribution 93.8%,
    held-out pairs 68.8%, size + position 93.8%, relations 90.6%."""
    base = _demo()
    prior_train = dataclasses.replace(base.prior_train, steps=4800, warmup_steps=480, eval_every=1600,
                                      save_every=1600)
    return dataclasses.replace(base, name="compose", prior_train=prior_train)


def _small() -> Config:
    """Your own captioned images on this 2-core CPU (`dalle-jax train --preset small`): the demo's models and
    schedules (each measured there, see _ablation), with a BPE vocabulary and caption length for free-form captions
    instead of the shapes' 20-odd words. Measured: 10k emoji images at 32 px in 11 min 47 s on 2 cores, peak RSS
    1.6 GiB (docs/own_data.md); at 32 px the dVAE's 8x8 tokens limit what the samples can show. One code table
    (the ablation preset's): the demo's colour/shape codes assume flat colours on a light background."""
    base = _ablation()
    return dataclasses.replace(
        base, name="small",
        data=dataclasses.replace(base.data, dataset="folder", holdout="", grid=1),
        text=dataclasses.replace(base.text, vocab_size=1024, text_len=32),
        # The dVAE at the 1000 updates its timing was measured with (the demo's 2000 help small shapes; objects in
        # your images may want them too: --set dvae_train.steps=2000 with temperature_steps and lr_decay_steps).
        dvae_train=_demo_dvae_train(1000),
    )


def _quick() -> Config:
    """The demo's pipeline at minimal sizes, for CI and a first look (one code table: the ablation preset's)."""
    base = _ablation()
    return dataclasses.replace(
        base,
        name="quick",
        data=dataclasses.replace(base.data, image_size=32, num_train=256, num_validation=64, num_test=64),
        dvae=dataclasses.replace(base.dvae, n_hid=16, n_init=16, vocab_size=128),
        dvae_train=dataclasses.replace(base.dvae_train.scaled_to(20), batch_size=16, log_every=5,
                                       eval_every=10, save_every=10, num_eval_images=16),
        prior=dataclasses.replace(base.prior, d_model=64, n_layers=2, n_heads=2),
        prior_train=dataclasses.replace(base.prior_train, batch_size=16, steps=20, warmup_steps=5, log_every=5,
                                        eval_every=10, save_every=10, eval_batches=2),
        clip=dataclasses.replace(base.clip, image_width=32, image_layers=1, image_heads=2, text_width=32,
                                 text_layers=1, text_heads=2, embed_dim=32),
        clip_train=dataclasses.replace(base.clip_train, batch_size=16, steps=100, learning_rate=3e-3, warmup_steps=10,
                                       log_every=10, eval_every=50, save_every=50, retrieval_batch=16,
                                       eval_batches=4),
    )


def _bench() -> Config:
    return Config(
        name="bench",
        data=DataConfig(image_size=128),
        text=TextConfig(vocab_size=16384, text_len=64),
        dvae=DVAEConfig(compute_dtype="bfloat16"),
        dvae_train=DVAETrainConfig(batch_size=64),
        # The benchmark anchor's dimensions: 512 wide, 8 layers of 8 x 64 heads, 64 text + 16x16 image tokens.
        # remat "dots" keeps the matmul outputs and recomputes the rest (softmax, GELU, LayerNorm) in the backward
        # pass: on the CPU saving less is faster (4.3 s vs 5.8 s a step, benchmarks/README.md), and it is the
        # policy a TPU run of a larger model would use.
        prior=PriorConfig(d_model=512, n_layers=8, n_heads=8, head_dim=64, conv_kernel=5, remat="dots"),
        prior_train=PriorTrainConfig(batch_size=8),
        # 16x16 patches of 8 px, 256-wide towers.
        clip=CLIPConfig(patch_size=8, image_width=256, image_layers=4, image_heads=4, text_width=256, text_layers=4,
                        text_heads=4, embed_dim=256, compute_dtype="bfloat16"),
        clip_train=ClipTrainConfig(batch_size=256, steps=20_000, learning_rate=5e-4, warmup_steps=500),
    )


def _1b() -> Config:
    """A 1.0B-parameter prior (d 2048, 20 layers) at the paper's sequence: a single-host TPU VM size."""
    base = _paper_12b()
    return dataclasses.replace(base, name="1b", prior=PriorConfig(d_model=2048, n_layers=20, n_heads=32, head_dim=64,
                                                               attention_impl="splash"),
                               prior_train=PriorTrainConfig(batch_size=256))


def _paper_12b() -> Config:
    """The paper's numbers: 256x256 images, 256 text tokens, vocab 16384, batch 1024."""
    return Config(
        name="paper_12b",
        mesh=MeshConfig(ici_parallelism=(1, -1, 1)),
        data=DataConfig(dataset="folder", image_size=256),
        text=TextConfig(vocab_size=16384, text_len=256),
        dvae=DVAEConfig(compute_dtype="bfloat16"),
        dvae_train=DVAETrainConfig(),
        # Splash: the TPU kernel computes only the tiles the masks show and keeps no L x L scores in HBM
        # (AOT on v4-256: 19.1 instead of 29.5 GiB per chip, docs/aot.md). On CPU/GPU set attention_impl=blocked.
        prior=PriorConfig(compute_dtype="bfloat16", remat="full", attention_impl="splash"),
        prior_train=PriorTrainConfig(),
        # A CLIP ViT-B/16-sized reranker with CLIP's recipe (the defaults).
        clip=CLIPConfig(compute_dtype="bfloat16"),
        clip_train=ClipTrainConfig(),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "demo": _demo,
    "compose": _compose,
    "ablation": _ablation,
    "small": _small,
    "quick": _quick,
    "bench": _bench,
    "1b": _1b,
    "paper_12b": _paper_12b,
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------------
# Overrides

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_value(text: str, annotation: Any, where: str) -> Any:
    """Parses `text` as a value of the field type `annotation`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(annotation)):
            return None
        return _parse_value(text, options[0], where)
    if annotation is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{where}: '{text}' is not a boolean (use true/false)")
    if annotation in (int, float, str):
        try:
            return annotation(text)
        except ValueError:
            raise ConfigError(f"{where}: '{text}' is not a valid {annotation.__name__}") from None
    if origin is tuple:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = [v.strip() for v in text.split(",") if v.strip()]
        args = typing.get_args(annotation)
        item_type = args[0] if args else str
        if not isinstance(value, list):
            value = [value]
        if item_type in (int, float):
            try:
                return tuple(item_type(v) for v in value)
            except ValueError:
                raise ConfigError(f"{where}: '{text}' is not a list of {item_type.__name__}") from None
        return _to_tuples(value)
    raise ConfigError(f"{where}: cannot set fields of type {annotation} from the command line")


def _to_tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuples(v) for v in value)
    return value


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Returns `config` with each `section.field=value` override applied (validated on construction)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' must look like section.field=value")
        path, text = override.split("=", 1)
        config = _set_path(config, path.strip().split("."), text.strip(), path.strip())
    return config


def _set_path(node: Any, keys: list[str], text: str, full: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(node)}
    if keys[0] not in fields:
        raise ConfigError(f"override '{full}': {type(node).__name__} has no field '{keys[0]}'; "
                          f"fields are {sorted(fields)}")
    current = getattr(node, keys[0])
    if len(keys) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"override '{full}': '{keys[0]}' is not a section")
        return dataclasses.replace(node, **{keys[0]: _set_path(current, keys[1:], text, full)})
    hints = typing.get_type_hints(type(node))
    return dataclasses.replace(node, **{keys[0]: _parse_value(text, hints[keys[0]], full)})


# --------------------------------------------------------------------------------------------------
# Files

def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(config), indent=2) + "\n")


def _from_dict(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = _to_tuples(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path) -> Config:
    """Reads a `config.json` written by `save_config`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    return _from_dict(Config, data, str(path))


def resolve(preset: str = "demo", overrides: Sequence[str] = ()) -> Config:
    """Preset + overrides, validated."""
    return apply_overrides(get_preset(preset), overrides)
