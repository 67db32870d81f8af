"""dalle-jax experiment run dvae_pooling

Claim (App. A.1): in the encoder, "we found that max-pooling ... yields a better ELB" than average pooling.

The paper's dVAE recipe at 1000 updates on the 32 px shapes with max or average pooling between the encoder's
groups. The ELB is not logged; its reconstruction side is measured by the hard-code MSE on 256 validation images
(and the scorer's accuracy on the reconstructions), its KL side by the codebook perplexity.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import DVAE_SCALES

EXPERIMENT = Experiment(
    name="dvae_pooling",
    base="demo",
    variants={"max": ["dvae.pooling=max"], "avg": ["dvae.pooling=avg"]},
    stages=("dvae",),
    metrics=("dvae/eval/mse", "dvae/eval/recon_color_shape_acc", "dvae/eval/codebook_perplexity",
             "dvae/eval/codebook_used"),
    claims=(
        Claim("max pooling yields a better ELB: lower reconstruction error (A.1, proxy)", a=("max", "dvae/eval/mse"),
              b=("avg", "dvae/eval/mse"), expect="lower"),
        Claim("max pooling reconstructs colour and shape at least as often (A.1, proxy)",
              a=("max", "dvae/eval/recon_color_shape_acc"), b=("avg", "dvae/eval/recon_color_shape_acc"),
              expect="higher"),
    ),
    scales=DVAE_SCALES,
    seed_sections=("dvae_train",),
)
