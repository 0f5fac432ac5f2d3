#!/usr/bin/env python
"""End-to-end latency benchmark (also `flora bench latency`).

    python bench/latency.py                       # CPU: small 1024-wide shape, fp32, b1, p512, 128 tokens
    python bench/latency.py --model 1b --dtype bf16 --batch 1 8 --long   # GPU: 1B shape, eager + CUDA graphs
    python bench/latency.py --quick --model tiny  # smoke run

The implementation lives in flora/bench/latency.py; `--help` lists every option.
"""
import sys

from flora.bench.latency import main

if __name__ == "__main__":
    sys.exit(main())
