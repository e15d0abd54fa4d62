// Device helpers shared by the executor's handlers (executor.cu includes this
// before handler_kv.cuh and handler_pages.cuh): the task context, error
// reporting, grid-wide thread indices, and the ring stores and payload copy
// every data record uses.
#pragma once

#include "concordia.cuh"

#ifndef CNC_BLOCK
#define CNC_BLOCK 256
#endif

struct CncCtx {
    const u32* crc_table;
    u64 ticket;
    CncControl* ctl;
    CncGrid* grid;
};

__device__ void cnc_fail(CncCtx& c, u64 code) {
    if (blockIdx.x == 0 && threadIdx.x == 0 && c.ctl->error == 0) {  // one reporter: all blocks see the same task
        c.ctl->error_ticket = c.ticket;
        c.ctl->error = code;
    }
}

__device__ __forceinline__ u64 cnc_gtid() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 cnc_gthreads() { return (u64)gridDim.x * blockDim.x; }

// ---- ring stores shared by every data record ---------------------------------
// Position of log offset `at` in the ring, and a store that wraps with a
// compare instead of a 64-bit modulo per word.
__device__ __forceinline__ void cnc_store_at(u8* data, u64 cap, u64 pos, u64 byte, u64 word) {
    u64 i = pos + byte;
    if (i >= cap) i -= cap;
    *(volatile u64*)(data + i) = word;
}

// Copy words [k0, k1) of a record's payload from `src` (the payload's word 0)
// into the ring, word 0 at ring position `pos` (8-aligned), with 16-byte stores
// where the ring allows, returning this thread's share of the payload checksum
// sum cnc_term(x_k, k). Threads [tid, tid + stride, ...]. A whole record is [0, n).
__device__ __forceinline__ u64 cnc_copy_payload(const u64* src, u64 k0, u64 k1, u8* data, u64 cap, u64 pos,
                                                u64 tid, u64 stride) {
    u64 acc = 0;
    if (k0 >= k1) return acc;
    const u64 a = k0 + ((k0 + ((pos >> 3) & 1)) & 1);  // first word at a 16-byte ring position
    if (a > k0 && tid == 0) {  // one lone word brings the stores to 16-byte alignment
        const u64 x = src[k0];
        acc += cnc_term(x, k0);
        cnc_store_at(data, cap, pos, 8 * k0, x);
    }
    if (a >= k1) return acc;
    const u64 pairs = (k1 - a) / 2;
    for (u64 j = tid; j < pairs; j += stride) {
        const u64 k = a + 2 * j;
        const u64 x0 = src[k], x1 = src[k + 1];
        acc += cnc_term(x0, k) + cnc_term(x1, k + 1);
        u64 i = pos + 8 * k;
        if (i >= cap) i -= cap;  // cap is a multiple of 4096: a pair never straddles the end
        *(ulonglong2*)(data + i) = make_ulonglong2(x0, x1);  // ordered by the fence before publish
    }
    const u64 last = a + 2 * pairs;
    if (last < k1 && tid == (stride > 1 ? 1 : 0)) {
        const u64 x = src[last];
        acc += cnc_term(x, last);
        cnc_store_at(data, cap, pos, 8 * last, x);
    }
    return acc;
}
