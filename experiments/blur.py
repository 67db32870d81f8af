"""dalle-jax experiment run blur

Claim (§3, Fig. 9a,b): DALL·E's FID on MS-COCO trails the best GAN without blur, but "the gap ... shrinks" and
turns as a Gaussian blur of growing radius is applied to its samples and the references, because the dVAE's
reconstructions lose high frequencies that blur removes from everything.

Our analog: the CLIP Fréchet distance (the in-project CLIP's image embeddings; not Inception, not FID) of one
sample per validation caption, and of the dVAE's reconstructions of those validation images (the ceiling a prior
can reach through this dVAE), to the validation images, at blur radii 0, 1, 2 and 4 px. The gap
generated - reconstructed is the prior's own share; the claim is that blur shrinks the distance of samples more
than it shrinks that of reconstructions, i.e. the samples' remaining error is mostly high-frequency.
"""

from dalle_jax.experiments import Claim, Experiment
from dalle_jax.experiments.recipes import PRIOR_SCALES

RADII = (0, 1, 2, 4)

EXPERIMENT = Experiment(
    name="blur",
    base="ablation",
    variants={"demo": []},
    stages=("dvae", "prior", "clip", "evaluate"),
    metrics=(*(f"frechet/generated_blur{r}" for r in RADII), *(f"frechet/reconstructed_blur{r}" for r in RADII),
             *(f"frechet/gap_blur{r}" for r in RADII)),
    claims=(
        Claim("blur shrinks the samples' distance to real images (Fig. 9a)", a=("demo", "frechet/generated_blur2"),
              b=("demo", "frechet/generated_blur0"), expect="lower"),
        Claim("blur shrinks the gap of samples over dVAE reconstructions (Fig. 9a,b analog)",
              a=("demo", "frechet/gap_blur2"), b=("demo", "frechet/gap_blur0"), expect="lower"),
    ),
    scales=PRIOR_SCALES,
    seed_sections=("prior_train",),
    plot=tuple(f"frechet/gap_blur{r}" for r in RADII),
    # Caption match is not the question here: few prompts; many images for the Fréchet statistics.
    evaluation={"quick": {"blur_radii": RADII}, "cpu": {"prompts_per_set": 4, "num_samples": 2,
                                                         "frechet_images": 512, "blur_radii": RADII},
                "tpu": {"frechet_images": 5000, "blur_radii": RADII}},
)
