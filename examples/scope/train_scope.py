"""Kept for old launch lines: the entry point is `python -m megatron_scope.train` (same flags, `--help`)."""

from megatron_scope.train import main

if __name__ == "__main__":
    main()
