"""dalle-jax experiment run prior_loss_weight

The paper's choice (§2.2): "we normalize the cross-entropy losses for the text and image tokens by the total number
of each kind in a batch of data. Since we are primarily interested in image modeling, we multiply the
cross-entropy loss for the text by 1/8 and the cross-entropy loss for the image by 7/8."

Text:image weights 1/8:7/8 (the paper) vs 0:1 (image only) and 1/2:1/2, 600 updates per seed, the demo's dVAE and
CLIP (seed 0). Reported: validation image loss and caption match per sample.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import PRIOR_SCALES

EXPERIMENT = Experiment(
    name="prior_loss_weight",
    base="ablation",
    variants={"text_eighth": ["prior_train.text_loss_weight=0.125"], "text_0": ["prior_train.text_loss_weight=0"],
              "text_half": ["prior_train.text_loss_weight=0.5"]},
    stages=("dvae", "prior", "clip", "evaluate"),
    metrics=("prior/eval/image_loss", "prior/eval/text_loss", "caption/mean/best_of_1", "caption/heldout/best_of_1",
             "caption/mean/best_of_8"),
    claims=(
        Claim("weighting the image 7/8 (vs 1/2) models images better: lower validation image loss (§2.2)",
              a=("text_eighth", "prior/eval/image_loss"), b=("text_half", "prior/eval/image_loss"), expect="lower"),
        Claim("some text loss (1/8 vs 0) costs no caption match", a=("text_eighth", "caption/mean/best_of_1"),
              b=("text_0", "caption/mean/best_of_1"), expect="same", tolerance=0.05),
    ),
    scales=PRIOR_SCALES,
    seed_sections=("prior_train",),
)
