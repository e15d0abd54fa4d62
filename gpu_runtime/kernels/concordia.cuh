// Concordia device-side definitions shared by the executor and its handlers.
//
// Layouts here mirror the Python side exactly; change both together and bump
// the version named beside each block.
#pragma once

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

// ---- Log record header: gpu_runtime/records.py, RECORD_VERSION 1 ------------
//  0 u32 magic "CNCR" | 4 u8 version | 5 u8 type | 6 u16 flags
//  8 u64 session_tag  | 16 u64 epoch | 24 u32 region | 28 u32 header_crc
// 32 u64 offset       | 40 u64 length | 48 u64 aux | 56 u64 payload_sum
#define CNC_REC_MAGIC 0x52434E43u
#define CNC_REC_VERSION 1u
#define CNC_REC_HEADER 64ull
#define CNC_REC_PAGES 2u
#define CNC_REC_ROWS 3u
#define CNC_REC_COMMIT 4u

// ---- Host log ring header: gpu_runtime/logring.py, RING_VERSION 1 -----------
// Word (u64) indices into the 4096-byte header; data follows at byte 4096
// (DATA_START in logring.py).
#define CNC_RING_DATA_START 4096ull
#define CNC_RING_OWNER_TOKEN 8
#define CNC_RING_WRITTEN 16
#define CNC_RING_COMMITTED 24
#define CNC_RING_COMMITTED_EPOCH 25
#define CNC_RING_CONSUMED 32

// ---- Task ring slot: gpu_runtime/executor.py, TASK_VERSION 1 ----------------
// 128 bytes in mapped pinned host memory. The producer fills kind, handler and
// args, then stores seq = ticket + 1 last; the executor runs ticket t when the
// slot t % nslots holds seq == t + 1.
struct CncTask {
    volatile u64 seq;
    u32 kind;
    u32 handler;
    u64 a[14];
};

enum CncTaskKind {
    CNC_T_NOP = 0,          // a0: u64* out (any address), a1: index: out[a1] += 1
    CNC_T_FENCE_WAIT = 1,   // a0: u64* word (device), a1: value, a2: timeout ns
    CNC_T_CHECKPOINT = 2,   // handler: specialization; a13: region; a0..a7: see the
                            // handlers. Fused prologue: a8 fence word, a9 value
                            // (0: none), a10 timeout ns. Fused epilogue: a11 new
                            // `written` (0: none), a12 commit epoch (0: data only).
    CNC_T_APPEND_LOG = 3,   // a0: ring header words, a1: new `written`, a2: commit
                            // epoch (0: publish data only). The host stored the
                            // bytes beyond `written` before enqueueing this. With
                            // a4 != 0 the COMMIT record at log offset a3 gets its
                            // header here: its body (a4 bytes, zero-padded) is
                            // stored, a5: epoch start, a6: data records, a7:
                            // session tag, a8: ring capacity.
    CNC_T_RECOVER = 4,      // handler: region; a0: src (pinned), a1: record type,
                            // a2: offset, a3: aux, a4: length
    CNC_T_SCAN = 5,         // handler; a13: pages region; a0: 1 = every page dirty;
                            // fused fence prologue as CHECKPOINT (a8..a10)
    CNC_T_COMPUTE = 6,      // a0: op, a1..: operands (see cnc_compute)
    CNC_T_CHECKPOINT_COMMIT = 7,  // a kv CHECKPOINT (one record) that also makes
                            // its epoch's COMMIT header before publishing: high
                            // halves of a3: data records of the epoch, a4: bytes
                            // from the epoch start to the COMMIT record, a5: body
                            // length; a11: end of the COMMIT record, a12: epoch.
    CNC_T_SCAN_COMMIT = 8,  // a whole pages epoch on the device: scan, records of
                            // the dirty runs into a reserved span, COMMIT, publish;
                            // args beside cnc_pages in executor.cu.
};

// ---- Control block: gpu_runtime/executor.py, CONTROL_VERSION 2 --------------
struct CncControl {
    volatile u64 head;          // tickets completed (executor writes)
    volatile u64 stop;          // host: park at the next task boundary
    volatile u64 state;         // CNC_PARKED / CNC_RUNNING / CNC_PARKING / CNC_LAUNCHED
    volatile u64 generation;    // generation of the running launch
    volatile u64 error;         // first error code, 0 if none
    volatile u64 error_ticket;  // ticket that raised it
    volatile u64 parks;         // how many times a generation parked itself
    volatile u64 heartbeat;     // %globaltimer at the last poll
    u64 idle_ns;
    u64 max_life_ns;
    u64 nslots;
    u64 fence_yield_ns;         // a data task's fence not reached after this long: park (0 = never)
    volatile u64 fence_ticket;  // ticket + 1 of the task whose fence wait yielded (0: none)
    volatile u64 fence_since;   // %globaltimer when that wait began (its timeout spans yields)
    u64 pad[2];
};

#define CNC_PARKED 0ull
#define CNC_RUNNING 1ull
#define CNC_PARKING 2ull
#define CNC_LAUNCHED 3ull

#define CNC_ERR_FENCE_TIMEOUT 1ull
#define CNC_ERR_RING_FULL 2ull
#define CNC_ERR_BAD_TASK 3ull
#define CNC_ERR_BAD_HANDLER 4ull

// ---- Operator table entry: gpu_runtime/cupy_backend.py, REGION_VERSION 1 ----
struct CncRegion {
    u64 base;          // device pointer of the region
    u64 nbytes;
    u64 outer, rows, row_bytes;   // kv: [outer, rows, row_bytes] view
    u64 page_size, npages;        // pages
    u64 hashes;        // device u64[npages]: hashes of the last committed state,
                       // then u32[ceil(npages / 32)]: SCAN_COMMIT's device bitmap
    u64 dirty;         // mapped host u32[ceil(npages / 32)]: scan output bitmap
    u64 region_id;
    u64 pad[6];
};

// ---- Grid-wide barrier (all blocks co-resident: cooperative launch) ---------
#define CNC_MAX_RECORDS_PER_TASK 256
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

// Payload checksum (gpu_runtime/checksum.py): sum_j x_j * (splitmix64(j) | 1).
__device__ __forceinline__ u64 cnc_weight(u64 j) { return cnc_splitmix64(j) | 1ull; }

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
