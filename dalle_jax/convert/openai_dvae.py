"""Imports OpenAI's released dVAE (`encoder.pkl`, `decoder.pkl`) into dalle-jax, safely.

The released files are whole torch modules (`torch.save(module)`), read here by `safe_pickle` without
running code from them and without torch. State dicts are accepted too: torch files (`.pt`/`.pth`, read by
the same safe reader, with `torch.load(weights_only=True)` as a fallback when torch is installed), `.npz` and
`.safetensors`. Names may carry the released `blocks.` prefix or not.

Released name (G, I, J 1-based, weights OIHW)       ours (0-based, weights HWIO)
  blocks.input.{w,b}                                 input.{w,b}
  blocks.group_G.block_I.id_path.{w,b}               groups[G-1].blocks[I-1].id_path.{w,b}
  blocks.group_G.block_I.res_path.conv_J.{w,b}       groups[G-1].blocks[I-1].res_path[J-1].{w,b}
  blocks.output.conv.{w,b}                           output.{w,b}

`convert` writes `OUT/dvae_config.json` and `OUT/checkpoints/0` with `{"params", "ema_params"}` (identical),
the layout the dVAE trainer writes, so `dalle_jax.runs.load_dvae` reads either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle_jax import runs
from dalle_jax.convert.safe_pickle import (
    UnsafePickleError,
    UnsupportedCheckpointError,
    ZipBombError,
    is_torch_file,
    read_torch_file,
)
from dalle_jax.errors import DalleJaxError
from dalle_jax.models.dvae import DVAE, DVAEConfig, abstract_params, dvae_from_params

PREFIX = "blocks."
PARTS = ("encoder", "decoder")


class ConversionError(DalleJaxError, ValueError):
    """The weights do not fit the released architecture; the message names the tensors."""


# ----------------------------------------------------------------------------------------- reading files


def read_state_dict(path: str | Path) -> tuple[dict[str, np.ndarray], str | None]:
    """Reads a weights file -> ({name: array}, root module class or None); nothing in the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}, None
        except ValueError as error:  # e.g. an object array, which only pickle could read
            raise ConversionError(f"{path}: not a plain .npz of numeric arrays ({error})") from None
    if suffix == ".safetensors":
        return read_safetensors(path), None
    if not is_torch_file(path):
        raise UnsupportedCheckpointError(f"{path}: not a torch, .npz or .safetensors file")
    try:
        torch_file = read_torch_file(path)
    except (UnsafePickleError, UnsupportedCheckpointError) as error:
        # torch's own weights-only loader knows more tensor encodings (newer rebuild functions, dtypes) than
        # ours and also runs no code; a file naming anything outside torch is not handed on.
        torch_only = (isinstance(error, UnsupportedCheckpointError) and not isinstance(error, ZipBombError)) or (
            isinstance(error, UnsafePickleError) and (error.global_name or "").startswith("torch."))
        if suffix in (".pt", ".pth") and torch_only and _torch_available():
            try:
                return _read_with_torch(path), None
            except Exception:
                raise error from None
        raise
    return torch_file.tensors, torch_file.root_class


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _read_with_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as error:
        raise ImportError(f"{path}: reading this file needs torch (pip install torch)") from error
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsupportedCheckpointError(f"{path}: expected a state dict of tensors")
    return {str(k): (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy() for k, v in state.items()}


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


def _safetensors_dtype(code: str) -> np.dtype:
    if code == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if code not in _SAFETENSORS_DTYPES:
        raise UnsupportedCheckpointError(f"safetensors dtype {code} is not supported")
    return np.dtype(_SAFETENSORS_DTYPES[code])


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a .safetensors file: u64 LE header length, JSON header {name: {dtype, shape, data_offsets}}, bytes."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise UnsupportedCheckpointError(f"{path}: too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise UnsupportedCheckpointError(f"{path}: header length {header_len} exceeds the file")
    header = json.loads(data[8:8 + header_len])
    body = memoryview(data)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _safetensors_dtype(info["dtype"])
        shape = tuple(int(n) for n in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
        if not 0 <= begin <= end <= len(body) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise UnsupportedCheckpointError(f"{path}: tensor {name} {shape} {info['dtype']} has bad data_offsets "
                                             f"[{begin}, {end}] (body is {len(body)} bytes)")
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
    return tensors


def save_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """Writes `tensors` as .safetensors (no dependency); the inverse of `read_safetensors`."""
    codes = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        code = "BF16" if array.dtype.name == "bfloat16" else codes.get(array.dtype.newbyteorder("<"))
        if code is None:
            raise ValueError(f"{name}: dtype {array.dtype} has no safetensors code")
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format allows trailing spaces; aligns the body
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for raw in chunks:
            f.write(raw)
    return path


# ----------------------------------------------------------------------------------------- names, shapes


def strip_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops the released `blocks.` prefix where present."""
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        short = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if short in out:
            raise ConversionError(f"tensor '{short}' appears both with and without the '{PREFIX}' prefix")
        out[short] = value
    return out


def released_name(path: tuple[Any, ...]) -> str:
    """Our parameter path inside an Encoder/Decoder -> the released name without `blocks.`."""
    match path:
        case ("input", leaf):
            return f"input.{leaf}"
        case ("output", leaf):
            return f"output.conv.{leaf}"
        case ("groups", int(g), "blocks", int(i), "id_path", leaf):
            return f"group_{g + 1}.block_{i + 1}.id_path.{leaf}"
        case ("groups", int(g), "blocks", int(i), "res_path", int(j), leaf):
            return f"group_{g + 1}.block_{i + 1}.res_path.conv_{j + 1}.{leaf}"
    raise ConversionError(f"no released name for parameter {path}: the dVAE grew a parameter this importer "
                          f"does not know")


def _released_shape(our_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (our_shape[3], our_shape[2], our_shape[0], our_shape[1]) if len(our_shape) == 4 else our_shape


def _count(names: list[str], pattern: str, part: str) -> int:
    """How many consecutive 1-based indices `pattern` (one group) finds; they must be 1..n."""
    found = sorted({int(m.group(1)) for n in names if (m := re.match(pattern, n))})
    if not found or found != list(range(1, len(found) + 1)):
        raise ConversionError(f"{part}: expected tensors named like '{PREFIX}{pattern}' numbered 1..n, found "
                              f"indices {found}")
    return len(found)


def _require(tensors: Mapping[str, np.ndarray], name: str, ndim: int, part: str) -> tuple[int, ...]:
    if name not in tensors:
        raise ConversionError(f"{part} weights lack '{PREFIX}{name}' (have {len(tensors)} tensors, e.g. "
                              f"{sorted(tensors)[:3]})")
    shape = tuple(tensors[name].shape)
    if len(shape) != ndim:
        raise ConversionError(f"{part}: '{PREFIX}{name}' has shape {shape}, expected {ndim} dimensions")
    return shape


def infer_config(encoder: Mapping[str, np.ndarray], decoder: Mapping[str, np.ndarray]) -> DVAEConfig:
    """Reads vocab_size, n_hid, n_init, group_count, blocks_per_group off the tensors; checks both files agree.

    Args take names without the `blocks.` prefix (see `strip_prefix`).
    """
    enc_in, enc_out = _require(encoder, "input.w", 4, "encoder"), _require(encoder, "output.conv.w", 4, "encoder")
    dec_in, dec_out = _require(decoder, "input.w", 4, "decoder"), _require(decoder, "output.conv.w", 4, "decoder")
    if enc_in[2] == 1 and dec_in[2] == 7:
        raise ConversionError("the encoder file holds a decoder and vice versa (input conv kernels 1x1 vs 7x7): "
                              "swap --encoder and --decoder")
    parts = {"encoder": list(encoder), "decoder": list(decoder)}
    groups = {part: _count(names, r"group_(\d+)\.", part) for part, names in parts.items()}
    blocks = {part: _count(names, r"group_1\.block_(\d+)\.", part) for part, names in parts.items()}
    # n_hid: width of the encoder's first group = width of the decoder's last group.
    pairs = {"vocab_size": (enc_out[0], dec_in[1]), "n_hid": (enc_in[0], dec_out[1]),
             "group_count": (groups["encoder"], groups["decoder"]),
             "blocks_per_group": (blocks["encoder"], blocks["decoder"])}
    for field, (from_encoder, from_decoder) in pairs.items():
        if from_encoder != from_decoder:
            raise ConversionError(f"encoder and decoder disagree on {field}: {from_encoder} vs {from_decoder} "
                                  f"(are they from the same release?)")
    if dec_out[0] != 2 * enc_in[1]:
        raise ConversionError(f"decoder output conv has {dec_out[0]} channels; expected 2 x {enc_in[1]} image "
                              f"channels (logit-Laplace mu and ln b)")
    try:
        return DVAEConfig(vocab_size=enc_out[0], n_hid=enc_in[0], n_init=dec_in[0], group_count=groups["encoder"],
                          blocks_per_group=blocks["encoder"], input_channels=enc_in[1], pooling="max",
                          compute_dtype="float32")
    except ValueError as error:
        raise ConversionError(f"the tensors describe an unsupported dVAE: {error}") from error


def _param_paths(config: DVAEConfig, part: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """{path inside the encoder/decoder: shape} of our model's parameters."""
    pure = abstract_params(config)[1][part]
    return {tuple(_key(k) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _key(entry: Any) -> Any:
    return getattr(entry, "key", getattr(entry, "idx", entry))


def to_params(config: DVAEConfig, encoder: Mapping[str, np.ndarray],
              decoder: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Released tensors (no prefix, OIHW) -> our pure param dict (HWIO), checking every name and shape.

    Raises ConversionError listing each missing, unexpected or mis-shaped tensor with the expected shape.
    """
    params: dict[str, Any] = {}
    problems: list[str] = []
    for part, tensors in (("encoder", encoder), ("decoder", decoder)):
        used = set()
        tree: dict[Any, Any] = {}
        for path, shape in _param_paths(config, part).items():
            name = released_name(path)
            expected = _released_shape(shape)
            if name not in tensors:
                problems.append(f"{part}: missing '{PREFIX}{name}' (expected shape {expected})")
                continue
            used.add(name)
            value = np.asarray(tensors[name])
            if tuple(value.shape) != expected:
                problems.append(f"{part}: '{PREFIX}{name}' has shape {tuple(value.shape)}, expected {expected}")
                continue
            if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
                problems.append(f"{part}: '{PREFIX}{name}' has dtype {value.dtype}, expected floating point")
                continue
            value = value.astype(np.float32)
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
        problems += [f"{part}: unexpected tensor '{PREFIX}{name}' {tuple(np.shape(tensors[name]))}"
                     for name in sorted(set(tensors) - used)]
        params[part] = tree
    if problems:
        shown = "\n  ".join(problems[:30]) + (f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else "")
        raise ConversionError(f"the weights do not match the dVAE {config}:\n  {shown}")
    return params


def to_released(params: Mapping[str, Any], *, prefix: str = PREFIX) -> dict[str, dict[str, np.ndarray]]:
    """Our pure param dict -> {"encoder": {released name: OIHW array}, "decoder": {...}} (inverse of to_params)."""
    out = {}
    for part in PARTS:
        flat = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(params[part])[0]:
            value = np.asarray(leaf)
            flat[prefix + released_name(tuple(_key(k) for k in path))] = (
                value.transpose(3, 2, 0, 1) if value.ndim == 4 else value)  # HWIO -> OIHW
        out[part] = flat
    return out


# ----------------------------------------------------------------------------------------- import / export


def read_released(encoder_path: str | Path, decoder_path: str | Path) -> tuple[DVAEConfig, dict[str, Any]]:
    """Reads and checks both files -> (inferred config, our pure param dict)."""
    loaded = {}
    for part, path in (("encoder", encoder_path), ("decoder", decoder_path)):
        tensors, root_class = read_state_dict(path)
        other = PARTS[1 - PARTS.index(part)]
        if root_class is not None and root_class.startswith(f"dall_e.{other}."):
            raise ConversionError(f"{path} holds a {root_class}, but was given as the {part}: swap the files")
        loaded[part] = strip_prefix(tensors)
    config = infer_config(loaded["encoder"], loaded["decoder"])
    return config, to_params(config, loaded["encoder"], loaded["decoder"])


def load_released(encoder_path: str | Path, decoder_path: str | Path) -> DVAE:
    """OpenAI's encoder/decoder files (or state dicts of them) -> our DVAE, with the config they describe."""
    config, params = read_released(encoder_path, decoder_path)
    return dvae_from_params(config, params)


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(encoder_path: str | Path, decoder_path: str | Path, out_dir: str | Path, *,
            overwrite: bool = False) -> Path:
    """Converts the released dVAE into `out_dir` (dvae_config.json + checkpoints/0); returns `out_dir`.

    Raises FileExistsError if `out_dir` already holds checkpoints, unless `overwrite`.
    """
    from dalle_jax.train.checkpoint import Checkpointer  # orbax is only needed here

    out = Path(out_dir)
    checkpoints = out / runs.CHECKPOINTS
    if checkpoints.exists() and any(checkpoints.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{checkpoints} already holds checkpoints; choose another --out or pass --force")
        shutil.rmtree(checkpoints)
    config, params = read_released(encoder_path, decoder_path)
    params = jax.tree.map(jnp.asarray, params)
    out.mkdir(parents=True, exist_ok=True)
    (out / runs.MODEL_CONFIG["dvae"]).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    meta = {"source": "openai-dvae"}
    for part, path in (("encoder", encoder_path), ("decoder", decoder_path)):
        meta.update({f"{part}_file": str(Path(path).resolve()), f"{part}_sha256": _sha256(path)})
    checkpointer = Checkpointer(checkpoints, save_every=1, keep=1)
    try:
        checkpointer.save(0, {"params": params, "ema_params": params}, meta=meta, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return out
