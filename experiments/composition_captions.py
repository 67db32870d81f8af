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

Such a prior also knows p(image | "a circle") and p(image | "a blue object") on their own: `one_concept_concepts`
samples that same prior (every trained stage shared) with concept guidance (composable guidance, Liu et al. 2022:
logits c + w (c_shape - u) + w (c_colour - u), w = 1; SampleConfig.concept_scale), each single-object prompt
guided by its shape-only and colour-only captions (data.scorer.one_concept_captions; relations are sampled
plainly) — the product of two experts that are each in distribution for a held-out pair. `one_concept_only` drops
the full caption's term (s = 0: u + (c_shape - u) + (c_colour - u), Composable Diffusion's AND): for a held-out
pair the full caption pulls towards the trained pairs the prior has seen with its colour. Relations have no
one-concept captions, so at s = 0 they are drawn from the unconditional model: that variant's relations column
measures nothing.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import composition

EXPERIMENT = composition(
    name="composition_captions",
    variants={"full_captions": [], "one_concept_half": ["data.one_concept_captions=0.5"],
              "one_concept_concepts": ["data.one_concept_captions=0.5"],
              "one_concept_only": ["data.one_concept_captions=0.5"]},
    sampling={"one_concept_concepts": {"concept_scale": 1.0},
              "one_concept_only": {"concept_scale": 1.0, "cfg_scale": 0.0}},
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
        Claim("concept guidance (composable guidance, Liu et al. 2022) draws more held-out pairs from the same prior",
              a=("one_concept_concepts", "caption/heldout/best_of_16"),
              b=("one_concept_half", "caption/heldout/best_of_16"), expect="higher"),
        Claim("the concepts alone (no full-caption term) draw more held-out pairs than plain sampling",
              a=("one_concept_only", "caption/heldout/best_of_16"),
              b=("one_concept_half", "caption/heldout/best_of_16"), expect="higher"),
        Claim("concept guidance gets held-out shapes right more often, per sample",
              a=("one_concept_concepts", "caption/heldout/shape_per_sample"),
              b=("one_concept_half", "caption/heldout/shape_per_sample"), expect="higher"),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/heldout/shape_per_sample",
          "caption/heldout/color_per_sample", "caption/relations/best_of_16"),
)
