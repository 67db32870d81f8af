"""`dalle-jax demo`: the whole DALL·E pipeline on the built-in shapes data, into one run directory.

Modules: `runner` (the resumable stage runner), `evaluate` (prompt sets, scoring, sample grids), `report`.

Stages, in order (each prints a one-line summary; rerunning skips finished stages and resumes an interrupted
one from its checkpoint):

    data       captioned shapes: train / validation / test, held-out (colour, shape) pairs never in train
    tokenizer  byte-level BPE on the train captions                       -> RUN/tokenizer.json
    dvae       the discrete VAE                                           -> RUN/dvae
    encode     every split -> dVAE tokens                                 -> RUN/tokens
    prior      the sparse transformer on [caption | image tokens]         -> RUN/prior
    clip       the CLIP-style reranker                                    -> RUN/clip
    evaluate   sample + rerank prompt sets, score with the exact shapes scorer, grids, image-to-image
    report     RUN/report.md and RUN/report.json

Afterwards `dalle-jax sample --run RUN --prompt "..."` works on the run directory.
"""
