"""Benchmarks of lightning-diloco: scripts that measure and print tables (see ``benchmarks/README.md``).

Run them as modules from the repository root, for example ``python -m benchmarks.bytes``. The processes they start
run modules of this package too (``python -m benchmarks._train_gpt``), from the repository root.
"""
