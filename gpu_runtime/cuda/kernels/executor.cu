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
#include "executor_common.cuh"
#include "handler_kv.cuh"
#include "handler_pages.cuh"

#ifndef CNC_HANDLER_CASES
#define CNC_HANDLER_CASES
#endif

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
        acc += cnc_term(*(volatile const u64*)(data + (at + CNC_REC_HEADER + 8 * k) % cap), k);
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
