"""dalle-jax experiment run composition_regularisation

Claim (Power et al. 2022, grokking): generalisation beyond the training combinations arrives long after
overfitting, and weight decay is the strongest lever towards it; dropout is the other common regulariser. Here:
does the demo prior draw more held-out colour/shape pairs with stronger weight decay or with dropout?

The demo preset (AdamW weight decay 0.045 on the prior's matrices, the paper's; no dropout) against weight decay
0.5, dropout 0.1, and both. Seed k trains the whole pipeline on holdout set k (recipes.HOLDOUT_SETS); caption
match by the exact shapes scorer on 32 prompts per category, 16 samples each (best_of_16: CLIP-best of 16).
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import composition

EXPERIMENT = composition(
    name="composition_regularisation",
    variants={"demo": [], "weight_decay_0.5": ["prior_train.weight_decay=0.5"], "dropout_0.1": ["prior.dropout=0.1"],
              "both": ["prior_train.weight_decay=0.5", "prior.dropout=0.1"]},
    claims=(
        Claim("weight decay 0.5 draws more held-out pairs than 0.045 (Power et al. 2022)",
              a=("weight_decay_0.5", "caption/heldout/best_of_16"), b=("demo", "caption/heldout/best_of_16"),
              expect="higher"),
        Claim("dropout 0.1 draws more held-out pairs", a=("dropout_0.1", "caption/heldout/best_of_16"),
              b=("demo", "caption/heldout/best_of_16"), expect="higher"),
        Claim("weight decay 0.5 lowers the held-out validation image loss",
              a=("weight_decay_0.5", "prior/eval/image_loss_heldout"), b=("demo", "prior/eval/image_loss_heldout"),
              expect="lower"),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/relations/best_of_16",
          "prior/eval/image_loss_heldout"),
)
