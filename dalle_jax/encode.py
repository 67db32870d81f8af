"""Images -> the prior's token dataset (`dalle-jax encode`); dVAE round trips of image files (`reconstruct`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dalle_jax import distributed, runs, sharding
from dalle_jax.data.pipeline import Pipeline, caption_text, device_batch, open_split
from dalle_jax.data.tokens import TokenSpec, token_builder
from dalle_jax.errors import DatasetError, InputError
from dalle_jax.models.dvae import DVAE

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


def _replicated_encoder(dvae: DVAE, mesh, posterior_topk: int = 0) -> tuple:
    graphdef, state = nnx.split(dvae)
    replicated = NamedSharding(mesh, PartitionSpec())
    # every host holds the whole model: each builds its copy of the global replicated array from its own data
    # (a device_put across hosts is not supported on every backend)
    state = jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), state)

    @jax.jit
    def encode(state, images):  # uint8 (B, H, W, 3) -> {"tokens": int32 (B, h, w)} (+ the top-k posterior)
        model = nnx.merge(graphdef, state)
        images = images.astype(jnp.float32) / 255.0
        if not posterior_topk:
            return {"tokens": model.encode(images)}
        codes, logits = model.posterior_top_k(images, posterior_topk)
        return {"tokens": codes[..., 0], "posterior_codes": codes, "posterior_logits": logits}

    return state, encode


def _dvae_fingerprint(dvae_dir: Path, use_ema: bool) -> str:
    steps = sorted(int(p.name) for p in (dvae_dir / runs.CHECKPOINTS).iterdir() if p.name.isdigit())
    return json.dumps({"dvae": str(dvae_dir.resolve()), "step": steps[-1] if steps else None, "ema": use_ema})


def encode_dataset(dvae_dir: str | Path, dataset_dir: str | Path, out_dir: str | Path, *, batch_size: int = 64,
                   use_ema: bool = True, mesh_config: sharding.MeshConfig | None = None, posterior_topk: int = 0,
                   progress: bool = True) -> Path:
    """Encodes every split of `dataset_dir` with the dVAE into a token dataset under `out_dir`.

    `posterior_topk` > 0 also keeps the encoder's k most likely codes and their logits per token (for a prior
    trained on sampled tokens or soft targets); 0 writes the argmax tokens only, as the paper trains on.

    Rerunning with the same dVAE checkpoint and data reuses the finished dataset (nothing is re-encoded);
    a newer dVAE checkpoint gives a new dataset directory beside the old one.
    """
    from tqdm.auto import tqdm

    dvae_dir = runs.find_model_dir(dvae_dir, "dvae")
    dataset_dir = Path(dataset_dir)
    dvae = runs.load_dvae(dvae_dir, use_ema=use_ema)
    image_size = int(open_split(dataset_dir, "train")[0]["image"].shape[0])
    spec = TokenSpec(source_dir=str(dataset_dir.resolve()), dvae_fingerprint=_dvae_fingerprint(dvae_dir, use_ema),
                     grid_size=dvae.config.grid_size(image_size), vocab_size=dvae.config.vocab_size,
                     posterior_topk=posterior_topk)
    builder = token_builder(str(out_dir), spec)
    if (Path(builder.data_dir) / "dataset_info.json").is_file():
        log.info("encode: reusing %s (same dVAE checkpoint and data)", builder.data_dir)
        return Path(builder.data_dir)

    mesh = sharding.make_mesh(mesh_config or sharding.MeshConfig())
    rules = (mesh_config or sharding.MeshConfig()).rules
    batch_size = _fit_batch(batch_size, sharding.data_parallel_size(mesh, rules))
    state, encode = _replicated_encoder(dvae, mesh, posterior_topk)
    encoded = {}
    for split in SPLITS:
        try:
            source = open_split(dataset_dir, split)
        except DatasetError:
            continue  # e.g. a folder dataset without a test split
        pipeline = Pipeline(source, global_batch=batch_size, train=False,
                            transform=lambda e, rng: {"image": np.asarray(e["image"], np.uint8), "id": e["id"],
                                                      "caption": e["caption"]})
        fields: dict[str, list] = {"caption": [], "id": []}
        for host_batch in tqdm(pipeline, total=pipeline.num_batches, desc=f"encode {split}",
                               disable=not progress or not distributed.is_main(), dynamic_ncols=True):
            batch = device_batch({"image": host_batch["image"]}, mesh, rules)
            with jax.set_mesh(mesh):
                # every host encodes its rows; the gathered arrays are all hosts' rows in process order, which is
                # the order of the split (Pipeline: global batch k is the split's rows k*B .. k*B + B - 1)
                arrays = jax.experimental.multihost_utils.process_allgather(encode(state, batch["image"]),
                                                                            tiled=True)
            rows = _all_hosts_rows(host_batch)
            if not distributed.is_main():
                continue  # process 0 writes the token dataset
            valid = rows["valid"]
            for name, gathered in arrays.items():
                fields.setdefault(name, []).extend(np.asarray(gathered)[valid])
            fields["caption"].extend(c for c, v in zip(rows["caption"], valid, strict=True) if v)
            fields["id"].extend(int(i) for i in rows["id"][valid])
        encoded[split] = fields
        log.info("encode: %s: %d images -> %s tokens", split, len(fields["id"]),
                 fields["tokens"][0].shape if fields.get("tokens") else "-")
    if distributed.is_main():
        builder = token_builder(str(out_dir), spec, encoded)
        builder.download_and_prepare()
    distributed.barrier("dalle_jax_encode_written")  # no host returns before the dataset exists
    return Path(builder.data_dir)


def _all_hosts_rows(host_batch: dict) -> dict:
    """{"valid", "id", "caption"} of every host's rows of this global batch, in process order (one host: its own).
    Captions travel as UTF-8 bytes padded to the longest on any host."""
    valid, ids = np.asarray(host_batch["valid"]), np.asarray(host_batch["id"], np.int64)
    captions = [caption_text(c) for c in host_batch["caption"]]
    if jax.process_count() == 1:
        return {"valid": valid, "id": ids, "caption": captions}
    from jax.experimental import multihost_utils

    encoded = [c.encode("utf-8") for c in captions]
    longest = int(np.max(multihost_utils.process_allgather(np.int32(max(map(len, encoded), default=0)))))
    padded = np.zeros((len(encoded), max(longest, 1)), np.uint8)
    lengths = np.array([len(b) for b in encoded], np.int32)
    for row, data in enumerate(encoded):
        padded[row, :len(data)] = np.frombuffer(data, np.uint8)
    gathered = {name: np.asarray(multihost_utils.process_allgather(array)).reshape(-1, *array.shape[1:])
                for name, array in (("valid", valid), ("id", ids), ("bytes", padded), ("length", lengths))}
    texts = [bytes(row[:n]).decode("utf-8") for row, n in zip(gathered["bytes"], gathered["length"], strict=True)]
    return {"valid": gathered["valid"], "id": gathered["id"], "caption": texts}


def _fit_batch(batch_size: int, data_parallel: int) -> int:
    return max(data_parallel, batch_size // data_parallel * data_parallel)


def reconstruct_files(dvae_dir: str | Path, paths: list[str], out: str | Path, *, image_size: int | None = None,
                      use_ema: bool = True) -> tuple[Path, list[str]]:
    """Any image files in, a PNG grid of (original | reconstruction) pairs out; returns (grid, problems)."""
    from PIL import Image, UnidentifiedImageError

    from dalle_jax.data.folder import preprocess_image
    from dalle_jax.images import save_grid

    dvae_dir = runs.find_model_dir(dvae_dir, "dvae")
    if image_size is None:
        saved = dvae_dir / runs.CONFIG
        image_size = runs.load_run_config(dvae_dir).data.image_size if saved.is_file() else 256
    dvae = runs.load_dvae(dvae_dir, use_ema=use_ema)
    images, names, problems = [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(preprocess_image(img, image_size)[0])
                names.append(Path(path).name)
        except FileNotFoundError:
            problems.append(f"{path}: no such file")
        except Image.DecompressionBombError as error:
            problems.append(f"{path}: refused, too many pixels ({error})")
        except (UnidentifiedImageError, OSError, ValueError) as error:
            problems.append(f"{path}: not a readable image ({error})")
    if not images:
        raise InputError("no readable images: " + "; ".join(problems))
    graphdef, state = nnx.split(dvae)

    @jax.jit
    def round_trip(state, batch):
        model = nnx.merge(graphdef, state)
        return model.decode(model.encode(batch.astype(jnp.float32) / 255.0))

    recons = np.asarray(round_trip(state, jnp.asarray(np.stack(images))))
    tiles = [im for pair in zip(images, recons, strict=True) for im in pair]
    labels = [t for name in names for t in (name, "reconstruction")]
    return save_grid(out, tiles, labels, columns=8, scale=max(1, 128 // image_size)), problems
