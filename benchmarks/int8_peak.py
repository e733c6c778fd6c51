"""This machine's int8 multiply-accumulate peak: how far the quantized kernels are from what the CPU can do.

    .venv/bin/python benchmarks/int8_peak.py [--threads 1 2]

Compiles a register-only loop with gcc -march=native (as the kernels are built) and times it: 8 independent
chains of maddubs + madd (the AVX2 form the kernels use: 32 int8 products per maddubs), and where the
machine has VNNI, vpdpbusd (the same 32 products in one instruction). No memory traffic: an upper bound
that a matmul's GMAC/s (kernel_bench.py, decode_profile.py) can be read against.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#define CHAINS 8
static double chain(long iters, int vnni) {
    __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5), one = _mm256_set1_epi16(1), acc[CHAINS];
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_setzero_si256();
    for (long it = 0; it < iters; it++) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
        if (vnni) {
#pragma GCC unroll 8
            for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_dpbusd_epi32(acc[i], a, b);
        } else
#endif
        {
#pragma GCC unroll 8
            for (int i = 0; i < CHAINS; i++)
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), one));
        }
        a = _mm256_add_epi8(a, one);  /* a dependence the compiler cannot hoist */
    }
    __m256i s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm256_add_epi32(s, acc[i]);
    return (double)_mm256_extract_epi32(s, 0);
}
int main(int argc, char **argv) {
    const int threads = atoi(argv[1]), vnni = atoi(argv[2]);
    const long iters = 100000000;
    double sink = 0, t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+:sink)
    sink += chain(iters, vnni);
    const double dt = omp_get_wtime() - t0;
    printf("%.1f %g\n", threads * iters * CHAINS * 32.0 / dt / 1e9, sink);
    return 0;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    from qwen15.quant.native import kernel_isa

    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run(["gcc", "-O2", "-march=native", "-fopenmp", str(src), "-o", str(exe)], check=True)
        flags = subprocess.run(["gcc", "-march=native", "-dM", "-E", "-x", "c", "/dev/null"],
                               capture_output=True, text=True).stdout
        has_vnni = "__AVXVNNI__" in flags or ("__AVX512VNNI__" in flags and "__AVX512VL__" in flags)
        print(f"kernels built for: {kernel_isa()}")
        print("| instruction | threads | peak GMAC/s |\n|---|---|---|")
        for vnni in ([0, 1] if has_vnni else [0]):
            for t in args.threads:
                gmac = subprocess.run([str(exe), str(t), str(vnni)], capture_output=True, text=True, check=True).stdout.split()[0]
                print(f"| {'vpdpbusd' if vnni else 'maddubs + madd'} | {t} | {gmac} |", flush=True)


if __name__ == "__main__":
    main()
