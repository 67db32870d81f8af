"""dalle-jax experiment run prior_padding

Claim (§2.2): "we learn a special padding token separately for each of the 256 text positions ... this results in
higher validation loss, but better performance on out-of-distribution captions."

One learned pad per text position (the paper, our default) vs one shared pad token, with the demo's dVAE (seed 0),
the prior trained for 600 updates per seed. The demo holds four (colour, shape) pairs out of training: their
captions are out of distribution by construction, so "better on out-of-distribution captions" is measured as the
caption match of samples for held-out pairs, per sample (best_of_1, the prior alone). The text setting also shapes
the CLIP reranker's input, so each variant trains its own (seed 0); best_of_1 does not use it.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import PRIOR_SCALES

EXPERIMENT = Experiment(
    name="prior_padding",
    base="ablation",
    variants={"per_position": ["text.pad_mode=per_position"], "shared": ["text.pad_mode=shared"]},
    stages=("dvae", "prior", "clip", "evaluate"),
    metrics=("prior/eval/image_loss", "prior/eval/text_loss", "prior/eval/image_loss_heldout",
             "caption/heldout/best_of_1", "caption/in_distribution/best_of_1", "caption/relations/best_of_1",
             "caption/heldout/best_of_8"),
    claims=(
        Claim("per-position pads give higher validation loss (§2.2)", a=("per_position", "prior/eval/image_loss"),
              b=("shared", "prior/eval/image_loss"), expect="higher"),
        Claim("per-position pads do better on out-of-distribution captions (§2.2)",
              a=("per_position", "caption/heldout/best_of_1"), b=("shared", "caption/heldout/best_of_1"),
              expect="higher"),
    ),
    scales=PRIOR_SCALES,
    seed_sections=("prior_train",),
)
