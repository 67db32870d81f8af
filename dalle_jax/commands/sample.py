"""`dalle-jax sample`: captions -> prior samples decoded by the dVAE, reranked by CLIP, written as PNGs."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax

from dalle_jax import config as config_lib
from dalle_jax import sharding
from dalle_jax.errors import ConfigError, ShardingError
from dalle_jax.sampling import rerank
from dalle_jax.sampling.rerank import (
    SampleInputError,
    SampleWriter,
    check_counts,
    load_run,
    prefix_from_image,
    read_image,
    sample_and_rerank,
)
from dalle_jax.sampling.sampler import SampleConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample", help="generate images for captions, reranked by CLIP",
        description=rerank.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  dalle-jax sample --run runs/demo --prompt 'a purple cross above an orange circle'\n"
               "  dalle-jax sample --run runs/demo --prompts-file prompts.txt --num-samples 32 --top 4\n"
               "  dalle-jax sample --run runs/demo --prompt 'a red square' --image-prefix cat.png --prefix-rows 3\n"
               "  dalle-jax sample --run runs/demo --prompt 'a blue circle' --cfg-scale 3 --top-k 64\n"
               "  dalle-jax sample --run runs/demo --prompt 'a blue circle' --concept 'a circle' "
               "--concept 'a blue object'")
    where = parser.add_argument_group("checkpoints")
    where.add_argument("--run", help="run directory holding dvae/, prior/ and clip/ (as `dalle-jax demo` writes)")
    where.add_argument("--dvae", help="dVAE directory (default RUN/dvae)")
    where.add_argument("--prior", help="prior directory (default RUN/prior)")
    where.add_argument("--clip", help="CLIP reranker directory (default RUN/clip)")
    where.add_argument("--no-rerank", action="store_true", help="skip CLIP: keep the first K samples drawn")
    what = parser.add_argument_group("prompts")
    what.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    what.add_argument("--prompts-file", help="a text file with one caption per line")
    what.add_argument("--image-prefix", help="image whose top --prefix-rows token rows are kept and completed")
    what.add_argument("--prefix-rows", type=int, default=0, help="token rows of --image-prefix to keep")
    how = parser.add_argument_group("sampling")
    how.add_argument("--num-samples", type=int, default=16, help="candidates drawn per prompt, N (default 16)")
    how.add_argument("--top", type=int, default=4, help="kept per prompt after reranking, K (default 4)")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--temperature", type=float, default=1.0, help="(default 1.0, the paper's)")
    how.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off, the paper)")
    how.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 = off, the paper)")
    how.add_argument("--cfg-scale", type=float, default=1.0,
                     help="classifier-free guidance s (1 = plain conditional, the paper; needs caption dropout "
                          "in training)")
    how.add_argument("--concept", action="append", default=[],
                     help="a concept caption every prompt is also guided by (repeatable; composable guidance, Liu et "
                          "al. 2022: adds w (c_k - u) to the logits; needs a prior that learnt such captions, e.g. "
                          "--set data.one_concept_captions=0.5, and caption dropout)")
    how.add_argument("--concept-scale", type=float, default=None,
                     help="the weight w of each --concept (default 1.0)")
    how.add_argument("--batch-size", type=int, default=64, help="candidates per sampler call (default 64)")
    how.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="the prior's block weights, compute and KV cache while sampling (default float32; "
                          "bfloat16 halves the bytes each decode step reads, docs/performance.md states its error)")
    how.add_argument("--mesh", help="D,F,T: sample on a (data, fsdp, tensor) mesh of this host's devices, one -1 "
                                    "fills (e.g. -1,1,1 = data-parallel over all); default one device")
    parser.add_argument("--out-dir", required=True, help="directory for the PNGs, samples.jsonl and grid.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_sample)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SampleInputError(f"--prompts-file {path}: no such file")
        try:  # utf-8-sig: a byte-order mark written by some editors is not part of the first prompt
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise SampleInputError(f"--prompts-file {path}: not UTF-8 text (byte {error.start}); save it as "
                                   "UTF-8") from None
        prompts += [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SampleInputError("give at least one --prompt TEXT or --prompts-file FILE")
    return prompts


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sampling_mesh(text: str | None) -> jax.sharding.Mesh | None:
    """`--mesh D,F,T` -> a (data, fsdp, tensor) mesh over this host's devices; None -> None (one device)."""
    if text is None:
        return None
    try:  # parsed and validated as `--set mesh.ici_parallelism=D,F,T` would be
        mesh_config = config_lib.apply_overrides(sharding.MeshConfig(), [f"ici_parallelism={text}"])
    except ConfigError as error:
        raise SampleInputError(f"--mesh {text!r}: give three integers D,F,T (data, fsdp, tensor), e.g. 2,2,2 or "
                               f"-1,1,1 ({error})") from None
    try:
        return sharding.make_mesh(mesh_config)
    except ShardingError:
        n = jax.device_count()
        raise SampleInputError(f"--mesh {text} does not fit this host's {n} devices: D*F*T must be {n}, or put -1 "
                               "in one entry to fill, e.g. --mesh -1,1,1") from None


def _sample(args: argparse.Namespace) -> int:
    prompts = read_prompts(args)
    if args.prefix_rows and not args.image_prefix:
        raise SampleInputError("--prefix-rows needs --image-prefix IMAGE")
    if args.concept_scale is not None and not args.concept:
        raise SampleInputError("--concept-scale needs at least one --concept TEXT")
    concept_scale = (1.0 if args.concept_scale is None else args.concept_scale) if args.concept else 0.0
    cfg = SampleConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, cfg_scale=args.cfg_scale,
                       concept_scale=concept_scale)
    check_counts(args.num_samples, args.top, args.batch_size)
    if not 0 <= args.seed < 2**32:
        raise SampleInputError(f"--seed {args.seed} must be in [0, 2^32)")
    image = read_image(args.image_prefix) if args.image_prefix else None
    mesh = sampling_mesh(args.mesh)  # all of these before loading anything
    writer = SampleWriter(args.out_dir, args.seed)
    run = load_run(args.run, dvae=args.dvae, prior=args.prior, clip=args.clip, rerank=not args.no_rerank,
                   dtype=args.dtype)
    prefix = prefix_from_image(run, image, args.prefix_rows) if image is not None else None
    # A parameter the mesh cannot shard raises ShardingError, printed by the entry point like every input error.
    timings: dict[str, float] = {}
    sample_and_rerank(run, prompts, num_samples=args.num_samples, top=args.top, seed=args.seed, sample_config=cfg,
                      batch_size=args.batch_size, prefix=prefix, mesh=mesh, progress=not args.quiet,
                      on_prompt=writer.add, timings=timings,  # each prompt's files are written as soon as it is done
                      concepts=[args.concept] * len(prompts) if args.concept else None)
    grid = writer.finish()
    print(f"sample: {len(prompts)} prompt(s) x top {args.top} of {args.num_samples} -> {args.out_dir} ({grid.name})")
    split = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    print(f"sample: {split} (first calls include compilation); peak RSS {peak_rss_mib():.0f} MiB")
    return 0
