"""Thin wrapper: `python bench/bench_encoder.py ARGS` runs `python -m samhq_fast.benchmark.encoder ARGS`
(every option of the image-encoder benchmark; see --help). `samhq-fast bench` is the front end."""

from samhq_fast.benchmark.encoder import main

if __name__ == "__main__":
    main()
