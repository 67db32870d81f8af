"""What an experiment file declares: a base preset, variants that differ from it only in the ablated keys, seeds,
stages, metrics and the paper's claims, each checked as a difference between two (variant, metric) cells.

An experiment file (experiments/<name>.py) defines `EXPERIMENT = Experiment(...)`; its docstring opens with the
command that reproduces it and quotes the claim. `load(name)` imports it by path (experiments/ is not a package).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from dalle_jax import config as config_lib
from dalle_jax.config import Config
from dalle_jax.errors import ConfigError, InputError
from dalle_jax.sampling.sampler import SampleConfig

SCALES = ("cpu", "tpu", "quick")
# Stages in order; an experiment runs a prefix-closed subset (a prior needs a dVAE, an evaluation needs a prior).
STAGES = ("dvae", "prior", "clip", "evaluate")
# The train sections a seed may vary; an experiment names the ones its seeds apply to (the rest use seed 0 and
# are shared between cells: one dVAE for every prior ablation).
SEED_SECTIONS = ("dvae_train", "prior_train", "clip_train")


@dataclasses.dataclass(frozen=True)
class Claim:
    """`a` should be `expect` than `b`: (variant, metric) pairs compared seed by seed.

    expect: "higher" or "lower" (a vs b), or "same" (|a - b| within `tolerance`).
    """

    text: str  # the paper's words and where they are
    a: tuple[str, str]
    b: tuple[str, str]
    expect: str
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.expect not in ("higher", "lower", "same"):
            raise ConfigError(f"claim {self.text!r}: expect={self.expect!r}: choose 'higher', 'lower' or 'same'")


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    base: str  # the preset the cpu and tpu scales start from; the quick scale starts from the "quick" preset
    variants: dict[str, list[str]]  # variant -> --set overrides (only the ablated keys)
    stages: tuple[str, ...]
    metrics: tuple[str, ...]  # "stage/metric" keys of a cell's results, e.g. "dvae/eval/mse"
    claims: tuple[Claim, ...]
    scales: dict[str, list[str]]  # scale -> overrides sizing the base (steps, data) for that machine
    seeds: tuple[int, ...] = (0, 1, 2)
    seed_sections: tuple[str, ...] = SEED_SECTIONS
    plot: tuple[str, ...] = ()  # metrics drawn per variant (default: the claims' metrics)
    evaluation: dict[str, dict] = dataclasses.field(default_factory=dict)  # scale -> runner.EVALUATION overrides
    # seed -> overrides every cell of that seed also gets: a replicate that is more than a seed, e.g. seed k trains
    # and tests on holdout set k, so the interval covers the choice of held-out pairs too.
    seed_overrides: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    # variant -> SampleConfig fields its evaluation samples with (guidance, temperature, ...): variants that differ
    # only here share every trained stage.
    sampling: dict[str, dict] = dataclasses.field(default_factory=dict)
    doc: str = ""

    def __post_init__(self) -> None:
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"experiment {self.name}: seeds {self.seeds} must be distinct")
        if not self.stages or tuple(s for s in STAGES if s in self.stages) != tuple(self.stages):
            raise ConfigError(f"experiment {self.name}: stages {self.stages} must be in the order {STAGES}")
        unknown = set(self.scales) - set(SCALES)
        if unknown or "cpu" not in self.scales or "quick" not in self.scales:
            raise ConfigError(f"experiment {self.name}: scales {sorted(self.scales)} must include 'cpu' and "
                              f"'quick' and come from {SCALES}")
        if set(self.seed_overrides) - set(self.seeds) or set(self.sampling) - set(self.variants):
            raise ConfigError(f"experiment {self.name}: seed_overrides name seeds {sorted(self.seed_overrides)} of "
                              f"{self.seeds} and sampling names variants {sorted(self.sampling)} of "
                              f"{sorted(self.variants)}")
        for variant, fields in self.sampling.items():
            known = {f.name for f in dataclasses.fields(SampleConfig)} - {"prefix_rows"}
            if set(fields) - known:
                raise ConfigError(f"experiment {self.name}: sampling[{variant!r}] sets {sorted(set(fields) - known)}; "
                                  f"SampleConfig fields are {sorted(known)}")
        for section in self.seed_sections:
            if section not in SEED_SECTIONS:
                raise ConfigError(f"experiment {self.name}: seed section {section!r} is not one of {SEED_SECTIONS}")
        for claim in self.claims:
            for variant, metric in (claim.a, claim.b):
                if variant not in self.variants:
                    raise ConfigError(f"experiment {self.name}: claim {claim.text!r} names variant {variant!r}; "
                                      f"variants: {sorted(self.variants)}")
                if metric not in self.metrics:
                    raise ConfigError(f"experiment {self.name}: claim {claim.text!r} names metric {metric!r} "
                                      "that the experiment does not collect")

    def cells(self, seeds: tuple[int, ...] | None = None,
              variants: tuple[str, ...] | None = None) -> list[tuple[str, int]]:
        return [(variant, seed) for variant in self.variants if not variants or variant in variants
                for seed in (seeds or self.seeds)]

    def config(self, variant: str, seed: int, scale: str, extra: list[str] = ()) -> Config:
        """The cell's config: base preset (the quick preset at the quick scale), the scale's sizing, the seed's
        overrides, the variant's keys, the seed (for `seed_sections`)."""
        if scale not in self.scales:
            raise InputError(f"--scale {scale}: experiment {self.name} has scales {sorted(self.scales)}")
        sets = [*self.scales[scale], *self.seed_overrides.get(seed, []), *self.variants[variant], *extra]
        sets += [f"{section}.seed={seed}" for section in self.seed_sections]
        return config_lib.resolve("quick" if scale == "quick" else self.base, sets)

    @property
    def plotted(self) -> tuple[str, ...]:
        return self.plot or tuple(dict.fromkeys(m for c in self.claims for _, m in (c.a, c.b)))


def default_directory() -> Path:
    """experiments/ beside the package (a source checkout), else ./experiments."""
    beside = Path(__file__).resolve().parents[2] / "experiments"
    return beside if beside.is_dir() else Path.cwd() / "experiments"


def available(directory: Path | None = None) -> list[str]:
    directory = directory or default_directory()
    return sorted(p.stem for p in directory.glob("*.py") if not p.name.startswith("_"))


def load(name: str, directory: Path | None = None) -> Experiment:
    """Imports experiments/<name>.py (or a path to a .py file) and returns its EXPERIMENT."""
    directory = directory or default_directory()
    path = Path(name) if name.endswith(".py") else directory / f"{name}.py"
    if not path.is_file():
        names = ", ".join(available(directory)) or "none"
        raise InputError(f"no experiment {name!r} in {directory} (available: {names})")
    module_spec = importlib.util.spec_from_file_location(f"dalle_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    experiment = getattr(module, "EXPERIMENT", None)
    if not isinstance(experiment, Experiment):
        raise InputError(f"{path} defines no EXPERIMENT = Experiment(...)")
    if experiment.name != path.stem:
        raise InputError(f"{path}: EXPERIMENT.name is {experiment.name!r}; name it after the file, {path.stem!r}")
    return dataclasses.replace(experiment, doc=(module.__doc__ or "").strip())
