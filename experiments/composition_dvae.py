"""dalle-jax experiment run composition_dvae

Question (not in the paper; its dVAE trains for 1.2M updates): is the demo's dVAE, trained for 1000 updates, the
ceiling on what its prior can be seen to draw? A probe (one dVAE per length on holdout set 0, 2026-12-07) kept the
colour and shape of small single objects (8 px, 2x2 tokens) in 40% of round trips after 1000 updates and in 81%
after 2000 (held-out pairs: 11% and 50%; large objects 92% and 100%), so the prior cannot show most small objects,
nor relations, whose objects are often small.

The demo preset of 2026-12-07 (dVAE 1000 updates) against a dVAE of 2000 updates with the demo's recipe stretched
over the run (tau annealed over the whole run, code revival until 80%, lr decay to the end); the prior (1200
updates) and CLIP as in the demo. Seed k trains the whole pipeline on holdout set k (recipes.HOLDOUT_SETS); caption
match by the exact shapes scorer on 32 prompts per category, 16 samples each; round_trip/* is the dVAE alone on
every single object of the lattice.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import composition, demo_dvae_steps

EXPERIMENT = composition(
    name="composition_dvae",
    variants={"dvae_1000": demo_dvae_steps(1000), "dvae_2000": demo_dvae_steps(2000)},
    claims=(
        Claim("a dVAE trained 2x longer keeps small objects through a round trip more often",
              a=("dvae_2000", "round_trip/small_trained"), b=("dvae_1000", "round_trip/small_trained"),
              expect="higher"),
        Claim("with it the prior draws more held-out pairs", a=("dvae_2000", "caption/heldout/best_of_16"),
              b=("dvae_1000", "caption/heldout/best_of_16"), expect="higher"),
        Claim("with it the prior draws more size + position prompts right",
              a=("dvae_2000", "caption/position/best_of_16"), b=("dvae_1000", "caption/position/best_of_16"),
              expect="higher"),
        Claim("with it the prior draws more in-distribution pairs",
              a=("dvae_2000", "caption/in_distribution/best_of_16"),
              b=("dvae_1000", "caption/in_distribution/best_of_16"), expect="higher"),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/position/best_of_16",
          "caption/relations/best_of_16", "round_trip/small_trained", "round_trip/small_heldout"),
)
