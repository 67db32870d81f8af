"""dalle-jax experiment run composition_shape

Question (not in the paper): at equal compute, does the prior's shape (width vs depth) change how often it draws
held-out colour/shape pairs and relations? Composition is a product of concepts, and depth is where a transformer
combines them.

The demo prior (d 256, 4 layers: 3.1 M block parameters) against 384 wide x 2 layers (3.5 M) and 192 wide x 8
layers (3.5 M), every head 32 wide, each at the demo's 1200 updates of batch 16, so the training FLOPs agree within
13%. The sparse schedule keeps its rule (last layer conv, layer i column when (i - 2) mod 4 = 0, else row). Seed k
trains the whole pipeline on holdout set k (recipes.HOLDOUT_SETS); caption match by the exact shapes scorer,
32 prompts per category, 16 samples each.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import COMPOSITION_METRICS, composition

EXPERIMENT = composition(
    name="composition_shape",
    variants={"d256_l4": [], "d384_l2": ["prior.d_model=384", "prior.n_layers=2", "prior.n_heads=12"],
              "d192_l8": ["prior.d_model=192", "prior.n_layers=8", "prior.n_heads=6"]},
    metrics=(*COMPOSITION_METRICS, "prior/tokens_per_s"),
    claims=(
        Claim("deeper and narrower at equal compute draws more held-out pairs",
              a=("d192_l8", "caption/heldout/best_of_16"), b=("d256_l4", "caption/heldout/best_of_16"),
              expect="higher"),
        Claim("deeper and narrower at equal compute draws more two-object relations",
              a=("d192_l8", "caption/relations/best_of_16"), b=("d256_l4", "caption/relations/best_of_16"),
              expect="higher"),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/relations/best_of_16",
          "prior/eval/image_loss"),
)
