"""dalle-jax experiment run composition_targets

Claim (A. Ramesh, openai/DALL-E issue 1): training the prior on sampled dVAE tokens with soft targets "was useful
in the overfitting regime"; the paper itself trains on the argmax of the encoder logits (§2.2). Here: do sampled
tokens and soft targets help the demo prior compose held-out colour/shape pairs?

The demo preset (argmax tokens in and out) against prior_train.input_tokens=sampled (each epoch a fresh draw from
the dVAE posterior), soft_targets=true (the posterior over its top 8 codes as the target), and both; posterior
temperature 1. Validation loss is argmax in and out for every variant. Seed k trains the whole pipeline on holdout
set k (recipes.HOLDOUT_SETS); caption match by the exact shapes scorer, 32 prompts per category, 16 samples each.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import composition

EXPERIMENT = composition(
    name="composition_targets",
    variants={"argmax": [], "sampled": ["prior_train.input_tokens=sampled"],
              "soft": ["prior_train.soft_targets=true"],
              "sampled_soft": ["prior_train.input_tokens=sampled", "prior_train.soft_targets=true"]},
    claims=(
        Claim("sampled tokens with soft targets draw more held-out pairs than argmax (Ramesh, DALL-E issue 1)",
              a=("sampled_soft", "caption/heldout/best_of_16"), b=("argmax", "caption/heldout/best_of_16"),
              expect="higher"),
        Claim("sampled tokens with soft targets lower the held-out validation image loss",
              a=("sampled_soft", "prior/eval/image_loss_heldout"), b=("argmax", "prior/eval/image_loss_heldout"),
              expect="lower"),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/relations/best_of_16",
          "prior/eval/image_loss_heldout"),
)
