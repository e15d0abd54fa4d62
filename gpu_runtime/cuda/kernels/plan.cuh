// Record planning on the device: the rules of gpu_runtime/planner.py, as the
// kv CHECKPOINT handler and SCAN_COMMIT's walker apply them.
//
// Host and device code: NVRTC compiles these into the executor, and
// tests/cuda/plan_harness.cpp compiles the same file as host C++ so that
// tests/test_planner.py checks them against the planner on random inputs
// (the bitmap walk that calls cnc_plan_pages is checked on the GPU by the
// byte-identity tests).
#pragma once

#include "layout.cuh"

#if defined(__CUDACC__)
#define CNC_HD __host__ __device__ __forceinline__
#else
#define CNC_HD inline
#endif

#define CNC_FUSED_CHUNK_WORDS 2048ull  // 16 KiB: the unit of copy work a block takes

#if defined(__CUDACC__)
#define CNC_MIN min  // the device overload (u64): the executor's code stays what it was before this header
#else
inline u64 cnc_host_min(u64 a, u64 b) { return a < b ? a : b; }
#define CNC_MIN cnc_host_min
#endif

// ---- ROWS: rows [t0, t1) cut every `per` rows from t0 -------------------------
// A task's records sit back to back from log0; every one but the last holds
// `per` rows, so record k starts at log0 + k * full_size.
CNC_HD u64 cnc_rows_records(u64 t0, u64 t1, u64 per) { return (t1 - t0 + per - 1) / per; }
CNC_HD u64 cnc_rows_full_size(u64 outer, u64 per, u64 row_bytes) { return CNC_REC_HEADER + outer * per * row_bytes; }
CNC_HD u64 cnc_rows_first(u64 t0, u64 per, u64 k) { return t0 + k * per; }
// rows of the record starting at row `first` (cnc_rows_first)
CNC_HD u64 cnc_rows_count(u64 t1, u64 per, u64 first) { return CNC_MIN(per, t1 - first); }
CNC_HD u64 cnc_rows_at(u64 log0, u64 full_size, u64 k) { return log0 + k * full_size; }

// ---- PAGES: a run of dirty pages [p0, p1) cut every `per` pages from p0 -------
// Appends the run's records to the table at word 8 of `scratch` (4 words each:
// byte offset, bytes, log offset, first copy chunk; SCAN_COMMIT's scratch
// layout, see executor.cu), the last page clipped to the region's `nbytes`;
// `n`, `pos` (log offset of the next record) and `chunks` carry over between
// runs. False when a record would pass `limit` or the task's record limit:
// the epoch does not fit (SCAN_COMMIT then leaves it to the host's path).
CNC_HD bool cnc_plan_pages(const CncRegion& r, u64 page_size, u64* scratch, u64 p0, u64 p1, u64 per, u64 limit,
                           u64& n, u64& pos, u64& chunks) {
    for (u64 q = p0; q < p1; q += per) {
        const u64 off = q * page_size;
        const u64 len = CNC_MIN(CNC_MIN(q + per, p1) * page_size, r.nbytes) - off;
        if (n == CNC_MAX_RECORDS_PER_TASK || pos + CNC_REC_HEADER + len > limit) return false;
        u64* e = scratch + 8 + 4 * n;
        e[0] = off; e[1] = len; e[2] = pos; e[3] = chunks;
        chunks += (len / 8 + CNC_FUSED_CHUNK_WORDS - 1) / CNC_FUSED_CHUNK_WORDS;
        pos += CNC_REC_HEADER + len;  // len is a multiple of 16: no padding
        ++n;
    }
    return true;
}
