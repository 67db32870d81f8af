"""dalle-jax experiment run dvae_recipe

Not in the paper: the demo preset departs from the paper's dVAE recipe in five named ways (dalle_jax/config.py
`_demo` says why: distance logits, an MSE likelihood, no KL term, tau annealed over the whole run, reviving unused
codes). This experiment adds each deviation to the paper's recipe on its own, and all of them together (the demo
preset), so a reader sees which one buys what at this scale.

500 updates per cell (7 variants x 3 seeds must fit ~45 minutes on 2 cores); everything else as the demo preset.
The quick scale (20 updates, for tests) keeps the 500-update variants.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import demo_dvae_deviations, paper_dvae

STEPS = 500
deviations = demo_dvae_deviations(STEPS)
demo = sorted({o for overrides in deviations.values() for o in overrides})

EXPERIMENT = Experiment(
    name="dvae_recipe",
    base="ablation",
    variants={"paper": [], **{f"+{name}": overrides for name, overrides in deviations.items()}, "demo": demo},
    stages=("dvae",),
    metrics=("dvae/eval/recon_color_shape_acc", "dvae/eval/mse", "dvae/eval/codebook_perplexity",
             "dvae/eval/codebook_used", "diverged"),
    claims=(
        Claim("(not in the paper) the demo's deviations together reconstruct colour and shape more often than the "
              "paper's recipe at this scale", a=("demo", "dvae/eval/recon_color_shape_acc"),
              b=("paper", "dvae/eval/recon_color_shape_acc"), expect="higher"),
        Claim("(not in the paper) code revival alone raises codebook use",
              a=("+code_revival", "dvae/eval/codebook_used"), b=("paper", "dvae/eval/codebook_used"), expect="higher"),
        Claim("(not in the paper) the MSE likelihood alone reconstructs more often than logit-Laplace",
              a=("+mse_likelihood", "dvae/eval/recon_color_shape_acc"),
              b=("paper", "dvae/eval/recon_color_shape_acc"), expect="higher"),
    ),
    # No tpu scale: the question is what the short-run deviations buy on a CPU, and the variants' schedule keys
    # (tau over the whole run, revival every 25 updates) are sized for 500 updates.
    scales={"cpu": paper_dvae(STEPS), "quick": paper_dvae(20)},
    seed_sections=("dvae_train",),
    plot=("dvae/eval/recon_color_shape_acc", "dvae/eval/mse", "dvae/eval/codebook_used"),
)
