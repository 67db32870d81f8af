"""Do a product-code dVAE's two tables split along colour and shape? (dvae.factor_codes, issue 17)

    python experiments/analysis/code_tables.py DVAE_DIR OUT

Renders every pair of single objects that share a size and a place but differ in colour and in shape (X, Y), encodes
both, and decodes two hybrids: X's first-table entries with Y's second-table entries, and the reverse. If the first
table holds colour and the second shape, hybrid (X first, Y second) is X's colour in Y's shape. Prints, by the exact
shapes scorer, how often each hybrid shows each combination (colour of X or Y, shape of X or Y), writes the counts
to OUT/code_tables.json and a grid OUT/code_tables.png: X | Y | X first + Y second | Y first + X second.
"""

import argparse
import collections
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from dalle_jax import runs
from dalle_jax.data.scorer import score
from dalle_jax.data.shapes import lattice_objects, render_objects, with_article
from dalle_jax.images import save_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dvae", help="a trained dVAE stage directory (RUN/dvae) with dvae.factor_codes > 0")
    parser.add_argument("out", help="where code_tables.json and code_tables.png go")
    parser.add_argument("--pairs", type=int, default=512, help="(X, Y) pairs to test, drawn at random (seed 0)")
    args = parser.parse_args()
    dvae = runs.load_dvae(args.dvae)
    config = runs.load_run_config(Path(args.dvae))
    if not dvae.config.factor_codes:
        raise SystemExit(f"{args.dvae}: this dVAE has one code table (dvae.factor_codes=0); nothing to split")
    second = dvae.config.tables[1]
    objects = lattice_objects(config.data.image_size, config.data.grid)
    by_place = collections.defaultdict(list)
    for obj in objects:
        by_place[(obj["size"], tuple(obj["box"]))].append(obj)
    candidates = [(x, y) for group in by_place.values() for x in group for y in group
                  if x["color"] != y["color"] and x["shape"] != y["shape"]]
    rng = np.random.default_rng(0)
    pairs = [candidates[i] for i in rng.choice(len(candidates), min(args.pairs, len(candidates)), replace=False)]
    size = config.data.image_size
    xs = np.stack([render_objects([x], size) for x, _ in pairs])
    ys = np.stack([render_objects([y], size) for _, y in pairs])
    tx = np.asarray(dvae.encode(jnp.asarray(xs, jnp.float32) / 255.0))
    ty = np.asarray(dvae.encode(jnp.asarray(ys, jnp.float32) / 255.0))
    hybrids = {"x_first_y_second": (tx // second) * second + ty % second,
               "y_first_x_second": (ty // second) * second + tx % second}
    decoded = {name: np.clip(np.round(np.asarray(dvae.decode(jnp.asarray(t))) * 255), 0, 255).astype(np.uint8)
               for name, t in hybrids.items()}
    counts: dict[str, dict[str, float]] = {}
    for name, images in decoded.items():
        tally = collections.Counter()
        for (x, y), image in zip(pairs, images, strict=True):
            for colour_of, shape_of in (("x", "x"), ("x", "y"), ("y", "x"), ("y", "y")):
                colour = (x if colour_of == "x" else y)["color"]
                shape = (x if shape_of == "x" else y)["shape"]
                tally[f"colour_{colour_of}_shape_{shape_of}"] += score(image, with_article(f"{colour} {shape}"))[
                    "color_shape"]
        counts[name] = {key: value / len(pairs) for key, value in sorted(tally.items())}
        print(name, {key: round(value, 3) for key, value in counts[name].items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "code_tables.json").write_text(json.dumps({"dvae": str(args.dvae), "pairs": len(pairs), **counts},
                                                     indent=1))
    rows = [im for i in range(min(16, len(pairs))) for im in
            (xs[i], ys[i], decoded["x_first_y_second"][i], decoded["y_first_x_second"][i])]
    labels = [label for x, y in pairs[:16] for label in (f"X {x['color']} {x['shape']}", f"Y {y['color']} {y['shape']}",
                                                           "X first, Y second", "Y first, X second")]
    save_grid(out / "code_tables.png", rows, labels, columns=8)
    print(f"wrote {out / 'code_tables.json'} and {out / 'code_tables.png'}")


if __name__ == "__main__":
    main()
