"""`dalle-jax encode` (images -> token dataset for the prior) and `dalle-jax reconstruct` (look at the dVAE)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dalle_jax import config as config_lib
from dalle_jax import sharding
from dalle_jax.convert.openai_dvae import find_dvae_dir, load_dvae
from dalle_jax.data.pipeline import DatasetError, Pipeline, caption_text, dataset_dir_for, device_batch, open_split
from dalle_jax.data.tokens import TokenSpec, token_builder
from dalle_jax.models.dvae import DVAE

log = logging.getLogger("dalle_jax.encode")
SPLITS = ("train", "validation", "test")


def _replicated_encoder(dvae: DVAE, mesh) -> tuple:
    graphdef, state = nnx.split(dvae)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))

    @jax.jit
    def encode(state, images):  # uint8 (B, H, W, 3) -> int32 (B, h, w)
        return nnx.merge(graphdef, state).encode(images.astype(jnp.float32) / 255.0)

    return state, encode


def _dvae_fingerprint(dvae_dir: Path, use_ema: bool) -> str:
    steps = sorted(int(p.name) for p in (dvae_dir / "checkpoints").iterdir() if p.name.isdigit())
    return json.dumps({"dvae": str(dvae_dir.resolve()), "step": steps[-1] if steps else None, "ema": use_ema})


def encode_dataset(dvae_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path, *, batch_size: int = 64,
                   use_ema: bool = True, mesh_config: config_lib.MeshConfig | None = None,
                   progress: bool = True) -> Path:
    """Encodes every split of `dataset_dir` with the dVAE into a token dataset under `out_dir`.

    Rerunning with the same dVAE checkpoint and data reuses the finished dataset (nothing is re-encoded);
    a newer dVAE checkpoint gives a new dataset directory beside the old one.
    """
    from tqdm.auto import tqdm

    dvae_dir = find_dvae_dir(dvae_dir)
    dataset_dir = Path(dataset_dir)
    dvae = load_dvae(dvae_dir, use_ema=use_ema)
    image_size = int(open_split(dataset_dir, "train")[0]["image"].shape[0])
    spec = TokenSpec(source_dir=str(dataset_dir.resolve()), dvae_fingerprint=_dvae_fingerprint(dvae_dir, use_ema),
                     grid_size=dvae.config.grid_size(image_size), vocab_size=dvae.config.vocab_size)
    builder = token_builder(str(out_dir), spec)
    if (Path(builder.data_dir) / "dataset_info.json").is_file():
        log.info("encode: reusing %s (same dVAE checkpoint and data)", builder.data_dir)
        return Path(builder.data_dir)

    mesh = sharding.make_mesh(mesh_config or config_lib.MeshConfig())
    rules = (mesh_config or config_lib.MeshConfig()).rules
    batch_size = _fit_batch(batch_size, sharding.data_parallel_size(mesh, rules))
    state, encode = _replicated_encoder(dvae, mesh)
    encoded = {}
    for split in SPLITS:
        try:
            source = open_split(dataset_dir, split)
        except DatasetError:
            continue  # e.g. a folder dataset without a test split
        pipeline = Pipeline(source, global_batch=batch_size, train=False,
                            transform=lambda e, rng: {"image": np.asarray(e["image"], np.uint8), "id": e["id"],
                                                      "caption": e["caption"]})
        tokens, captions, ids = [], [], []
        for host_batch in tqdm(pipeline, total=pipeline.num_batches, desc=f"encode {split}", disable=not progress,
                               dynamic_ncols=True):
            batch = device_batch({"image": host_batch["image"]}, mesh, rules)
            with jax.set_mesh(mesh):
                codes = jax.experimental.multihost_utils.process_allgather(encode(state, batch["image"]),
                                                                           tiled=True)
            valid = host_batch["valid"]
            # every host passes its rows; the gathered codes are all hosts' rows in process order
            local = np.asarray(codes).reshape(jax.process_count(), -1, *codes.shape[1:])[jax.process_index()]
            tokens.extend(local[valid].astype(np.uint16))
            captions.extend(caption_text(c) for c in host_batch["caption"][valid])
            ids.extend(int(i) for i in host_batch["id"][valid])
        encoded[split] = {"tokens": tokens, "caption": captions, "id": ids}
        log.info("encode: %s: %d images -> %s tokens", split, len(ids), tokens[0].shape if tokens else "-")
    builder = token_builder(str(out_dir), spec, encoded)
    builder.download_and_prepare()
    return Path(builder.data_dir)


def _fit_batch(batch_size: int, data_parallel: int) -> int:
    return max(data_parallel, batch_size // data_parallel * data_parallel)


def reconstruct_files(dvae_dir: str | Path, paths: list[str], out: str | Path, *, image_size: int | None = None,
                      use_ema: bool = True) -> tuple[Path, list[str]]:
    """Any image files in, a PNG grid of (original | reconstruction) pairs out; returns (grid, problems)."""
    from PIL import Image, UnidentifiedImageError

    from dalle_jax.data.folder import preprocess_image
    from dalle_jax.images import save_grid

    dvae_dir = find_dvae_dir(dvae_dir)
    if image_size is None:
        saved = dvae_dir / "config.json"
        image_size = config_lib.load_config(saved).data.image_size if saved.is_file() else 256
    dvae = load_dvae(dvae_dir, use_ema=use_ema)
    images, names, problems = [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(preprocess_image(img, image_size)[0])
                names.append(Path(path).name)
        except FileNotFoundError:
            problems.append(f"{path}: no such file")
        except (UnidentifiedImageError, OSError, ValueError) as error:
            problems.append(f"{path}: not a readable image ({error})")
    if not images:
        raise ValueError("no readable images:\n  " + "\n  ".join(problems))
    graphdef, state = nnx.split(dvae)

    @jax.jit
    def round_trip(state, batch):
        model = nnx.merge(graphdef, state)
        return model.decode(model.encode(batch.astype(jnp.float32) / 255.0))

    recons = np.asarray(round_trip(state, jnp.asarray(np.stack(images))))
    tiles = [im for pair in zip(images, recons, strict=True) for im in pair]
    labels = [t for name in names for t in (name, "reconstruction")]
    return save_grid(out, tiles, labels, columns=8, scale=max(1, 128 // image_size)), problems


# --------------------------------------------------------------------------------------------------- CLI

def register_cli(subparsers: argparse._SubParsersAction) -> None:
    encode = subparsers.add_parser(
        "encode", help="encode a dataset into dVAE tokens for the prior",
        description="Runs the dVAE encoder (EMA weights by default) over every split of a dataset in sharded "
                    "batches and writes a TFDS token dataset (uint16 token grid + caption + source id). "
                    "Rerunning with the same checkpoint reuses the result.",
        epilog="examples:\n  dalle-jax encode --run runs/demo              (RUN/dvae on the run's dataset -> "
               "RUN/tokens)\n  dalle-jax encode --dvae converted/ --data DATASET_DIR --out tokens/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    encode.add_argument("--run", help="run directory: dVAE from RUN/dvae, data from its config, output RUN/tokens")
    encode.add_argument("--dvae", help="dVAE directory (train-dvae run or converted weights)")
    encode.add_argument("--data", help="dataset version dir (default: the one the dVAE was trained on)")
    encode.add_argument("--out", help="where to write the token dataset (default RUN/tokens)")
    encode.add_argument("--batch-size", type=int, default=64)
    encode.add_argument("--params", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    encode.set_defaults(func=_encode_cli)

    recon = subparsers.add_parser(
        "reconstruct", help="encode + decode image files with a dVAE and draw them side by side",
        description="Preprocesses each image like the datasets (short side resize + centre crop), encodes it to "
                    "tokens and decodes them; writes a grid of (original | reconstruction) pairs.",
        epilog="example: dalle-jax reconstruct --run runs/demo photo1.jpg photo2.png --out recon.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recon.add_argument("images", nargs="+", help="image files")
    recon.add_argument("--run", required=True, help="run directory or dVAE directory")
    recon.add_argument("--out", required=True, help="PNG to write")
    recon.add_argument("--image-size", type=int, help="pixels (default: the dVAE run's data.image_size, or 256)")
    recon.add_argument("--params", choices=("ema", "raw"), default="ema")
    recon.set_defaults(func=_reconstruct_cli)


def _encode_cli(args: argparse.Namespace) -> int:
    if not args.run and not (args.dvae and args.data and args.out):
        raise SystemExit("error: pass --run RUN, or all of --dvae, --data and --out")
    dvae_dir = find_dvae_dir(args.dvae or args.run)
    config = config_lib.load_config(dvae_dir / "config.json") if (dvae_dir / "config.json").is_file() else None
    data = args.data or (dataset_dir_for(config.data, args.run) if config and args.run else None)
    if data is None:
        raise SystemExit(f"error: {dvae_dir} has no training config to find its dataset; pass --data")
    out = args.out or str(Path(args.run) / "tokens")
    path = encode_dataset(dvae_dir, data, out, batch_size=args.batch_size, use_ema=args.params == "ema",
                          mesh_config=config.mesh if config else None)
    print(f"tokens: {path}")
    return 0


def _reconstruct_cli(args: argparse.Namespace) -> int:
    grid, problems = reconstruct_files(args.run, args.images, args.out, image_size=args.image_size,
                                       use_ema=args.params == "ema")
    for problem in problems:
        print(f"skipped {problem}")
    print(f"wrote {grid}")
    return 0 if not problems else 1
