// The persistent executor: one cooperative grid that consumes a ring of tasks
// in mapped pinned host memory, runs each task with every block, and parks
// itself when idle or old (see gpu_runtime/cuda/executor.py for the host protocol).
//
// Handlers are specialized at compile time: the host passes
// -DCNC_HANDLER_CASES="CNC_KV(0, 256ull) CNC_PAGES(1, 4096ull) ..." so that each
// distinct row size or page size is a constant in its own instantiation.
// -DCNC_FUSED_PAGES compiles the SCAN_COMMIT task in (CupyBackend(fused_pages=True)).
// A region with a new size recompiles this module with one more case (hot swap).
#include "concordia.cuh"
#include "plan.cuh"

#ifndef CNC_HANDLER_CASES
#define CNC_HANDLER_CASES
#endif

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

// ---- kv regions: gather rows into ROWS records / scatter them back ----------
// CHECKPOINT args: a0 ring data, a1 capacity, a2 epoch, a3 t0, a4 t1,
//                  a5 rows per record, a6 log offset of the first record,
//                  a7 session tag.
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
// sum x_k * w(k). Threads [tid, tid + stride, ...]. A whole record is [0, n).
__device__ __forceinline__ u64 cnc_copy_payload(const u64* src, u64 k0, u64 k1, u8* data, u64 cap, u64 pos,
                                                u64 tid, u64 stride) {
    u64 acc = 0;
    if (k0 >= k1) return acc;
    const u64 a = k0 + ((k0 + ((pos >> 3) & 1)) & 1);  // first word at a 16-byte ring position
    if (a > k0 && tid == 0) {  // one lone word brings the stores to 16-byte alignment
        const u64 x = src[k0];
        acc += x * cnc_weight(k0);
        cnc_store_at(data, cap, pos, 8 * k0, x);
    }
    if (a >= k1) return acc;
    const u64 pairs = (k1 - a) / 2;
    for (u64 j = tid; j < pairs; j += stride) {
        const u64 k = a + 2 * j;
        const u64 x0 = src[k], x1 = src[k + 1];
        acc += x0 * cnc_weight(k) + x1 * cnc_weight(k + 1);
        u64 i = pos + 8 * k;
        if (i >= cap) i -= cap;  // cap is a multiple of 4096: a pair never straddles the end
        *(ulonglong2*)(data + i) = make_ulonglong2(x0, x1);  // ordered by the fence before publish
    }
    const u64 last = a + 2 * pairs;
    if (last < k1 && tid == (stride > 1 ? 1 : 0)) {
        const u64 x = src[last];
        acc += x * cnc_weight(last);
        cnc_store_at(data, cap, pos, 8 * last, x);
    }
    return acc;
}

