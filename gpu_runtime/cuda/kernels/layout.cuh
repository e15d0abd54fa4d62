// Concordia's shared layouts: plain C (no device code), so that host-side test
// harnesses compile them too (tests/cuda/plan_harness.cpp).
//
// Layouts here mirror the Python side exactly; change both together and bump
// the version named beside each block (tests/test_kernels_compile.py compares
// every constant with its Python twin).
#pragma once

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

// ---- Log record header: gpu_runtime/records.py, RECORD_VERSION 2 ------------
//  0 u32 magic "CNCR" | 4 u8 version | 5 u8 type | 6 u16 flags
//  8 u64 session_tag  | 16 u64 epoch | 24 u32 region | 28 u32 header_crc
// 32 u64 offset       | 40 u64 length | 48 u64 aux | 56 u64 payload_sum
#define CNC_REC_MAGIC 0x52434E43u
#define CNC_REC_VERSION 2u
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

// ---- Task ring slot: gpu_runtime/cuda/executor.py, TASK_VERSION 1 -----------
// 128 bytes in mapped pinned host memory. The producer fills kind, handler and
// args, then stores seq = ticket + 1 last; the executor runs ticket t when the
// slot t % nslots holds seq == t + 1.
struct CncTask {
    volatile u64 seq;
    u32 kind;
    u32 handler;
    u64 a[14];
};

// Kinds and the meaning of a[] per kind: tasks.cuh, generated from
// gpu_runtime/cuda/tasks.py (one definition for the producer and the device).
#include "tasks.cuh"

// ---- Control block: gpu_runtime/cuda/executor.py, CONTROL_VERSION 2 ---------
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

// ---- Operator table entry: gpu_runtime/cuda/backend.py, REGION_VERSION 1 ----
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

// Records one data task writes at most (gpu_runtime/cuda/region.py, MAX_RECORDS_PER_TASK).
#define CNC_MAX_RECORDS_PER_TASK 256
