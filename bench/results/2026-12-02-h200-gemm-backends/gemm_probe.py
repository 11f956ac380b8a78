"""GEMM probe (device experiment): the training step's GEMM shapes under cuBLAS's default choice,
under cuBLASLt, and under TunableOp; and whether a memory-bound pass on a second stream hides
behind a GEMM. One JSON object a line."""
import json
import sys
import torch

dev = "cuda"
bf = torch.bfloat16


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def shapes():
    out = []
    for model, n, h, q, kv, inter, vocab in (("1b-8x2048", 16384, 2048, 2048, 512, 8192, 128256),
                                            ("8b-2x2048", 4096, 4096, 4096, 1024, 14336, 128256)):
        # (name, M, K, N, layout): layout "nt" = x[M,K] @ W[N,K]^T (forward), "nn" = dy[M,K] @ W[K,N] (dX)
        out += [(model, "qkv_fwd", n, h, q + 2 * kv, "nt"), (model, "o_fwd", n, q, h, "nt"),
                (model, "gu_fwd", n, h, 2 * inter, "nt"), (model, "down_fwd", n, inter, h, "nt"),
                (model, "qkv_dx", n, q + 2 * kv, h, "nn"), (model, "o_dx", n, h, q, "nn"),
                (model, "gu_dx", n, 2 * inter, h, "nn"), (model, "down_dx", n, h, inter, "nn"),
                (model, "lm_fwd_chunk", 2048, h, vocab, "nt"), (model, "lm_dx_chunk", 2048, vocab, h, "nn")]
    return out


def make(M, K, N, layout):
    x = torch.randn(M, K, device=dev, dtype=bf)
    w = torch.randn(N, K, device=dev, dtype=bf) if layout == "nt" else torch.randn(K, N, device=dev, dtype=bf)
    if layout == "nt":
        return lambda: torch.mm(x, w.t())
    return lambda: torch.mm(x, w)


def run(tag):
    for model, name, M, K, N, layout in shapes():
        f = make(M, K, N, layout)
        ms = timed(f)
        print(json.dumps({"probe": "gemm", "mode": tag, "model": model, "gemm": name, "M": M, "K": K, "N": N,
                          "ms": round(ms, 4), "tflops": round(2 * M * K * N / ms / 1e9, 1)}), flush=True)


def overlap():
    s2 = torch.cuda.Stream()
    for M, K, N, elems in ((4096, 4096, 28672, 4096 * 28672), (16384, 2048, 16384, 16384 * 2048), (4096, 14336, 4096, 4096 * 14336)):
        x = torch.randn(M, K, device=dev, dtype=bf)
        w = torch.randn(N, K, device=dev, dtype=bf)
        src = torch.randint(0, 255, (elems // 2,), device=dev, dtype=torch.uint8)
        lut = torch.randn(256, device=dev, dtype=bf)
        dst = torch.empty(elems // 2, device=dev, dtype=bf)
        dst2 = torch.empty(elems // 2, device=dev, dtype=bf)

        def mem():  # proxy of a dequant: read bytes, write 2 bf16 per byte (two half passes)
            torch.index_select(lut, 0, src.to(torch.int32), out=dst)
            torch.index_select(lut, 0, src.to(torch.int32), out=dst2)

        def gemm():
            torch.mm(x, w.t())

        t_g = timed(gemm)
        t_m = timed(mem)

        def both():
            s2.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s2):
                mem()
            gemm()
            torch.cuda.current_stream().wait_stream(s2)

        t_b = timed(both)
        print(json.dumps({"probe": "overlap", "M": M, "K": K, "N": N, "gemm_ms": round(t_g, 4), "mem_ms": round(t_m, 4),
                          "together_ms": round(t_b, 4), "saved_ms": round(t_g + t_m - t_b, 4)}), flush=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "default"
    if what == "default":
        run("cublas")
        overlap()
    elif what == "lt":
        torch.backends.cuda.preferred_blas_library("cublaslt")
        run("cublaslt")
    elif what == "tunable":
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.tuning_enable(True)
        torch.cuda.tunable.set_max_tuning_duration(200)
        torch.cuda.tunable.set_filename("/tmp/tunableop_results.csv")
        run("tunableop")
