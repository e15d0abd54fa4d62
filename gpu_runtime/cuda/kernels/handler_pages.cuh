// pages regions: SCAN (page hashes, dirty bitmap), CHECKPOINT over a table of
// dirty runs, RECOVER, and with CNC_FUSED_PAGES the one-task SCAN_COMMIT
// (scan, plan the records with plan.cuh, copy, COMMIT). One instantiation per
// page size (CNC_PAGES cases).
#pragma once

#include "executor_common.cuh"
#include "plan.cuh"

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
// Four 32-bit words of a 16-byte load, each times its weight: the page hash
// sums 32-bit words, not 64-bit ones (gpu_runtime/pagehash.py says why: with
// 64-bit words two changes confined to the top bits could cancel, e.g. two
// sign flips of bit 63 always did).
__device__ __forceinline__ u64 cnc_hash16(ulonglong2 x, u64 w0, u64 w1, u64 w2, u64 w3) {
    return (x.x & 0xffffffffull) * w0 + (x.x >> 32) * w1 + (x.y & 0xffffffffull) * w2 + (x.y >> 32) * w3;
}

template <u64 PS>
__device__ void cnc_pages_scan(const CncRegion& r, bool all, u32* dbits) {
    // Page-hash weights (one per 32-bit word) from a shared table: splitmix64
    // per word would make the scan compute-bound (64-bit multiplies are emulated).
    constexpr u64 NW = PS / 4;
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
                const u64 w0 = TABLE ? wtab[4 * v] : cnc_weight(4 * v);
                const u64 w1 = TABLE ? wtab[4 * v + 1] : cnc_weight(4 * v + 1);
                const u64 w2 = TABLE ? wtab[4 * v + 2] : cnc_weight(4 * v + 2);
                const u64 w3 = TABLE ? wtab[4 * v + 3] : cnc_weight(4 * v + 3);
                if (v < n0) acc0 += cnc_hash16(page0[v], w0, w1, w2, w3);
                if (v < n1) acc1 += cnc_hash16(page1[v], w0, w1, w2, w3);
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
                acc += cnc_term(x, k);
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
