"""`dalle-jax serve`: a web page (Gradio) over a run: caption in, reranked images out."""

from __future__ import annotations

import argparse

from dalle_jax.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from dalle_jax import serve

    parser = subparsers.add_parser(
        "serve", help="a web page over a run: caption in, reranked images out (Gradio)",
        description=serve.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  dalle-jax serve --run runs/demo                      # http://127.0.0.1:7860\n"
               "  dalle-jax serve --run runs/demo --host 0.0.0.0 --port 8080   # reachable from other machines\n"
               "from a script (pip install gradio_client):\n"
               "  from gradio_client import Client\n"
               "  Client('http://127.0.0.1:7860/').predict('a red circle', 16, 4, 0, 1.0, 0, 1.0, 1.0, None, 4,\n"
               "                                           api_name='/generate')   # -> (gallery, status)\n"
               "needs the serve extra: pip install -e '.[serve]'")
    parser.add_argument("--run", required=True, help="run directory holding dvae/, prior/ and clip/")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--batch-size", type=int, default=64, help="candidates per sampler call (default 64)")
    parser.add_argument("--max-batch-prompts", type=int, default=8,
                        help="at most this many concurrent requests share one sampler call (default 8)")
    parser.add_argument("--no-rerank", action="store_true", help="skip CLIP: show the first samples drawn")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the prior's block weights, compute and KV cache (default float32; see `sample --help`)")
    parser.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise InputError("dalle-jax serve needs Gradio: pip install -e '.[serve]'") from None
    from dalle_jax.serve import serve

    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} must be in 1..65535")
    if args.max_batch_prompts < 1:
        raise InputError(f"--max-batch-prompts {args.max_batch_prompts} must be at least 1")
    serve(args.run, host=args.host, port=args.port, batch_size=args.batch_size, max_prompts=args.max_batch_prompts,
          rerank=not args.no_rerank, dtype=args.dtype)
    return 0
