#!/bin/sh
# Needle-in-a-haystack heatmap for the closing note (resumable like run_real.sh).
cd "$(dirname "$0")/../../.."
${PYTHON:-.venv/bin/python} -m qwen15.cli eval run --out benchmarks/results/eval/runs --name Qwen2.5-Coder-0.5B-Instruct-Q4_K_M \
  --threads 2 --no-progress --task needle --lengths 1024,2048,4096,8192 --depths 0,50,100 --quant none
