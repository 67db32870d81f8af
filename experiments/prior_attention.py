"""dalle-jax experiment run prior_attention

Not ablated in the paper, which uses the row / column / convolutional schedule (App. B.1) to fit 12B parameters.
Here: the sparse schedule vs dense causal attention at equal steps: validation loss, caption match, training
speed (tokens/s on this CPU).

One dVAE and one CLIP reranker (seed 0) serve every cell; each cell trains the prior with its seed (600 updates of
the demo prior) and samples 8 candidates for 32 prompts of each category. Caption match is the exact shapes
scorer's (colour, shape) check; "best_of_1" is the prior alone, "best_of_8" after CLIP reranking.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import PRIOR_SCALES

EXPERIMENT = Experiment(
    name="prior_attention",
    base="ablation",
    variants={"sparse": ["prior.attention=sparse"], "dense": ["prior.attention=dense"]},
    stages=("dvae", "prior", "clip", "evaluate"),
    metrics=("prior/eval/image_loss", "prior/eval/image_loss_heldout", "prior/tokens_per_s",
             "caption/in_distribution/best_of_1", "caption/heldout/best_of_1", "caption/mean/best_of_1",
             "caption/mean/best_of_8", "frechet/generated_blur0"),
    claims=(
        Claim("(not in the paper) dense attention reaches the same validation image loss at equal steps",
              a=("dense", "prior/eval/image_loss"), b=("sparse", "prior/eval/image_loss"), expect="same",
              tolerance=0.02),
        Claim("(not in the paper) dense attention draws the caption as often at equal steps",
              a=("dense", "caption/mean/best_of_1"), b=("sparse", "caption/mean/best_of_1"), expect="same",
              tolerance=0.05),
    ),
    scales=PRIOR_SCALES,
    seed_sections=("prior_train",),
)
