"""dalle-jax experiment run prior_last_layer

Claim (App. B.1, Fig. 11): the attention masks follow a row, column, row, row pattern and the last layer uses the
convolutional mask; using the convolutional mask in the last layer gave "a small boost" (Fig. 11 compares it with
the row mask).

The demo prior (4 layers: row, column, row, conv) with the conv mask in its last layer or a row mask there, 600
updates per seed, the demo's dVAE and CLIP (seed 0).
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import PRIOR_SCALES

EXPERIMENT = Experiment(
    name="prior_last_layer",
    base="ablation",
    variants={"conv_last": ["prior.last_layer_conv=true"], "row_last": ["prior.last_layer_conv=false"]},
    stages=("dvae", "prior", "clip", "evaluate"),
    metrics=("prior/eval/image_loss", "prior/eval/image_loss_heldout", "caption/mean/best_of_1",
             "caption/mean/best_of_8", "frechet/generated_blur0"),
    claims=(
        Claim("the conv mask in the last layer gives a small boost: lower validation image loss (B.1, Fig. 11)",
              a=("conv_last", "prior/eval/image_loss"), b=("row_last", "prior/eval/image_loss"), expect="lower"),
        Claim("... and samples that match their caption at least as often",
              a=("conv_last", "caption/mean/best_of_1"), b=("row_last", "caption/mean/best_of_1"), expect="higher"),
    ),
    scales=PRIOR_SCALES,
    seed_sections=("prior_train",),
)
