// kv regions: the CHECKPOINT handler gathers rows [t0, t1) into ROWS records
// (laid out as plan.cuh / gpu_runtime/planner.py say); RECOVER scatters a
// restored record back. One instantiation per row size (CNC_KV cases).
#pragma once

#include "executor_common.cuh"
#include "plan.cuh"

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
                acc += cnc_term(x, k);
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
