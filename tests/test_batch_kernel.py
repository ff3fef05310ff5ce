"""pocketlm's batch kernel for llama.cpp (scripts/llama.cpp-patches/batched-matmul.patch: Q4_1 and
Q8_0 weights), compiled from the patch's own lines into a small harness and checked against a
float64 reference of the product ggml_vec_dot_q4_1_q8_1 / ggml_vec_dot_q8_0_q8_0 compute, and
each column computed alone (one sequence's decode) against the same column in a batch, bit for
bit. The served model cannot check this finely: its logprobs move by up to ~0.2 under any change
of float summation order (see test_serve_supervise), as much as a kernel with its min term off by
0.1% moved them; here such a kernel is off by ~100x the bound."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pocketlm.util.machine import cpu_flags

PATCH = Path(__file__).resolve().parents[1] / "scripts" / "llama.cpp-patches" / "batched-matmul.patch"

# ggml's block layouts (ggml-common.h) and the few helpers sgemm.cpp gives the kernel
_SHIM = """
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
#define NOINLINE __attribute__((noinline))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
typedef uint16_t ggml_fp16_t;
struct block_q4_1 { ggml_fp16_t d, m; uint8_t qs[16]; };
struct block_q8_1 { ggml_fp16_t d, s; int8_t qs[32]; };
struct block_q8_0 { ggml_fp16_t d; int8_t qs[32]; };
static inline float unhalf(ggml_fp16_t d) { return _cvtsh_ss(d); }
"""

_MAIN = """
template <typename TA, typename TB>
int run(long m, long n, long k, long nth) {
    std::vector<TA> A(m * k);
    std::vector<TB> B(n * k);
    std::vector<float> C(n * m, -1e30f);
    if (fread(A.data(), sizeof(TA), A.size(), stdin) != A.size() ||
        fread(B.data(), sizeof(TB), B.size(), stdin) != B.size()) return 2;
    auto product = [&](const TB *b, long cols, float *c) {
        std::vector<std::thread> threads;  // llama.cpp runs the kernel on every thread at once
        for (long t = 0; t < nth; ++t)
            threads.emplace_back([&, t] {
                tinyBLAS_cols_AVX<TA, TB> tb(k, A.data(), k, b, k, c, m, (int)t, (int)nth);
                tb.matmul(m, cols);
            });
        for (auto &t : threads) t.join();
    };
    product(B.data(), n, C.data());
    fwrite(C.data(), sizeof(float), C.size(), stdout);
    // then each column alone (a single sequence's decode): the same kernel, rows in the lanes
    std::vector<float> one(m);
    for (long j = 0; j < n; ++j) {
        product(B.data() + j * k, 1, one.data());
        fwrite(one.data(), sizeof(float), one.size(), stdout);
    }
    return 0;
}

int main() {
    long type, m, n, k, nth;
    if (fread(&type, 8, 1, stdin) != 1 || fread(&m, 8, 1, stdin) != 1 || fread(&n, 8, 1, stdin) != 1 ||
        fread(&k, 8, 1, stdin) != 1 || fread(&nth, 8, 1, stdin) != 1) return 2;
    return type == 0 ? run<block_q4_1, block_q8_1>(m, n, k, nth) : run<block_q8_0, block_q8_0>(m, n, k, nth);
}
"""

Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
Q8_1 = np.dtype([("d", "<f2"), ("s", "<f2"), ("qs", "i1", 32)])
Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])


def _kernel_source() -> str:
    """The kernel class as the patch adds it: its added lines from the class's template to its #endif."""
    added = [line[1:] for line in PATCH.read_text().splitlines() if line.startswith("+") and not line.startswith("+++")]
    start = next(i for i, line in enumerate(added) if line.startswith("class tinyBLAS_cols_AVX")) - 1
    end = next(i for i, line in enumerate(added) if i > start and line.startswith("#endif // __AVX2__"))
    return "\n".join(added[start:end])


# The kernel's two paths: 256-bit VNNI dot products with 32 registers where AVX-512 is (what the
# server is built with on our hosts), and AVX2's multiply-adds with 16 registers elsewhere.
VARIANTS = {"avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
            "avx512-vnni": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq",
                             "-mavx512vnni"], {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_vnni"})}


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory) -> dict[str, Path]:
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "setup builds llama-server with a C++ compiler; the kernel's test uses the same"
    flags = cpu_flags()
    assert VARIANTS["avx2"][1] <= flags, "the kernel is built only for AVX2 hosts; this host runs stock llama.cpp"
    out = {}
    folder = tmp_path_factory.mktemp("q4_1")
    (folder / "harness.cpp").write_text(_SHIM + _kernel_source() + _MAIN)
    for name, (cflags, needs) in VARIANTS.items():
        if needs <= flags:
            exe = folder / name
            subprocess.run([compiler, "-O2", "-std=c++17", "-pthread", *cflags, "-o", str(exe),
                            str(folder / "harness.cpp")], check=True)
            out[name] = exe
    return out


