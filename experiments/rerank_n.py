"""dalle-jax experiment run rerank_n

Claim (§3, Fig. 9c): reranking more samples with the contrastive model improves quality "up to N = 32", beyond
which returns diminish (the paper's curve flattens); the blog shows the top 32 of 512.

The demo pipeline (dVAE and CLIP seed 0, the prior trained for 600 updates per seed) samples 64 candidates for 32
prompts of each category; the exact scorer's caption match of the CLIP-best of n, for n = 1, 2, ..., 64, averaged
over disjoint groups of n draws (dalle_jax.demo.evaluate.accuracy_table). "any_of_n" is the oracle (some draw is
right): the ceiling a perfect reranker would reach.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import PRIOR_SCALES

N = (1, 2, 4, 8, 16, 32, 64)

EXPERIMENT = Experiment(
    name="rerank_n",
    base="ablation",
    variants={"demo": []},
    stages=("dvae", "prior", "clip", "evaluate"),
    metrics=(*(f"caption/mean/best_of_{n}" for n in N), "caption/heldout/best_of_1", "caption/heldout/best_of_32",
             "caption/in_distribution/any_of_n"),
    claims=(
        Claim("reranking 32 samples beats taking one (Fig. 9c)", a=("demo", "caption/mean/best_of_32"),
              b=("demo", "caption/mean/best_of_1"), expect="higher"),
        Claim("quality improves up to N = 32: best of 32 beats best of 8 (Fig. 9c)",
              a=("demo", "caption/mean/best_of_32"), b=("demo", "caption/mean/best_of_8"), expect="higher"),
        Claim("then flattens: best of 64 within 3 points of best of 32 (Fig. 9c)",
              a=("demo", "caption/mean/best_of_64"), b=("demo", "caption/mean/best_of_32"), expect="same",
              tolerance=0.03),
    ),
    scales=PRIOR_SCALES,
    seed_sections=("prior_train",),
    plot=tuple(f"caption/mean/best_of_{n}" for n in N),
    evaluation={"quick": {"num_samples": 4, "frechet_images": 0}, "cpu": {"num_samples": 64, "frechet_images": 0},
                "tpu": {"num_samples": 512}},
)
