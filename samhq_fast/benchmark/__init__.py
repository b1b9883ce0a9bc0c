"""Benchmarks of the image encoder (`encoder`) and the prompt decoder (`decoder`), their shared
helpers (`common`) and the merged-results report: Markdown table and bar chart (`report`).

User-facing front end: `samhq-fast bench` (samhq_fast/cli.py). Every option of one benchmark:
`python -m samhq_fast.benchmark.encoder --help` / `python -m samhq_fast.benchmark.decoder --help`.
"""
