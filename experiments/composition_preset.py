"""dalle-jax experiment run composition_preset

Issue 17 asks for a `compose` preset if the composition targets need more compute than the demo's 20 minutes. The
one lever measured to help (experiments/composition_compute, on the 1000-update dVAE) is the prior's updates: 4x
lifted two-object relations best of 16 from 3% to 30% and in-distribution from 44% to 72%, and left held-out
colour/shape pairs where they were. Here: the `compose` preset (the demo with 4800 prior updates, its 2000-update
dVAE) against the demo preset (1200), each on the three holdout sets (seed k trains the whole pipeline on
recipes.HOLDOUT_SETS[k]; both variants share a seed's dVAE). Targets (best of 16 by CLIP, mean over the three
sets): in-distribution 90%, held-out pairs 50%, size + position 75%, relations 40%. Caption match by the exact
shapes scorer on 32 prompts per category, 16 samples each.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import composition

EXPERIMENT = composition(
    name="composition_preset",
    base="compose",
    variants={"compose": [],
              "demo": ["prior_train.steps=1200", "prior_train.warmup_steps=120", "prior_train.eval_every=400",
                       "prior_train.save_every=400"]},
    claims=(
        Claim("(issue 17) the compose preset draws two-object relations more often than the demo",
              a=("compose", "caption/relations/best_of_16"), b=("demo", "caption/relations/best_of_16"),
              expect="higher"),
        Claim("(issue 17) the compose preset draws size + position prompts more often than the demo",
              a=("compose", "caption/position/best_of_16"), b=("demo", "caption/position/best_of_16"),
              expect="higher"),
        Claim("(issue 17) the compose preset draws held-out pairs more often than the demo",
              a=("compose", "caption/heldout/best_of_16"), b=("demo", "caption/heldout/best_of_16"),
              expect="higher"),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/position/best_of_16",
          "caption/relations/best_of_16", "caption/in_distribution/best_of_1", "caption/relations/best_of_1"),
)
