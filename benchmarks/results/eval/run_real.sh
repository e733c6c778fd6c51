#!/bin/sh
# The real runs of the closing note (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, this 2-core machine). Resumable:
# run again after a crash and each task continues from its per-sample log.
cd "$(dirname "$0")/../../.."
Q="${PYTHON:-.venv/bin/python} -m qwen15.cli eval run --out benchmarks/results/eval/runs --name Qwen2.5-Coder-0.5B-Instruct-Q4_K_M --threads 2 --no-progress"
$Q --task mmlu --limit 200 --seed 1234 --quant none
$Q --task humaneval
$Q --task gsm8k --limit 200 --seed 1234
