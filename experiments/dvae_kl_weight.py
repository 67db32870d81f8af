"""dalle-jax experiment run dvae_kl_weight

Claim (§2.1, App. A.2): "increasing the KL weight to beta = 6.6 promotes better codebook usage and ultimately leads
to a *smaller* reconstruction error at the end of training" than beta = 1; a small beta shrinks codebook use early.

The paper's dVAE recipe (linear logits, logit-Laplace, tau 1 -> 1/16 over the first 12.5%, beta cosine-warmed up)
at 1000 updates on the 32 px shapes, beta in {0, 1, 6.6}; everything else as the demo preset. Codebook usage is
the perplexity and the fraction of the 512 codes used on 256 validation images; reconstruction error is the MSE
of the EMA dVAE's reconstructions and the exact scorer's (colour, shape) accuracy on them.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import DVAE_SCALES

EXPERIMENT = Experiment(
    name="dvae_kl_weight",
    base="ablation",
    variants={"beta_0": ["dvae_train.kl_weight=0"], "beta_1": ["dvae_train.kl_weight=1"],
              "beta_6.6": ["dvae_train.kl_weight=6.6"]},
    stages=("dvae",),
    metrics=("dvae/eval/mse", "dvae/eval/codebook_perplexity", "dvae/eval/codebook_used",
             "dvae/eval/recon_color_shape_acc"),
    claims=(
        Claim("beta 6.6 gives better codebook usage than beta 1 (A.2)", a=("beta_6.6", "dvae/eval/codebook_perplexity"),
              b=("beta_1", "dvae/eval/codebook_perplexity"), expect="higher"),
        Claim("beta 6.6 gives a smaller reconstruction error than beta 1 (A.2)", a=("beta_6.6", "dvae/eval/mse"),
              b=("beta_1", "dvae/eval/mse"), expect="lower"),
    ),
    scales=DVAE_SCALES,
    seed_sections=("dvae_train",),
    plot=("dvae/eval/mse", "dvae/eval/codebook_perplexity", "dvae/eval/recon_color_shape_acc"),
)