def _blocks(kind: str, m: int, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights of `kind` and activations as llama.cpp quantizes them (Q8_1 beside Q4_1, Q8_0 beside
    Q8_0), codes over their whole ranges: Q8_0 weights include -128, which a file may hold."""
    rng = np.random.default_rng(seed)
    if kind == "Q4_1":
        a = np.zeros((m, k), Q4_1)
        a["d"] = rng.uniform(0.001, 0.05, (m, k))
        a["m"] = -a["d"].astype(np.float32) * rng.uniform(0, 8, (m, k))
        a["qs"] = rng.integers(0, 256, (m, k, 16))
        b = np.zeros((n, k), Q8_1)
    else:
        a = np.zeros((m, k), Q8_0)
        a["d"] = rng.uniform(0.001, 0.05, (m, k))
        a["qs"] = rng.integers(-128, 128, (m, k, 32))
        b = np.zeros((n, k), Q8_0)
    b["qs"] = rng.integers(-127, 128, (n, k, 32))
    d = rng.uniform(0.001, 0.1, (n, k)).astype(np.float32)
    b["d"] = d
    if kind == "Q4_1":
        b["s"] = d * b["qs"].astype(np.int32).sum(-1)  # as quantize_row_q8_1 keeps it
    return a, b


def _reference(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, bound): the exact product of the decoded blocks, C[j, i] for column j and row i, and a
    float32 rounding bound from the sum of its terms' magnitudes."""
    if a.dtype == Q4_1:
        q = np.concatenate([a["qs"] & 15, a["qs"] >> 4], -1).astype(np.int64)  # element e, then e+16
    else:
        q = a["qs"].astype(np.int64)
    sums = np.einsum("ikx,jkx->jik", q, b["qs"].astype(np.int64)).astype(np.float64)
    terms = [sums * np.einsum("ik,jk->jik", a["d"].astype(np.float64), b["d"].astype(np.float64))]
    if a.dtype == Q4_1:
        terms.append(np.einsum("ik,jk->jik", a["m"].astype(np.float64), b["s"].astype(np.float64)))
    return sum(terms).sum(-1), sum(np.abs(t) for t in terms).sum(-1)


def _run(exe: Path, a: np.ndarray, b: np.ndarray, nth: int) -> tuple[np.ndarray, np.ndarray]:
    """(the batch's product, each column's product computed alone), both [column, row]."""
    (m, k), n = a.shape, b.shape[0]
    header = np.array([0 if a.dtype == Q4_1 else 1, m, n, k, nth], "<i8")
    out = subprocess.run([str(exe)], input=header.tobytes() + a.tobytes() + b.tobytes(), capture_output=True,
                         check=True).stdout
    both = np.frombuffer(out, np.float32).reshape(2, n, m)
    return both[0], both[1]


# rows and columns that fill the kernel's tiles and that leave remainders in both directions;
# one and several threads splitting the tiles
SHAPES = [(4, 2, 1, 1), (8, 8, 3, 2), (13, 5, 2, 2), (6, 9, 4, 3), (576, 16, 18, 2), (192, 17, 48, 2),
          (16, 40, 5, 3), (1536, 3, 2, 2)]


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
# the AVX2 path everywhere (the harness fixture fails without AVX2), the AVX-512 one where this
# CPU has it, as setup's llama-server build does
@pytest.mark.parametrize("variant", ["avx2"] + [v for v, (_, needs) in VARIANTS.items() if v != "avx2"
                                                and needs <= cpu_flags()])
def test_the_batch_kernel_computes_llama_cpps_product(harnesses, variant, kind):
    for seed, (m, n, k, nth) in enumerate(SHAPES):
        a, b = _blocks(kind, m, n, k, seed)
        c, alone = _run(harnesses[variant], a, b, nth)
        ref, bound = _reference(a, b)
        err = np.abs(c - ref) / bound
        assert np.isfinite(c).all() and err.max() < 1e-5, ((m, n, k, nth), err.max())
        # a token's logits must not depend on the batch it was decoded in: the same bits alone
        assert np.array_equal(alone.view(np.uint32), c.view(np.uint32)), (m, n, k, nth)
