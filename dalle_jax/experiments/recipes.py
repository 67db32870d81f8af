"""Override lists the experiment files share: the paper's dVAE recipe at a given length on top of the demo preset
(which deviates from it, config._demo says why), and the sizes each scale trains at."""

from __future__ import annotations


def dvae_steps(steps: int) -> list[str]:
    """A dVAE run of `steps` updates with every schedule at the paper's fraction of 1.2M (DVAETrainConfig.scaled_to):
    KL warm-up 5k/1.2M, temperature 150k/1.2M (12.5%), lr decay over the whole run."""
    return [f"dvae_train.steps={steps}", f"dvae_train.kl_warmup_steps={max(1, round(steps * 5000 / 1_200_000))}",
            f"dvae_train.temperature_steps={max(1, round(steps * 150_000 / 1_200_000))}",
            f"dvae_train.lr_decay_steps={steps}"]


def paper_dvae(steps: int) -> list[str]:
    """The paper's dVAE recipe (linear logits, logit-Laplace likelihood, beta 6.6, tau 1 -> 1/16 over the first
    12.5%, no code revival) over `steps` updates, undoing the demo preset's deviations."""
    return [*dvae_steps(steps), "dvae.logits=linear", "dvae_train.likelihood=logit_laplace",
            "dvae_train.kl_weight=6.6", "dvae_train.revive_every=0"]


# dVAE ablations: the paper's recipe at 1000 updates on this CPU (~220 s a cell; 3 variants x 3 seeds ~35 min);
# on a v4-8 / v5e-8 slice at 64 px over 200k images for 100k updates.
DVAE_SCALES = {"cpu": paper_dvae(1000),
               "tpu": [*paper_dvae(100_000), "data.image_size=64", "data.num_train=200000",
                       "dvae_train.batch_size=512"],
               "quick": paper_dvae(20)}


# The demo preset's deviations from paper_dvae, one key (or the keys that only work together) at a time, at
# `steps` updates (the demo anneals tau over the whole run).
def demo_dvae_deviations(steps: int) -> dict[str, list[str]]:
    return {"distance_logits": ["dvae.logits=distance"],
            "mse_likelihood": ["dvae_train.likelihood=mse"],
            "kl_weight_0": ["dvae_train.kl_weight=0"],
            "tau_whole_run": [f"dvae_train.temperature_steps={steps}"],
            "code_revival": ["dvae.logits=distance", f"dvae_train.revive_every={max(1, steps // 20)}"]}



# Prior ablations on this CPU: the demo's dVAE, CLIP and data; the prior trained for half the demo's 1200 updates
# (~200 s each), so an experiment of 2 variants x 3 seeds (+ sampling) fits in ~40 minutes.
PRIOR_CPU = ["prior_train.steps=600", "prior_train.warmup_steps=60", "prior_train.eval_every=300",
             "prior_train.save_every=300"]
# A v4-8 / v5e-8 slice: 64 px images (16x16 tokens), a 12-layer 512-wide prior, 100k pairs.
PRIOR_TPU = ["data.image_size=64", "data.num_train=100000", "prior.d_model=512", "prior.n_layers=12",
             "prior_train.batch_size=256", "prior_train.steps=20000", "prior_train.warmup_steps=1000",
             "prior_train.eval_every=2000", "prior_train.save_every=2000", "clip_train.steps=5000",
             "dvae_train.steps=20000", "dvae_train.lr_decay_steps=20000", "dvae_train.temperature_steps=20000",
             "dvae_train.batch_size=256"]
PRIOR_SCALES = {"cpu": PRIOR_CPU, "tpu": PRIOR_TPU, "quick": []}


def demo_dvae_steps(steps: int) -> list[str]:
    """The demo's dVAE recipe over `steps` updates: `dvae_steps` with tau annealed over the whole run (KL warm-up
    at the paper's fraction, unused at beta 0), spelled out so an experiment stays put when the demo changes length."""
    tau = "dvae_train.temperature_steps="
    return [f"{tau}{steps}" if s.startswith(tau) else s for s in dvae_steps(steps)]


# Composition (held-out colour/shape pairs, relations): three holdout sets, fixed before any tuning, each holding
# every colour and every shape out at most once. Seed k trains and tests on set k, so an interval over seeds also
# covers the choice of held-out pairs. Set 0 is the demo's default.
HOLDOUT_SETS = ("red triangle,blue circle,yellow cross,green square",
                "purple circle,orange square,cyan triangle,black cross",
                "green triangle,yellow circle,red cross,blue square")
COMPOSITION_SEEDS = {k: [f"data.holdout={holdout}"] for k, holdout in enumerate(HOLDOUT_SETS)}
# The demo preset as it is (its prior at 1200 updates): the lever experiments start from the main job's recipe.
COMPOSITION_SCALES = {"cpu": [], "tpu": PRIOR_TPU, "quick": []}
# Best of 16 by CLIP, as the composition targets are stated; no Fréchet distances (caption match is the question).
COMPOSITION_EVALUATION = {"quick": {"num_samples": 4, "frechet_images": 0},
                          "cpu": {"num_samples": 16, "prompts_per_set": 32, "frechet_images": 0},
                          "tpu": {"num_samples": 64, "frechet_images": 0}}
COMPOSITION_METRICS = tuple(f"caption/{category}/best_of_{n}" for category in ("in_distribution", "heldout",
                                                                                 "position", "relations")
                            for n in (1, 16)) + ("prior/eval/image_loss", "prior/eval/image_loss_heldout")
# Per concept, per sample (Okawa et al.: a pair is right about as often as the product of its concepts): which
# concept a held-out pair fails on; and whether the dVAE's reconstructions could show it at all (validation images,
# and every single object on the lattice by size and by trained / held-out pair).
COMPOSITION_METRICS += ("caption/in_distribution/color_per_sample", "caption/in_distribution/shape_per_sample",
                        "caption/heldout/color_per_sample", "caption/heldout/shape_per_sample",
                        "caption/in_distribution/right_shape_distance", "caption/heldout/right_shape_distance",
                        "dvae/eval/recon_color_shape_acc", "round_trip/small_trained", "round_trip/small_heldout",
                        "round_trip/large_trained", "round_trip/large_heldout")


def composition(**fields):
    """An Experiment of the composition family: the demo pipeline, the stages through evaluation, seed k on holdout
    set k, the composition metrics and evaluation; `fields` give name, variants, claims, plot (and any other)."""
    from dalle_jax.experiments.spec import Experiment

    defaults = dict(base="ablation", stages=("dvae", "prior", "clip", "evaluate"), metrics=COMPOSITION_METRICS,
                    scales=COMPOSITION_SCALES, seed_overrides=COMPOSITION_SEEDS, evaluation=COMPOSITION_EVALUATION)
    return Experiment(**{**defaults, **fields})
