"""Thin wrapper: `python bench/bench_decoder.py ARGS` runs `python -m samhq_fast.benchmark.decoder ARGS`
(every option of the prompt-decoder benchmark; see --help). `samhq-fast bench` is the front end."""

from samhq_fast.benchmark.decoder import main

if __name__ == "__main__":
    main()
