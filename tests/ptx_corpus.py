"""The instrumentation corpus: CUDA kernels of many shapes, each ``(const float* x, T* y, int n)``.

Used twice: on any machine, NVRTC compiles each to PTX for sm_90 and the
rewriter's output must assemble (nvJitLink); on the GPU, each runs with and
without instrumentation on the same input and the outputs must be
bit-identical. Shapes covered: early and multiple returns, PTX ``exit``,
grid-stride loops, static and dynamic shared memory with barriers, integer
atomics (add, max, CAS loops), warp shuffles and votes, templates (through
``name_expressions``), 2-D grids and 3-D blocks, local-memory arrays,
non-inlined device functions, vector loads, scans, sorts, transposes,
constant memory, double-precision math. CuPy's own elementwise and reduction
kernels join the corpus on the GPU (tests/test_instrument_gpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CORPUS", "Kernel", "N"]

N = 1 << 14  #: elements of x (and of y unless ``out_size``)


@dataclass(frozen=True)
class Kernel:
    name: str
    source: str
    entry: str  #: the kernel's name (or a name expression)
    grid: tuple[int, ...] = ((N + 255) // 256,)
    block: tuple[int, ...] = (256,)
    smem: int = 0
    out: str = "float32"
    out_size: int = N
    name_expressions: tuple[str, ...] = ()


def _k(name: str, body: str, **kw: object) -> Kernel:
    src = f'extern "C" __global__ void {name}(const float* x, float* y, int n) {{\n{body}\n}}\n'
    return Kernel(name, src, name, **kw)  # type: ignore[arg-type]


def _ki(name: str, body: str, **kw: object) -> Kernel:
    src = f'extern "C" __global__ void {name}(const float* x, int* y, int n) {{\n{body}\n}}\n'
    return Kernel(name, src, name, out="int32", **kw)  # type: ignore[arg-type]


IDX = "int i = blockIdx.x * blockDim.x + threadIdx.x;"

CORPUS: list[Kernel] = [
    _k("copy", f"{IDX} if (i < n) y[i] = x[i];"),
    _k("axpy", f"{IDX} if (i < n) y[i] = 2.0f * x[i] + 1.0f;"),
    _k("early_return", f"{IDX} if (i >= n) return; y[i] = x[i] * x[i];"),
    _k("grid_stride", "for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)"
       " y[i] = x[i] - 3.0f;", grid=(7,)),
    _k("multi_exit", f"{IDX} if (i >= n) return; float v = x[i];"
       " if (v < 100.0f) {{ y[i] = 0.0f; return; }} if (v > 9000.0f) {{ y[i] = 1.0f; return; }} y[i] = v;"
       .replace("{{", "{").replace("}}", "}")),
    _k("ptx_exit", f"{IDX} if (i >= n) asm volatile(\"exit;\"); y[i] = x[i] + 0.5f;"),
    _k("shared_reverse", "__shared__ float s[256]; " + IDX +
       " s[threadIdx.x] = i < n ? x[i] : 0.0f; __syncthreads();"
       " if (i < n) y[i] = s[blockDim.x - 1 - threadIdx.x];"),
    _k("dynamic_shared_sum", "extern __shared__ float s[]; " + IDX +
       " s[threadIdx.x] = i < n ? x[i] : 0.0f; __syncthreads();"
       " for (int k = blockDim.x / 2; k > 0; k >>= 1) { if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];"
       " __syncthreads(); } if (threadIdx.x == 0) y[blockIdx.x] = s[0];", smem=256 * 4),
    _ki("atomic_histogram", f"{IDX} if (i < n) atomicAdd(&y[((int)x[i]) & 63], 1);", out_size=64),
    _ki("atomic_max", f"{IDX} if (i < n) atomicMax(&y[i & 7], (int)(x[i] * 3.0f) % 1000);", out_size=8),
    _ki("warp_shuffle_sum", f"{IDX} int v = i < n ? (int)x[i] : 0;"
        " for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);"
        " if ((threadIdx.x & 31) == 0) atomicAdd(&y[0], v);", out_size=1),
    _ki("ballot_popc", f"{IDX} unsigned b = __ballot_sync(0xffffffffu, i < n && ((int)x[i] & 1));"
        " if ((threadIdx.x & 31) == 0 && i < n) y[i >> 5] = __popc(b);", out_size=N // 32),
    _ki("cas_increment", f"{IDX} if (i >= n) return; int* p = &y[i & 15]; int old = *p, seen;"
        " do {{ seen = old; old = atomicCAS(p, seen, seen + 1); }} while (old != seen);"
        .replace("{{", "{").replace("}}", "}"), out_size=16),
    _k("grid_2d", "int r = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;"
       " if (c < 128 && r < n / 128) y[r * 128 + c] = x[r * 128 + c] * (float)r;",
       grid=(1, N // 128), block=(128,)),
    _k("block_3d", "int t = threadIdx.z * 64 + threadIdx.y * 8 + threadIdx.x; int i = blockIdx.x * 512 + t;"
       " if (i < n) y[i] = x[i] + (float)(threadIdx.z - threadIdx.y);", grid=(N // 512,), block=(8, 8, 8)),
    _k("polynomial", f"{IDX} if (i < n) {{ float v = x[i] * 1e-3f, acc = 0.0f;"
       "\n#pragma unroll\n for (int k = 0; k < 8; k++) acc = acc * v + (float)(k + 1); y[i] = acc; }}"
       .replace("{{", "{").replace("}}", "}")),
    _k("double_math", f"{IDX} if (i < n) y[i] = (float)(sin((double)x[i]) * exp(-(double)x[i] * 1e-4));"),
    Kernel("noinline_call",
           "__device__ __noinline__ float twist(float v, int k) { return k & 1 ? v * 0.5f : -v; }\n"
           'extern "C" __global__ void noinline_call(const float* x, float* y, int n) {'
           f" {IDX} if (i < n) y[i] = twist(x[i], i); }}\n", "noinline_call"),
    _k("local_array", f"{IDX} if (i >= n) return; float a[16];"
       " for (int k = 0; k < 16; k++) a[k] = x[(i + k) % n]; y[i] = a[(int)x[i] & 15];"),
    _k("vector_load", "int i = blockIdx.x * blockDim.x + threadIdx.x; if (4 * i + 3 < n) {"
       " float4 v = reinterpret_cast<const float4*>(x)[i];"
       " reinterpret_cast<float4*>(y)[i] = make_float4(v.w, v.z, v.y, v.x); }", grid=(N // 4 // 256,)),
    _k("stencil_halo", "__shared__ float s[258]; " + IDX +
       " int t = threadIdx.x + 1; s[t] = i < n ? x[i] : 0.0f;"
       " if (threadIdx.x == 0) s[0] = i > 0 ? x[i - 1] : 0.0f;"
       " if (threadIdx.x == blockDim.x - 1) s[t + 1] = i + 1 < n ? x[i + 1] : 0.0f; __syncthreads();"
       " if (i < n) y[i] = 0.25f * s[t - 1] + 0.5f * s[t] + 0.25f * s[t + 1];"),
    _k("transpose_tile", "__shared__ float tile[32][33]; int bx = blockIdx.x * 32, by = blockIdx.y * 32;"
       " tile[threadIdx.y][threadIdx.x] = x[(by + threadIdx.y) * 128 + bx + threadIdx.x]; __syncthreads();"
       " y[(bx + threadIdx.y) * 128 + by + threadIdx.x] = tile[threadIdx.x][threadIdx.y];",
       grid=(4, 4), block=(32, 32), out_size=N),
    _k("block_scan", "__shared__ float s[256]; " + IDX +
       " s[threadIdx.x] = i < n ? x[i] : 0.0f; __syncthreads();"
       " for (int o = 1; o < 256; o <<= 1) { float v = threadIdx.x >= o ? s[threadIdx.x - o] : 0.0f;"
       " __syncthreads(); s[threadIdx.x] += v; __syncthreads(); } if (i < n) y[i] = s[threadIdx.x];"),
    _k("bitonic_sort", "__shared__ float s[256]; " + IDX +
       " s[threadIdx.x] = i < n ? x[(i * 7919) % n] : 0.0f; __syncthreads();"
       " for (int k = 2; k <= 256; k <<= 1) for (int j = k >> 1; j > 0; j >>= 1) {"
       " int t = threadIdx.x, p = t ^ j; if (p > t) { bool up = (t & k) == 0; float a = s[t], b = s[p];"
       " if ((a > b) == up) { s[t] = b; s[p] = a; } } __syncthreads(); } if (i < n) y[i] = s[threadIdx.x];"),
    Kernel("constant_memory",
           "__constant__ float coeff[4] = {1.5f, -2.0f, 0.25f, 3.0f};\n"
           'extern "C" __global__ void constant_memory(const float* x, float* y, int n) {'
           f" {IDX} if (i < n) y[i] = coeff[i & 3] * x[(i + 3) % n] + coeff[(i + 1) & 3]; }}\n",
           "constant_memory"),
    _k("matvec", "int r = blockIdx.x * blockDim.x + threadIdx.x; if (r >= n / 64) return; float acc = 0.0f;"
       " for (int c = 0; c < 64; c++) acc += x[r * 64 + c] * (float)((c * 13) % 7); y[r] = acc;",
       grid=(1,), block=(N // 64,), out_size=N // 64),
    _k("switch_branches", f"{IDX} if (i >= n) return; switch (i % 5) {{ case 0: y[i] = x[i]; break;"
       " case 1: y[i] = -x[i]; return; case 2: y[i] = x[i] * 2.0f; break; case 3: return;"
       " default: y[i] = 7.0f; }} if (i % 3 == 0) y[i] += 1.0f;".replace("{{", "{").replace("}}", "}")),
    _k("restrict_ldg", "int i = blockIdx.x * blockDim.x + threadIdx.x; const float* __restrict__ xr = x;"
       " if (i < n) y[i] = __ldg(&xr[i]) * 0.125f;"),
    _ki("shared_atomic_hist", "__shared__ int h[32]; if (threadIdx.x < 32) h[threadIdx.x] = 0; __syncthreads();"
        f" {IDX} if (i < n) atomicAdd(&h[((int)x[i]) & 31], 1); __syncthreads();"
        " if (threadIdx.x < 32) atomicAdd(&y[threadIdx.x], h[threadIdx.x]);", out_size=32),
    Kernel("template_scale_float",
           "template <typename T> __global__ void scale(const float* x, T* y, int n) {"
           f" {IDX} if (i < n) y[i] = (T)(x[i] * 3.0f); }}\n"
           "template __global__ void scale<float>(const float*, float*, int);\n"
           "template __global__ void scale<int>(const float*, int*, int);\n",
           "scale<float>", name_expressions=("scale<float>", "scale<int>")),
    Kernel("template_scale_int",
           "template <typename T> __global__ void scale(const float* x, T* y, int n) {"
           f" {IDX} if (i < n) y[i] = (T)(x[i] * 3.0f); }}\n"
           "template __global__ void scale<float>(const float*, float*, int);\n"
           "template __global__ void scale<int>(const float*, int*, int);\n",
           "scale<int>", out="int32", name_expressions=("scale<float>", "scale<int>")),
    _k("predicated_tail", "int i = blockIdx.x * blockDim.x + threadIdx.x; bool ok = i < n && x[i] > 10.0f;"
       " if (!ok) { if (i < n) y[i] = -1.0f; return; } y[i] = sqrtf(x[i]);"),
]