template <u64 RB>
__device__ void cnc_kv(u32 kind, const CncTask& t, const CncRegion& r, CncCtx& c) {
    static_assert(RB % 8 == 0, "kv rows must be a multiple of 8 bytes");
    if (kind == CNC_T_CHECKPOINT) {
        // Every thread of the grid takes words of every record, so one token's
        // rows are spread over all SMs (PCIe-bound, not SM-bound); checksums
        // are summed per record across blocks (the sum is associative), then
        // block 0 writes the headers.
        // CHECKPOINT_KV fields (a CHECKPOINT_COMMIT has the same ones, plus its
        // epoch's fields in the high halves).
        u8* data = (u8*)CNC_CHECKPOINT_KV_DATA(t);
        const u64 cap = CNC_CHECKPOINT_KV_CAPACITY(t), epoch = CNC_CHECKPOINT_KV_EPOCH(t),
                  log0 = CNC_CHECKPOINT_KV_LOG0(t);
        const u64 t0 = CNC_CHECKPOINT_KV_T0(t), t1 = CNC_CHECKPOINT_KV_T1(t), per = CNC_CHECKPOINT_KV_PER(t);
        // Records as plan.cuh (the planner's rules) lays them out.
        const u64 nrec = cnc_rows_records(t0, t1, per);
        const u64 full_size = cnc_rows_full_size(r.outer, per, RB);
        for (u64 rec = 0; rec < nrec; ++rec) {
            const u64 r0 = cnc_rows_first(t0, per, rec);
            const u64 n = cnc_rows_count(t1, per, r0);
            const u64 span_words = n * RB / 8;
            const u64 total = r.outer * span_words;
            const u64 pos = (cnc_rows_at(log0, full_size, rec) + CNC_REC_HEADER) % cap;
            u64 acc = 0;
            for (u64 k = cnc_gtid(); k < total; k += cnc_gthreads()) {
                const u64 o = k / span_words, w = k - o * span_words;
                const u64 x = ((const u64*)(r.base + (o * r.rows + r0) * RB))[w];
                acc += x * cnc_weight(k);
                cnc_store_at(data, cap, pos, 8 * k, x);
            }
            const u64 sum = cnc_block_sum(acc);
            if (threadIdx.x == 0 && sum) atomicAdd(&c.grid->acc[rec], sum);
        }
        __threadfence();
        cnc_grid_sync(c.grid);
        if (blockIdx.x == 0) {
            for (u64 rec = threadIdx.x; rec < nrec; rec += blockDim.x) {
                const u64 r0 = cnc_rows_first(t0, per, rec);
                const u64 n = cnc_rows_count(t1, per, r0);
                const u64 len = r.outer * n * RB;
                const u64 sum = c.grid->acc[rec];
                c.grid->acc[rec] = 0;
                cnc_write_header(c.crc_table, data, cap, cnc_rows_at(log0, full_size, rec), CNC_REC_ROWS,
                                 CNC_CHECKPOINT_KV_TAG(t), epoch, (u32)r.region_id, r0, len, n,
                                 cnc_splitmix64(sum ^ len));
            }
        }
    } else if (kind == CNC_T_RECOVER) {
        // ROWS record: offset = first row, aux = rows
        const u64* src = (const u64*)CNC_RECOVER_SRC(t);
        const u64 r0 = CNC_RECOVER_OFFSET(t), n = CNC_RECOVER_AUX(t);
        const u64 span_words = n * RB / 8;
        const u64 total = r.outer * span_words;
        for (u64 k = cnc_gtid(); k < total; k += cnc_gthreads()) {
            const u64 o = k / span_words, w = k % span_words;
            ((u64*)(r.base + (o * r.rows + r0) * RB))[w] = src[k];
        }
    } else {
        cnc_fail(c, CNC_ERR_BAD_TASK);
    }
}

#ifdef CNC_FUSED_PAGES
// ---- SCAN_COMMIT: one task for a pages epoch (scan, records, COMMIT) --------
// a0 ring data, a1 capacity, a2 epoch, a3 log offset of the epoch's first
// record, a4 bytes reserved from a3 (data records + COMMIT), a5 session tag,
// a6 pages per record (low half) | COMMIT body length << 32, a7 device scratch
// (u64: [0] records, [1] end of the data records, [2] 1 = overflow, [3] copy
// chunks, [8 + 4 i ..] record i: byte offset, bytes, log offset, first chunk),
// a8..a10 fence prologue, a11 COMMIT body (mapped pinned, zero-padded to whole
// words), a12 result (mapped pinned u64[2]: status 1 = committed, 2 = did not
// fit; log offset past the COMMIT).
// The device bitmap (u32 words) follows the region's hashes in device memory.
__shared__ u64 cnc_smem[1024];         // 8 KiB: the bitmap tile, then the record table

