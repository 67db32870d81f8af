"""dalle-jax experiment run dvae_pooling

Claim (App. A.1): in the encoder, "we found that max-pooling ... yields a better ELB" than average pooling.

The paper's dVAE recipe at 1000 updates on the 32 px shapes with max or average pooling between the encoder's
groups; and the same with the demo preset's recipe (distance logits, MSE, no KL, tau over the whole run, code
revival), under which the dVAE reconstructs. The ELB is not logged; its reconstruction side is measured by the
hard-code MSE on 256 validation images (and the scorer's accuracy on the reconstructions), its KL side by the
codebook perplexity.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import DVAE_SCALES, demo_dvae_deviations

# The demo preset's recipe (its five deviations together): the paper's recipe at 1000 updates reconstructs almost
# nothing on this data (collapsed codes), so the pooling question is also asked where the dVAE works.
DEMO = sorted({o for overrides in demo_dvae_deviations(1000).values() for o in overrides})

EXPERIMENT = Experiment(
    name="dvae_pooling",
    base="ablation",
    variants={"max": ["dvae.pooling=max"], "avg": ["dvae.pooling=avg"],
              "demo_recipe_max": [*DEMO, "dvae.pooling=max"], "demo_recipe_avg": [*DEMO, "dvae.pooling=avg"]},
    stages=("dvae",),
    metrics=("dvae/eval/mse", "dvae/eval/recon_color_shape_acc", "dvae/eval/codebook_perplexity",
             "dvae/eval/codebook_used"),
    claims=(
        Claim("max pooling yields a better ELB: lower reconstruction error (A.1, proxy)", a=("max", "dvae/eval/mse"),
              b=("avg", "dvae/eval/mse"), expect="lower"),
        Claim("max pooling reconstructs colour and shape at least as often (A.1, proxy)",
              a=("max", "dvae/eval/recon_color_shape_acc"), b=("avg", "dvae/eval/recon_color_shape_acc"),
              expect="higher"),
        Claim("with the demo's recipe: max pooling gives lower reconstruction error (A.1, proxy)",
              a=("demo_recipe_max", "dvae/eval/mse"), b=("demo_recipe_avg", "dvae/eval/mse"), expect="lower"),
        Claim("with the demo's recipe: max pooling reconstructs colour and shape at least as often (A.1, proxy)",
              a=("demo_recipe_max", "dvae/eval/recon_color_shape_acc"),
              b=("demo_recipe_avg", "dvae/eval/recon_color_shape_acc"), expect="higher"),
    ),
    scales=DVAE_SCALES,
    seed_sections=("dvae_train",),
)
