"""dalle-jax experiment run composition_data

Claim (Okawa et al. 2023; Park et al. 2024, arXiv 2406.19370): how fast a model composes depends on the data: on how
strongly each concept changes it and on which combinations the training set covers. Here: do more training images,
or the same number covering fewer distinct (colour, shape, size, position) combinations, change how often the demo
prior draws held-out pairs?

The demo preset (10k training images, every combination of the trained pairs) against 30k images, and 10k images
whose single-object examples show only a quarter of the combinations (data.train_coverage=0.25; every trained pair
keeps at least one). The dVAE, tokenizer and CLIP are trained on each variant's data. Seed k trains the whole
pipeline on holdout set k (recipes.HOLDOUT_SETS); caption match by the exact shapes scorer, 32 prompts per
category, 16 samples each.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import composition

EXPERIMENT = composition(
    name="composition_data",
    variants={"images_10k": [], "images_30k": ["data.num_train=30000"],
              "coverage_quarter": ["data.train_coverage=0.25"]},
    claims=(
        Claim("3x the training images draws more held-out pairs", a=("images_30k", "caption/heldout/best_of_16"),
              b=("images_10k", "caption/heldout/best_of_16"), expect="higher"),
        Claim("covering a quarter of the combinations draws fewer held-out pairs (Okawa et al. 2023)",
              a=("coverage_quarter", "caption/heldout/best_of_16"), b=("images_10k", "caption/heldout/best_of_16"),
              expect="lower"),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/position/best_of_16",
          "caption/relations/best_of_16"),
)
