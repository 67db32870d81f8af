"""dalle-jax experiment run composition_tokens

Claim (Liang et al. 2025, arXiv 2501.18797): generators memorise by superposing their training data even when the
inputs are disentangled; factors that are separable in the *output* representation give data-efficient
composition. Our output representation is the dVAE's token grid: with 4 px tokens over 32 px images a token holds a
piece of an object in its colour, so "red" and "triangle" meet inside each code. Here: does a token geometry in
which colour and shape separate better let the demo prior draw held-out pairs?

The demo preset (8x8 tokens of 4 px from a 512-code dVAE, objects on the token grid: data.grid=4) against objects
at any pixel (data.grid=1), a 128-code dVAE, and 16x16 tokens of 2 px (dvae.group_count=2, objects on its grid:
data.grid=2; the prior's sequence grows from 88 to 280 tokens, so it costs ~3-4x the time), and product codes
(dvae.factor_codes=16: each of the 512 codes is a pair of entries from a 16-code and a 32-code table, each table
quantising half of the encoder's channels; the prior embeds and predicts a token per table, so an unseen pair of
seen entries gets the product of their probabilities) with, as the ablation, a prior that keeps one row and one
logit per code on the same dVAE (prior.product_head=false). colour_shape_codes forces the tables apart
(dvae.factor_inputs=colour_shape: a 32-entry table reads only each token's patch colour range, a 32-entry table
only a colour-free image, 1024 codes) because the unsupervised split puts shape in both tables
(experiments/analysis/code_tables.py). Seed k trains the whole pipeline on holdout set k
(recipes.HOLDOUT_SETS); caption match by the exact shapes scorer, 32 prompts per category, 16 samples each.
"""

from dalle_jax.experiments import Claim
from dalle_jax.experiments.recipes import COMPOSITION_METRICS, composition

EXPERIMENT = composition(
    name="composition_tokens",
    variants={"tokens_8x8": [], "objects_anywhere": ["data.grid=1"], "codebook_128": ["dvae.vocab_size=128"],
              "tokens_16x16": ["dvae.group_count=2", "data.grid=2"],
              "product_codes": ["dvae.factor_codes=16"],
              "product_codes_joint_head": ["dvae.factor_codes=16", "prior.product_head=false"],
              "colour_shape_codes": ["dvae.vocab_size=1024", "dvae.factor_codes=32",
                                     "dvae.factor_inputs=colour_shape"]},
    metrics=(*COMPOSITION_METRICS, "dvae/eval/codebook_used"),
    claims=(
        Claim("16x16 tokens of 2 px (colour and shape more separable per token) draw more held-out pairs "
              "(Liang et al. 2025)", a=("tokens_16x16", "caption/heldout/best_of_16"),
              b=("tokens_8x8", "caption/heldout/best_of_16"), expect="higher"),
        Claim("a 128-code dVAE (codes shared across more patches) draws more held-out pairs",
              a=("codebook_128", "caption/heldout/best_of_16"), b=("tokens_8x8", "caption/heldout/best_of_16"),
              expect="higher"),
        Claim("(not in the paper) product codes, one head per table, draw more held-out pairs (Liang et al. "
              "2025: factors separable in the output)", a=("product_codes", "caption/heldout/best_of_16"),
              b=("tokens_8x8", "caption/heldout/best_of_16"), expect="higher"),
        Claim("(not in the paper) product codes whose tables read colour and shape apart draw more held-out pairs "
              "than one code table", a=("colour_shape_codes", "caption/heldout/best_of_16"),
              b=("tokens_8x8", "caption/heldout/best_of_16"), expect="higher"),
        Claim("(not in the paper) product codes whose tables read colour and shape apart draw more held-out pairs "
              "than the unsupervised split", a=("colour_shape_codes", "caption/heldout/best_of_16"),
              b=("product_codes", "caption/heldout/best_of_16"), expect="higher"),
        Claim("(not in the paper) on product codes the head per table, not the dVAE alone, draws the held-out pairs",
              a=("product_codes", "caption/heldout/best_of_16"),
              b=("product_codes_joint_head", "caption/heldout/best_of_16"), expect="higher"),
        Claim("objects on the token grid draw more held-out pairs than objects anywhere",
              a=("tokens_8x8", "caption/heldout/best_of_16"), b=("objects_anywhere", "caption/heldout/best_of_16"),
              expect="higher"),
    ),
    plot=("caption/in_distribution/best_of_16", "caption/heldout/best_of_16", "caption/relations/best_of_16",
          "dvae/eval/recon_color_shape_acc"),
)
