// Concordia device-side definitions shared by the executor and its handlers:
// the layouts (layout.cuh), then device helpers (grid barrier, checksums,
// record headers).
#pragma once

#include "layout.cuh"

// ---- Grid-wide barrier (all blocks co-resident: cooperative launch) ---------
struct CncGrid {
    unsigned int arrived;
    volatile unsigned int generation;
    u64 action;            // 0 run, 1 park
    u64 task[16];          // the current task, copied once from host memory by block 0
    u64 acc[CNC_MAX_RECORDS_PER_TASK];  // per-record checksum partial sums (zero between tasks)
    u64 fence_yield;       // 1: the current task's fence wait yielded, every block parks
};

__device__ __forceinline__ u64 cnc_now() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ void cnc_grid_sync(CncGrid* g) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int gen = g->generation;
        __threadfence();
        if (atomicAdd(&g->arrived, 1u) == gridDim.x - 1) {
            g->arrived = 0;
            __threadfence();
            g->generation = gen + 1;
        } else {
            while (g->generation == gen) { __nanosleep(32); }
        }
        __threadfence();
    }
    __syncthreads();
}

// ---- Checksums ---------------------------------------------------------------
__device__ __forceinline__ u64 cnc_splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u64 cnc_weight(u64 j) { return cnc_splitmix64(j) | 1ull; }

// Payload checksum, record format version 2 (gpu_runtime/checksum.py): the
// payload as u32 words y_i, s = sum_i y_i * W_i mod 2^64 with
// W_i = (splitmix64(i mod 1024) | 1) * (splitmix64(1024 + i / 1024) | 1).
// Device code sums u64 words; word k holds y_2k (low half) and y_2k+1, which
// share a weight block. The term of word k:
__device__ __forceinline__ u64 cnc_term(u64 x, u64 k) {
    const u64 i = (2 * k) & 1023;
    return ((x & 0xffffffffull) * cnc_weight(i) + (x >> 32) * cnc_weight(i + 1)) * cnc_weight(1024 + (k >> 9));
}
// Version 1 (records written before; read only): x_k * (splitmix64(k) | 1).
__device__ __forceinline__ u64 cnc_term_v1(u64 x, u64 k) { return x * cnc_weight(k); }

__device__ u64 cnc_block_sum(u64 v) {
    __shared__ u64 warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    u64 total = 0;
    if (threadIdx.x == 0) {
        for (int w = 0; w < (int)((blockDim.x + 31) >> 5); ++w) total += warp_sums[w];
    }
    return total;  // valid in thread 0
}

// CRC-32 (zlib) of the 60 header bytes [0,28) ++ [32,64); table in shared memory.
__device__ u32 cnc_header_crc(const u32* table, const u8* h) {
    u32 c = 0xFFFFFFFFu;
    for (int i = 0; i < 64; ++i) {
        if (i >= 28 && i < 32) continue;
        c = table[(c ^ h[i]) & 0xFFu] ^ (c >> 8);
    }
    return c ^ 0xFFFFFFFFu;
}

__device__ void cnc_crc_table(u32* table) {
    for (int n = threadIdx.x; n < 256; n += blockDim.x) {
        u32 c = (u32)n;
        for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[n] = c;
    }
    __syncthreads();
}

// Store one u64 word at logical byte offset `at` (8-aligned) of a ring data area.
__device__ __forceinline__ void cnc_ring_store(u8* data, u64 capacity, u64 at, u64 word) {
    *(volatile u64*)(data + (at % capacity)) = word;
}

// Build a record header in registers and store it (thread 0 only).
__device__ void cnc_write_header(const u32* crc_table, u8* data, u64 capacity, u64 at, u32 type, u64 tag,
                                 u64 epoch, u32 region, u64 offset, u64 length, u64 aux, u64 psum) {
    u64 w[8];
    w[0] = (u64)CNC_REC_MAGIC | ((u64)CNC_REC_VERSION << 32) | ((u64)type << 40);  // flags = 0
    w[1] = tag;
    w[2] = epoch;
    w[3] = (u64)region;  // header_crc filled below
    w[4] = offset;
    w[5] = length;
    w[6] = aux;
    w[7] = psum;
    u32 crc = cnc_header_crc(crc_table, (const u8*)w);
    w[3] |= (u64)crc << 32;
    for (int i = 0; i < 8; ++i) cnc_ring_store(data, capacity, at + 8 * i, w[i]);
}
