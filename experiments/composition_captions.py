"""dalle-jax experiment run composition_captions

Question (issue 17; after Okawa et al. 2023 and Park et al. 2024: how fast a concept is learnt follows how strongly
it alone changes the data): the demo prior's held-out samples get the colour right 75% of the time and the shape
16% (composition_dvae): asked for a blue circle it draws blue squares. In the training captions colour and shape
always come together, so the prior can learn each trained pair as one unit. Does training on some captions that
name one concept ("a triangle", "a red object") make the shape word act on its own and compose?

The demo preset (every caption names colour and shape) against half of the single-object train captions naming
only the shape or only the colour, half each (data.one_concept_captions=0.5; images, validation and test
unchanged; the tokenizer and CLIP train on the new captions, the dVAE sees the same images). Seed k trains the whole
pipeline on holdout set k (recipes.HOLDOUT_SETS); caption match by the exact shapes scorer, 32 prompts per
category, 16 samples each.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import composition

EXPERIMENT = composition(
    name="composition_captions",
    variants={"full_captions": [], "one_concept_half": ["data.one_concept_captions=0.5"]},
    claims=(
        Claim("captions naming one concept draw more held-out pairs",
              a=("one_concept_half", "caption/heldout/best_of_16"), b=("full_captions", "caption/heldout/best_of_16"),
              expect="higher"),
        Claim("captions naming one concept get held-out shapes right more often, per sample",
              a=("one_concept_half", "caption/heldout/shape_per_sample"),
              b=("full_captions", "caption/heldout/shape_per_sample"), expect="higher"),
        Claim("in-distribution pairs stay as good (within 10 points, best of 16)",
              a=("one_concept_half", "caption/in_distribution/best_of_16"),
              b=("full_captions", "caption/in_distribution/best_of_16"), expect="same", tolerance=0.1),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/heldout/shape_per_sample",
          "caption/heldout/color_per_sample", "caption/relations/best_of_16"),
)
