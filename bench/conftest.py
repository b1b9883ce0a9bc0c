"""bench/ pytest-benchmark suite: `pytest bench/ --benchmark-only` (not collected by `python -m pytest`,
whose testpaths is tests/). On a GPU: real sizes (vit_b, vit_h). On the CPU: the tiny config
(samhq_fast.benchmark.common.SMOKE_CONFIG), NOT speed figures. Fused on the CPU only when the
caller sets TRITON_INTERPRET=1 (the Triton interpreter: very slow, checks it runs); otherwise the
fused cases are skipped. This conftest deliberately does not set it."""