// Block 0: walk the device bitmap for run boundaries (bit changes), tile by
// tile through shared memory; threads flag their words, thread 0 visits only
// flagged ones. Leaves records, end, overflow and chunks in scratch[0..3].
template <u64 PS>
__device__ void cnc_fused_plan(const CncRegion& r, const u32* dbits, u64* scratch, u64 log0, u64 limit, u64 per) {
    u32* tile = (u32*)cnc_smem;
    __shared__ u32 s_flags[CNC_BLOCK / 32];
    __shared__ u32 s_prev, s_over;
    const u64 ngroups = (r.npages + 31) / 32;
    constexpr u64 TILE = 2048, PER_T = TILE / CNC_BLOCK;
    u64 n = 0, pos = log0, chunks = 0, run0 = ~0ull;  // thread 0's state across tiles
    if (threadIdx.x == 0) { s_prev = 0; s_over = 0; }
    __syncthreads();
    for (u64 t0 = 0; t0 < ngroups && !s_over; t0 += TILE) {
        const u64 cnt = min(TILE, ngroups - t0);
        for (u64 j = threadIdx.x; j < cnt; j += blockDim.x) tile[j] = ((const volatile u32*)dbits)[t0 + j];
        __syncthreads();
        bool f = false;
        for (u64 j = threadIdx.x * PER_T; j < min((threadIdx.x + 1) * PER_T, cnt); ++j) {
            const u32 pb = j == 0 ? s_prev : tile[j - 1] >> 31;
            f |= (tile[j] ^ ((tile[j] << 1) | pb)) != 0;
        }
        const u32 m = __ballot_sync(0xffffffffu, f);
        if ((threadIdx.x & 31) == 0) s_flags[threadIdx.x >> 5] = m;
        __syncthreads();
        if (threadIdx.x == 0) {
            bool ok = true;
            for (u32 w = 0; w < CNC_BLOCK / 32 && ok; ++w) {
                for (u32 fm = s_flags[w]; fm && ok; fm &= fm - 1) {
                    const u64 th = 32 * w + __ffs(fm) - 1;
                    for (u64 j = th * PER_T; j < min((th + 1) * PER_T, cnt) && ok; ++j) {
                        const u32 pb = j == 0 ? s_prev : tile[j - 1] >> 31;
                        for (u32 x = tile[j] ^ ((tile[j] << 1) | pb); x && ok; x &= x - 1) {
                            const u32 b = __ffs(x) - 1;
                            const u64 page = (t0 + j) * 32 + b;
                            if ((tile[j] >> b) & 1u) {
                                run0 = page;
                            } else {
                                ok = cnc_plan_pages(r, PS, scratch, run0, page, per, limit, n, pos, chunks);
                                run0 = ~0ull;
                            }
                        }
                    }
                }
            }
            s_prev = tile[cnt - 1] >> 31;
            s_over = ok ? 0 : 1;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        bool ok = !s_over;
        if (ok && run0 != ~0ull) {
            ok = cnc_plan_pages(r, PS, scratch, run0, r.npages, per, limit, n, pos, chunks);
        }
        scratch[0] = n;
        scratch[1] = pos;
        scratch[2] = ok ? 0 : 1;
        scratch[3] = chunks;
        __threadfence();
    }
}
#endif  // CNC_FUSED_PAGES

// ---- pages regions: hash scan, dirty-run copy, restore ------------------------
// SCAN: a0 = 1 to mark every page dirty. Writes r.hashes and the dirty bitmap
// (u32 words in mapped host memory, bit p % 32 of word p / 32).
// CHECKPOINT args: a0 ring data, a1 capacity, a2 epoch, a3 runs (pinned:
// [byte offset, bytes, log offset] triples), a4 number of runs, a5 session tag,
// a6 = 1 when the runs are small (a block per run) else 0 (the grid per run).
// SCAN body: hash every page, compare with the committed hashes, write the
// dirty bitmap (u32 words, bit p % 32 of word p / 32) to mapped host memory
// and, when `dbits` is not null, to device memory too (for SCAN_COMMIT).
template <u64 PS>
__device__ void cnc_pages_scan(const CncRegion& r, bool all, u32* dbits) {
    // Page-hash weights from a shared table: splitmix64 per word would make
    // the scan compute-bound (64-bit multiplies are emulated).
    constexpr u64 NW = PS / 8;
    constexpr bool TABLE = NW <= 2048;
    __shared__ u64 wtab[TABLE ? NW : 1];
    if (TABLE) {
        for (u64 j = threadIdx.x; j < NW; j += blockDim.x) wtab[j] = cnc_weight(j);
        __syncthreads();
    }
    const u64 lane = threadIdx.x & 31;
    const u64 warp = cnc_gtid() >> 5, nwarps = cnc_gthreads() >> 5;
    const u64 ngroups = (r.npages + 31) / 32;
    u64* hashes = (u64*)r.hashes;
    u32* bitmap = (u32*)r.dirty;
    for (u64 g = warp; g < ngroups; g += nwarps) {
        u32 bits = 0;
        const u64 p_end = min(r.npages, (g + 1) * 32);
        // Two pages at a time: the second page's loads are in flight while
        // the first one's sum is reduced across the warp.
        for (u64 p = g * 32; p < p_end; p += 2) {
            const bool two = p + 1 < p_end;
            const ulonglong2* page0 = (const ulonglong2*)(r.base + p * PS);
            const ulonglong2* page1 = (const ulonglong2*)(r.base + (p + 1) * PS);
            const u64 n0 = min(PS, r.nbytes - p * PS) / 16;  // the last page may be short
            const u64 n1 = two ? min(PS, r.nbytes - (p + 1) * PS) / 16 : 0;
            u64 acc0 = 0, acc1 = 0;
#pragma unroll 4
            for (u64 v = lane; v < PS / 16; v += 32) {
                const u64 w0 = TABLE ? wtab[2 * v] : cnc_weight(2 * v);
                const u64 w1 = TABLE ? wtab[2 * v + 1] : cnc_weight(2 * v + 1);
                if (v < n0) { const ulonglong2 x = page0[v]; acc0 += x.x * w0 + x.y * w1; }
                if (v < n1) { const ulonglong2 y = page1[v]; acc1 += y.x * w0 + y.y * w1; }
            }
            for (int o = 16; o > 0; o >>= 1) {
                acc0 += __shfl_xor_sync(0xffffffffu, acc0, o);
                acc1 += __shfl_xor_sync(0xffffffffu, acc1, o);
            }
            if (acc0 != hashes[p] || all) bits |= 1u << (p - g * 32);
            if (two && (acc1 != hashes[p + 1] || all)) bits |= 1u << (p + 1 - g * 32);
            if (lane == 0) {
                hashes[p] = acc0;
                if (two) hashes[p + 1] = acc1;
            }
        }
        if (lane == 0) {
            bitmap[g] = bits;
            if (dbits) dbits[g] = bits;
        }
    }
}

template <u64 PS>
__device__ void cnc_pages(u32 kind, const CncTask& t, const CncRegion& r, CncCtx& c) {
    static_assert(PS % 16 == 0, "page size must be a multiple of 16 bytes");
    if (kind == CNC_T_SCAN) {
        cnc_pages_scan<PS>(r, CNC_SCAN_ALL_DIRTY(t) != 0, nullptr);
#ifdef CNC_FUSED_PAGES
    } else if (kind == CNC_T_SCAN_COMMIT) {
        u8* data = (u8*)CNC_SCAN_COMMIT_DATA(t);
        const u64 cap = CNC_SCAN_COMMIT_CAPACITY(t), epoch = CNC_SCAN_COMMIT_EPOCH(t), log0 = CNC_SCAN_COMMIT_LOG0(t),
                  span = CNC_SCAN_COMMIT_SPAN(t), tag = CNC_SCAN_COMMIT_TAG(t);
        const u64 per = CNC_SCAN_COMMIT_PER(t), nbody = CNC_SCAN_COMMIT_BODY_LEN(t);
        u64* scratch = (u64*)CNC_SCAN_COMMIT_SCRATCH(t);
        volatile u64* result = (volatile u64*)CNC_SCAN_COMMIT_RESULT(t);
        u32* dbits = (u32*)((u64*)r.hashes + r.npages);
        const u64 commit_size = CNC_REC_HEADER + ((nbody + 7) & ~7ull);
        // 1. scan (every block), 2. plan the records (block 0), 3. copy (every block)
        cnc_pages_scan<PS>(r, false, dbits);
        __threadfence();
        cnc_grid_sync(c.grid);
        if (blockIdx.x == 0) cnc_fused_plan<PS>(r, dbits, scratch, log0, log0 + span - commit_size, per);
        cnc_grid_sync(c.grid);
        const volatile u64* vs = scratch;
        const u64 n = vs[0], over = vs[2], chunks = vs[3];
        if (over) {
            if (blockIdx.x == 0 && threadIdx.x == 0) { result[1] = 0; result[0] = 2; }
            return;  // bitmap and hashes are in place: the host takes the two-phase path
        }
        u64* table = cnc_smem;  // record table in shared memory: one L2 read per word per block
        for (u64 j = threadIdx.x; j < 4 * n; j += blockDim.x) table[j] = vs[8 + j];
        __syncthreads();
        for (u64 ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
            u64 lo = 0, hi = n;  // the record holding chunk ch: last i with first chunk <= ch
            while (hi - lo > 1) {
                const u64 mid = (lo + hi) / 2;
                if (table[4 * mid + 3] <= ch) lo = mid; else hi = mid;
            }
            const u64 off = table[4 * lo], len = table[4 * lo + 1], at = table[4 * lo + 2];
            const u64 k0 = (ch - table[4 * lo + 3]) * CNC_FUSED_CHUNK_WORDS;
            const u64 k1 = min(k0 + CNC_FUSED_CHUNK_WORDS, len / 8);
            const u64 acc = cnc_copy_payload((const u64*)(r.base + off), k0, k1, data, cap,
                                           (at + CNC_REC_HEADER) % cap, threadIdx.x, blockDim.x);
            const u64 sum = cnc_block_sum(acc);
            if (threadIdx.x == 0 && sum) atomicAdd(&c.grid->acc[lo], sum);
        }
        __syncthreads();
        if (threadIdx.x == 0) __threadfence_system();
        cnc_grid_sync(c.grid);
        // 4. block 0: the records' headers, then the COMMIT (body copied from
        //    pinned memory, summed on the way), then publish the epoch.
        if (blockIdx.x == 0) {
            for (u64 i = threadIdx.x; i < n; i += blockDim.x) {
                const u64 sum = c.grid->acc[i];
                c.grid->acc[i] = 0;
                cnc_write_header(c.crc_table, data, cap, table[4 * i + 2], CNC_REC_PAGES, tag, epoch,
                                 (u32)r.region_id, table[4 * i], table[4 * i + 1], 0,
                                 cnc_splitmix64(sum ^ table[4 * i + 1]));
            }
            const u64 at = vs[1], end = at + commit_size;
            const volatile u64* body = (const volatile u64*)CNC_SCAN_COMMIT_BODY(t);
            u64 acc = 0;
            for (u64 k = threadIdx.x; k < (nbody + 7) / 8; k += blockDim.x) {
                const u64 x = body[k];
                acc += x * cnc_weight(k);
                cnc_store_at(data, cap, (at + CNC_REC_HEADER) % cap, 8 * k, x);
            }
            const u64 sum = cnc_block_sum(acc);
            if (threadIdx.x == 0) {
                cnc_write_header(c.crc_table, data, cap, at, CNC_REC_COMMIT, tag, epoch, 0, log0, nbody, n,
                                 cnc_splitmix64(sum ^ nbody));
                __threadfence_system();  // every record of the epoch before `written`
                volatile u64* words = (volatile u64*)(data - CNC_RING_DATA_START);
                words[CNC_RING_WRITTEN] = end;
                words[CNC_RING_COMMITTED_EPOCH] = epoch;
                words[CNC_RING_COMMITTED] = end;
                result[1] = end;
                result[0] = 1;
            }
        }
#endif  // without it, SCAN_COMMIT fails as an unknown task
    } else if (kind == CNC_T_CHECKPOINT) {
        // Each run (one record) is spread over the whole grid, like kv rows:
        // PCIe stores from every SM, checksums summed per record.
        u8* data = (u8*)CNC_CHECKPOINT_PAGES_DATA(t);
        const u64 cap = CNC_CHECKPOINT_PAGES_CAPACITY(t), epoch = CNC_CHECKPOINT_PAGES_EPOCH(t);
        const u64* runs = (const u64*)CNC_CHECKPOINT_PAGES_RUNS(t);
        const u64 nruns = CNC_CHECKPOINT_PAGES_NRUNS(t);
        if (CNC_CHECKPOINT_PAGES_SMALL(t)) {
            // Small runs: one block per run, no grid-wide step per record.
            for (u64 i = blockIdx.x; i < nruns; i += gridDim.x) {
                const u64 off = runs[3 * i], len = runs[3 * i + 1], at = runs[3 * i + 2];
                const u64* src = (const u64*)(r.base + off);
                const u64 acc = cnc_copy_payload(src, 0, len / 8, data, cap, (at + CNC_REC_HEADER) % cap,
                                                 threadIdx.x, blockDim.x);
                const u64 sum = cnc_block_sum(acc);
                if (threadIdx.x == 0) {
                    cnc_write_header(c.crc_table, data, cap, at, CNC_REC_PAGES, CNC_CHECKPOINT_PAGES_TAG(t), epoch,
                                     (u32)r.region_id, off, len, 0, cnc_splitmix64(sum ^ len));
                }
                __syncthreads();
            }
            return;
        }
        __shared__ u64 run[3];
        for (u64 i = 0; i < nruns; ++i) {
            if (threadIdx.x < 3) run[threadIdx.x] = ((const volatile u64*)runs)[3 * i + threadIdx.x];
            __syncthreads();  // one PCIe read per word per block, not per thread
            const u64 off = run[0], len = run[1], at = run[2];
            __syncthreads();
            const u64* src = (const u64*)(r.base + off);
            const u64 acc = cnc_copy_payload(src, 0, len / 8, data, cap, (at + CNC_REC_HEADER) % cap,
                                             cnc_gtid(), cnc_gthreads());
            const u64 sum = cnc_block_sum(acc);
            if (threadIdx.x == 0 && sum) atomicAdd(&c.grid->acc[i], sum);
        }
        __threadfence();
        cnc_grid_sync(c.grid);
        if (blockIdx.x == 0) {
            for (u64 i = threadIdx.x; i < nruns; i += blockDim.x) {
                const u64 off = runs[3 * i], len = runs[3 * i + 1], at = runs[3 * i + 2];
                const u64 sum = c.grid->acc[i];
                c.grid->acc[i] = 0;
                cnc_write_header(c.crc_table, data, cap, at, CNC_REC_PAGES, CNC_CHECKPOINT_PAGES_TAG(t), epoch,
                                 (u32)r.region_id, off, len, 0, cnc_splitmix64(sum ^ len));
            }
        }
    } else if (kind == CNC_T_RECOVER) {
        const u64* src = (const u64*)CNC_RECOVER_SRC(t);
        u64* dst = (u64*)(r.base + CNC_RECOVER_OFFSET(t));
        for (u64 k = cnc_gtid(); k < CNC_RECOVER_LENGTH(t) / 8; k += cnc_gthreads()) dst[k] = src[k];
    } else {
        cnc_fail(c, CNC_ERR_BAD_TASK);
    }
}

// Handler ID = specialization (one per distinct row or page size); the region
// (operator-table entry) is the task's CNC_TASK_REGION field.
#define CNC_KV(ID, RB) \
    case ID:                                                                                           \
        cnc_kv<RB>(t.kind == CNC_T_CHECKPOINT_COMMIT ? (u32)CNC_T_CHECKPOINT : t.kind, t,              \
                   regions[CNC_TASK_REGION(t)], c);                                                    \
        break;
#define CNC_PAGES(ID, PS) case ID: cnc_pages<PS>(t.kind, t, regions[CNC_TASK_REGION(t)], c); break;

// ---- generic tasks --------------------------------------------------------------
__device__ void cnc_compute(const CncTask& t, CncCtx& c) {
    const u64 op = CNC_COMPUTE_OP(t), n = CNC_COMPUTE_N(t);
    if (op == 0) {  // fill u32: x ptr, y value
        u32* p = (u32*)CNC_COMPUTE_X(t);
        for (u64 k = cnc_gtid(); k < n; k += cnc_gthreads()) p[k] = (u32)CNC_COMPUTE_Y(t);
    } else if (op == 1) {  // axpy f32: y = alpha * x + y; x alpha bits, y x, z y
        const float alpha = __uint_as_float((u32)CNC_COMPUTE_X(t));
        const float* x = (const float*)CNC_COMPUTE_Y(t);
        float* y = (float*)CNC_COMPUTE_Z(t);
        for (u64 k = cnc_gtid(); k < n; k += cnc_gthreads()) y[k] = alpha * x[k] + y[k];
    } else if (op == 2) {  // scale f32: x alpha bits, y ptr
        const float alpha = __uint_as_float((u32)CNC_COMPUTE_X(t));
        float* p = (float*)CNC_COMPUTE_Y(t);
        for (u64 k = cnc_gtid(); k < n; k += cnc_gthreads()) p[k] *= alpha;
    } else {
        cnc_fail(c, CNC_ERR_BAD_TASK);
    }
}

// Wait (one thread) until *word >= value. Returns 1 if the wait yielded: not
// reached within ctl->fence_yield_ns, the ticket's wait start kept in the
// control block so that `timeout_ns` counts from the first wait across
// yields; a timeout fails the task (and returns 0).
__device__ u64 cnc_fence_wait(CncCtx& c, const u64* word, u64 value, u64 timeout_ns) {
    CncControl* ctl = c.ctl;
    const u64 ticket = c.ticket;
    const u64 entered = cnc_now();
    const u64 since = ctl->fence_ticket == ticket + 1 ? ctl->fence_since : entered;
    const u64 yield_ns = ctl->fence_yield_ns;
    while (*(volatile const u64*)word < value) {
        const u64 now = cnc_now();
        if (now - since > timeout_ns) { cnc_fail(c, CNC_ERR_FENCE_TIMEOUT); return 0; }
        if (yield_ns != 0 && now - entered > yield_ns) {
            ctl->fence_since = since;
            ctl->fence_ticket = ticket + 1;
            return 1;
        }
        __nanosleep(64);
    }
    return 0;
}

// The header of the COMMIT record at log offset `at` whose `len`-byte body the
// host stored (zero-padded to whole words) in the ring, in mapped host memory:
// block 0 sums the body with the payload weights, thread 0 writes the header
// and fences it (the caller publishes next). Called by all of block 0.
__device__ void cnc_commit_header(CncCtx& c, u8* data, u64 cap, u64 at, u64 len, u64 tag, u64 epoch, u64 start,
                                  u64 nrec) {
    u64 acc = 0;
    for (u64 k = threadIdx.x; k < (len + 7) / 8; k += blockDim.x) {
        acc += *(volatile const u64*)(data + (at + CNC_REC_HEADER + 8 * k) % cap) * cnc_weight(k);
    }
    const u64 sum = cnc_block_sum(acc);
    if (threadIdx.x == 0) {
        cnc_write_header(c.crc_table, data, cap, at, CNC_REC_COMMIT, tag, epoch, 0, start, len, nrec,
                         cnc_splitmix64(sum ^ len));
        __threadfence_system();
    }
}

extern "C" __global__ void __launch_bounds__(CNC_BLOCK)
cnc_executor(CncTask* ring, CncControl* ctl, CncGrid* grid, const CncRegion* regions, u64 generation) {
    __shared__ u32 crc_table[256];
    __shared__ CncTask t;
    __shared__ u64 s_action;
    cnc_crc_table(crc_table);
    const u64 born = cnc_now();
    // Read once: every read of host memory is a PCIe round trip.
    const u64 nslots = ctl->nslots, idle_ns = ctl->idle_ns, max_life_ns = ctl->max_life_ns;
    u64 ticket = ctl->head;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        ctl->generation = generation;
        ctl->state = CNC_RUNNING;
        __threadfence_system();
    }
    CncCtx c{crc_table, ticket, ctl, grid};
    for (;;) {
        // 1. block 0 waits for the next task (or decides to park) and copies it
        //    into device memory for the other blocks.
        __shared__ u64 s_found;
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            volatile CncTask* slot = &ring[ticket % nslots];
            u64 idle_since = cnc_now();
            u64 action = 1;
            for (u32 spin = 0;; ++spin) {
                if (slot->seq == ticket + 1) { action = 0; break; }
                if ((spin & 15) == 15) {
                    const u64 now = cnc_now();
                    ctl->heartbeat = now;
                    if (ctl->stop || now - idle_since > idle_ns || now - born > max_life_ns) {
                        // Announce the park, then look once more: a producer that
                        // published before reading PARKING is seen here; one that
                        // publishes after sees PARKING and relaunches.
                        ctl->state = CNC_PARKING;
                        __threadfence_system();
                        action = slot->seq == ticket + 1 ? 0 : 1;
                        if (action == 0) { ctl->state = CNC_RUNNING; __threadfence_system(); }
                        break;
                    }
                }
                __nanosleep(64);
            }
            s_found = action;
            grid->action = action;
        }
        if (blockIdx.x == 0) {
            // One PCIe round trip for the whole slot: 16 lanes read a word each.
            __syncthreads();
            if (s_found == 0 && threadIdx.x < 16) {
                __threadfence_system();
                grid->task[threadIdx.x] = ((const volatile u64*)&ring[ticket % nslots])[threadIdx.x];
            }
            __threadfence();
        }
        cnc_grid_sync(grid);
        if (threadIdx.x == 0) s_action = *(volatile u64*)&grid->action;
        if (threadIdx.x < 16) ((u64*)&t)[threadIdx.x] = ((const volatile u64*)grid->task)[threadIdx.x];
        __syncthreads();
        if (s_action != 0) break;
        c.ticket = ticket;

        // Fused prologue of data tasks (the FENCE fields):
        // wait until the work queued before the commit on the caller's stream is done.
        // Yield: a fence not reached within fence_yield_ns parks the generation
        // without retiring the task (the next one starts at it again), because
        // what holds the stream back may itself wait for no kernel to be
        // resident (a lazily loaded module's first launch).
        if ((t.kind == CNC_T_CHECKPOINT || t.kind == CNC_T_CHECKPOINT_COMMIT || t.kind == CNC_T_SCAN ||
             t.kind == CNC_T_SCAN_COMMIT) && CNC_FENCE_VALUE(t) != 0) {
            __shared__ u64 s_yield;
            if (blockIdx.x == 0 && threadIdx.x == 0) {
                grid->fence_yield = cnc_fence_wait(c, (const u64*)CNC_FENCE_WORD(t), CNC_FENCE_VALUE(t),
                                                   CNC_FENCE_TIMEOUT_NS(t));
                __threadfence();
            }
            cnc_grid_sync(grid);
            if (threadIdx.x == 0) s_yield = *(volatile u64*)&grid->fence_yield;
            __syncthreads();
            if (s_yield != 0) break;  // head stays at this ticket
        }

        // 2. every block runs its share of the task.
        switch (t.kind) {
            case CNC_T_NOP:
                if (cnc_gtid() == 0) atomicAdd((u64*)CNC_NOP_OUT(t) + CNC_NOP_INDEX(t), 1ull);
                break;
            case CNC_T_FENCE_WAIT:  // yields like the prologue (checked after the barrier below)
                if (cnc_gtid() == 0) {
                    grid->fence_yield = cnc_fence_wait(c, (const u64*)CNC_FENCE_WAIT_WORD(t), CNC_FENCE_WAIT_VALUE(t),
                                                       CNC_FENCE_WAIT_TIMEOUT_NS(t));
                }
                break;
            case CNC_T_APPEND_LOG:
                // The host already stored the record bytes beyond `written`
                // (a COMMIT record's header, when it has a body length, is made here: the
                // host's commit path then skips the checksums); publishing after
                // all earlier tasks makes them visible in order.
                if (blockIdx.x == 0 && CNC_APPEND_LOG_BODY_LEN(t) != 0) {
                    // the ring field is the ring header; its data area follows 4 KiB later
                    cnc_commit_header(c, (u8*)CNC_APPEND_LOG_RING(t) + CNC_RING_DATA_START, CNC_APPEND_LOG_CAPACITY(t),
                                      CNC_APPEND_LOG_COMMIT_AT(t), CNC_APPEND_LOG_BODY_LEN(t), CNC_APPEND_LOG_TAG(t),
                                      CNC_APPEND_LOG_EPOCH(t), CNC_APPEND_LOG_EPOCH_START(t),
                                      CNC_APPEND_LOG_NRECORDS(t));
                }
                if (cnc_gtid() == 0) {
                    volatile u64* words = (volatile u64*)CNC_APPEND_LOG_RING(t);
                    __threadfence_system();
                    words[CNC_RING_WRITTEN] = CNC_APPEND_LOG_WRITTEN(t);
                    if (CNC_APPEND_LOG_EPOCH(t) != 0) {
                        words[CNC_RING_COMMITTED_EPOCH] = CNC_APPEND_LOG_EPOCH(t);
                        words[CNC_RING_COMMITTED] = CNC_APPEND_LOG_WRITTEN(t);
                    }
                }
                break;
            case CNC_T_COMPUTE:
                cnc_compute(t, c);
                break;
            case CNC_T_CHECKPOINT:
            case CNC_T_CHECKPOINT_COMMIT:
            case CNC_T_RECOVER:
            case CNC_T_SCAN:
            case CNC_T_SCAN_COMMIT:
                switch (t.handler) {
                    CNC_HANDLER_CASES
                    default: cnc_fail(c, CNC_ERR_BAD_HANDLER);
                }
                break;
            default:
                cnc_fail(c, CNC_ERR_BAD_TASK);
        }

        // 3. all blocks done: make the effects visible, then retire the ticket
        //    (a FENCE_WAIT that yielded is not retired: every block parks).
        __syncthreads();
        if (threadIdx.x == 0) __threadfence_system();
        cnc_grid_sync(grid);
        if (t.kind == CNC_T_FENCE_WAIT) {
            __shared__ u64 s_wait_yield;
            if (threadIdx.x == 0) s_wait_yield = *(volatile u64*)&grid->fence_yield;
            __syncthreads();
            if (s_wait_yield != 0) break;
        }
        if (t.kind == CNC_T_CHECKPOINT_COMMIT && blockIdx.x == 0) {
            // The COMMIT record ends at the published `written`; its body
            // length, and the epoch's start and record count, come in the high halves.
            const u64 len = CNC_CHECKPOINT_COMMIT_BODY_LEN(t),
                      at = CNC_PUBLISH_WRITTEN(t) - CNC_REC_HEADER - ((len + 7) & ~7ull);
            cnc_commit_header(c, (u8*)CNC_CHECKPOINT_COMMIT_DATA(t), CNC_CHECKPOINT_COMMIT_CAPACITY(t), at, len,
                              CNC_CHECKPOINT_COMMIT_TAG(t), CNC_PUBLISH_EPOCH(t),
                              at - CNC_CHECKPOINT_COMMIT_COMMIT_OFFSET(t), CNC_CHECKPOINT_COMMIT_COMMIT_RECORDS(t));
        }
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            // Fused epilogue of CHECKPOINT tasks (the PUBLISH fields): publish the
            // log once every block's records are visible. The ring header sits
            // right before its data area (the data field, word 0 of both layouts).
            if ((t.kind == CNC_T_CHECKPOINT || t.kind == CNC_T_CHECKPOINT_COMMIT) && CNC_PUBLISH_WRITTEN(t) != 0) {
                volatile u64* words = (volatile u64*)(CNC_CHECKPOINT_KV_DATA(t) - CNC_RING_DATA_START);
                words[CNC_RING_WRITTEN] = CNC_PUBLISH_WRITTEN(t);
                if (CNC_PUBLISH_EPOCH(t) != 0) {
                    words[CNC_RING_COMMITTED_EPOCH] = CNC_PUBLISH_EPOCH(t);
                    words[CNC_RING_COMMITTED] = CNC_PUBLISH_WRITTEN(t);
                }
            }
            ctl->head = ticket + 1;
            __threadfence_system();
        }
        ++ticket;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        ctl->parks = ctl->parks + 1;
        ctl->state = CNC_PARKED;
        __threadfence_system();
    }
}
