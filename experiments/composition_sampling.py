"""dalle-jax experiment run composition_sampling

Claim (Ho & Salimans 2022, classifier-free guidance; not in the DALL·E paper, which reranks 512 samples with CLIP):
pushing samples towards the caption, u + s (c - u) with s > 1, trades diversity for caption match; and a better
reranker picks right images more often. Here: at sampling time, without retraining, how far do guidance and the
reranker move held-out pairs and relations?

One demo pipeline per seed (its prior learns p(image) too: caption dropout 0.1), sampled at guidance scale 1 (plain
conditional sampling, the paper), 2 and 4 (these three variants share every trained stage), a reranker trained
3x longer (CLIP 2400 updates instead of 800), and one trained with hard-negative captions (each caption's copy with
one concept swapped, clip_train.hard_negatives; NegCLIP, Yuksekgonul et al. 2023) — the last two rerank the same
16 samples of the same prior. Seed k trains the whole pipeline on holdout set k
(recipes.HOLDOUT_SETS); caption match by the exact shapes scorer, 32 prompts per category, 16 samples each.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import COMPOSITION_METRICS, composition

EXPERIMENT = composition(
    name="composition_sampling",
    variants={"guidance_1": [], "guidance_2": [], "guidance_4": [], "clip_2400": ["clip_train.steps=2400"],
              "clip_negatives": ["clip_train.hard_negatives=true"]},
    metrics=(*COMPOSITION_METRICS, "clip/eval/retrieval_top1_heldout", "clip/eval/swap_top1",
             "clip/eval/swap_top1_heldout"),
    claims=(
        Claim("guidance 2 draws more held-out pairs per sample than plain sampling",
              a=("guidance_2", "caption/heldout/best_of_1"), b=("guidance_1", "caption/heldout/best_of_1"),
              expect="higher"),
        Claim("guidance 2 raises best-of-16 caption match on held-out pairs",
              a=("guidance_2", "caption/heldout/best_of_16"), b=("guidance_1", "caption/heldout/best_of_16"),
              expect="higher"),
        Claim("a reranker trained 3x longer picks more right held-out images from the same 16",
              a=("clip_2400", "caption/heldout/best_of_16"), b=("guidance_1", "caption/heldout/best_of_16"),
              expect="higher"),
        Claim("a reranker trained with one-concept-swapped captions picks more right held-out images from the same 16",
              a=("clip_negatives", "caption/heldout/best_of_16"), b=("guidance_1", "caption/heldout/best_of_16"),
              expect="higher"),
    ),
    sampling={"guidance_2": {"cfg_scale": 2.0}, "guidance_4": {"cfg_scale": 4.0}},
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_1", "caption/heldout/best_of_16",
          "caption/relations/best_of_16"),
)
