"""`dalle-jax convert openai-dvae`: import OpenAI's released dVAE without executing its pickles."""

from __future__ import annotations

import argparse

from dalle_jax import runs
from dalle_jax.convert.openai_dvae import ConversionError, convert
from dalle_jax.convert.safe_pickle import UnsafePickleError, UnsupportedCheckpointError
from dalle_jax.models.dvae import DVAEConfig

_EPILOG = """\
The released files are whole pickled torch modules. They are read by an allowlisting unpickler that runs no
code from the file and needs neither torch nor the dall_e package; anything outside plain module/tensor
state is refused. State dicts (.pt/.pth, .npz, .safetensors; names with or without 'blocks.') work too.

writes:
  OUT/dvae_config.json    the architecture, inferred from the tensors' shapes
  OUT/checkpoints/0/      params and ema_params (identical), as the dVAE trainer writes them

example:
  dalle-jax convert openai-dvae --encoder encoder.pkl --decoder decoder.pkl --out runs/openai-dvae
  # then use it wherever a dVAE directory is expected, e.g. dalle_jax.runs.load_dvae("runs/openai-dvae")
"""


def register(stages: argparse._SubParsersAction) -> None:
    convert_group = stages.add_parser("convert", help="import released weights (OpenAI's dVAE)",
                                      description="Import released weights into dalle-jax checkpoints, safely.")
    register_openai_dvae(convert_group.add_subparsers(dest="convert_command", metavar="<source>"))


def register_openai_dvae(subparsers: argparse._SubParsersAction) -> None:
    """Adds `openai-dvae` (convert OpenAI's released dVAE) to the `convert` group's sub-parsers."""
    parser = subparsers.add_parser(
        "openai-dvae", help="import OpenAI's released dVAE (encoder.pkl, decoder.pkl) safely",
        description="Converts OpenAI's released DALL-E dVAE into a dalle-jax dVAE directory, checking every\n"
                    "tensor's name and shape against the architecture inferred from the files.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="encoder.pkl (or an encoder state dict)")
    parser.add_argument("--decoder", required=True, help="decoder.pkl (or a decoder state dict)")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--force", action="store_true", help="replace checkpoints already in --out")
    parser.set_defaults(func=_openai_dvae)


def _openai_dvae(args: argparse.Namespace) -> int:
    try:
        out = convert(args.encoder, args.decoder, args.out, overwrite=args.force)
    except (ConversionError, UnsafePickleError, UnsupportedCheckpointError, FileNotFoundError,
            FileExistsError) as error:
        print(f"error: {error}")
        return 2
    config = runs.read_model_config(out, "dvae", DVAEConfig)
    model_config, checkpoint = out / runs.MODEL_CONFIG["dvae"], out / runs.CHECKPOINTS / "0"
    print(f"converted the dVAE {config}\n  -> {model_config}, {checkpoint}")
    return 0
