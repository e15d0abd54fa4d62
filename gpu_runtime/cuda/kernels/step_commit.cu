// The in-step producer (gpu_runtime/cuda/step_commit.py): one launch per model
// step, captured into the step's CUDA graph, that commits an epoch into the
// host log ring with no host work: it reads the step's new length from device
// memory, stores the step's input tokens into the tokens region, and every
// `every` rows appends the new rows of the kv and tokens regions as ROWS
// records, then the COMMIT record (its JSON body formatted here from a
// template), and publishes the epoch in the ring header. Its records are the
// ones the host writes for the same commit (records.py framing, planner.py row
// spans): the logs are byte-identical (tests/test_step_commit_gpu.py).
//
// Protocol with the host (state words S_*, step_commit.py mirrors them):
// * The host arms the producer (S_ARMED = 1, and the slot pointing at it) with
//   the writer's position, the session's epoch and the committed length, in
//   stream order before the first launch, and owns none of the ring's
//   reservation while it is armed; disarming clears the slot.
// * Launches run in stream order. Every block decides the same thing from
//   values fixed for the launch (the new length L, S_COMMITTED, P_EVERY); the
//   last block to finish (an arrival counter) writes the headers and the
//   COMMIT, publishes and advances the state, so no block of a launch reads
//   state another block of it changed.
// * A failure (ring full past the timeout, ownership lost, rows out of range,
//   unarmed) sets S_ERROR and commits nothing from then on; the host reads the
//   state after the step's stream has run and raises. Epochs published before
//   the failure stand.
// * The ring header's owner and consumed words live in host memory, across
//   PCIe. cnc_step_check, launched just before cnc_step_commit on the same
//   stream where the launch has more than a few blocks (step_commit.py,
//   ring_check), reads them once (one thread, before any of the launch's
//   stores) into S_SEEN_* and sets S_SEEN_VALID; the producer's blocks then
//   read device memory. Read by every block instead, the reads cost 24 and
//   67 us a step at 1B and 8B batch 8 (H100, 2026-12-07), growing with the
//   bytes written; likely because a read does not pass the posted writes
//   ahead of it, so a block that starts after others began streaming rows to
//   host memory waits for them. With the check the whole launch took 26.7
//   and 52.2 us against 41.9 and 107.1. The seen values are as fresh as the
//   per-block reads: same launch, microseconds before the stores. A stale
//   consumed only under-states the room, and a ring that looks full is
//   polled fresh; the last block still re-reads the owner before it
//   publishes. Without a valid S_SEEN (the check not launched), every block
//   reads the ring itself. Both kernels find the armed producer through the
//   slot, so a graph captured with or without the check replays correctly
//   for any producer.
// * A takeover: each block used to read the owner just before its own
//   stores; with the check, every block trusts the owner read at the launch's
//   start, so a block of a launch that began before a takeover may still
//   store its rows after it, for up to the rest of the launch (tens of us).
//   Nothing of such a launch is published: the last block reads the owner
//   again before it writes any header or the COMMIT. The stray bytes can
//   only land in payload places past the stale producer's last commit; the
//   new owner (logring.py reset, then its own records from the same offset)
//   writes there only after its open's catalog and segment work, which takes
//   milliseconds, not microseconds (an argument from timing, as the old
//   per-block window was); and a payload overwritten anyway fails its
//   checksum in the flusher's walk: an error, never a wrong commit.
#include "concordia.cuh"

#define CNC_STEP_BLOCK 256
#define CNC_STEP_MAX_RECORDS 64  // data records of one epoch (step_commit.py, MAX_RECORDS)
#define CNC_STEP_MAX_BODY 4096   // bytes of a COMMIT body (step_commit.py, MAX_BODY)
#define CNC_STEP_MAX_SLOTS 8     // places of the length the host lists (step_commit.py, MAX_SLOTS)

// Diagnostic builds only (bench/bench_step_commit_gpu.py, never the runtime's
// build): CNC_STEP_PROBE names parts of a commit to leave out, so that the
// rest can be timed. A probe build writes a log nobody may read; the benchmark
// gives it a ring no flusher drains.
#ifndef CNC_STEP_PROBE
#define CNC_STEP_PROBE 0
#endif
#define PROBE_NO_RING_READS 1  // no reads of the ring header (owner, consumed): owner, room assumed
#define PROBE_NO_SYS_FENCES 2  // no __threadfence_system before and after publishing
#define PROBE_NO_BODY 4        // the COMMIT body not formatted (its words whatever shared memory held)
#define PROBE_NO_ROWS 8        // the data records' payloads not copied
#define PROBE_NO_HEADERS 16    // the data records' headers not written
#define CNC_PROBE(bit) ((CNC_STEP_PROBE & (bit)) != 0)

// State words (device memory; step_commit.py STATE_*).
#define S_ARMED 0
#define S_NEXT 1       // log offset of the next record (the writer's position)
#define S_EPOCH 2      // last committed epoch
#define S_COMMITTED 3  // rows of the kv and tokens regions committed
#define S_ERROR 4      // 0, or the first failure (ERR_*)
#define S_ERROR_INFO 5 // what the failure saw (a length, an owner token)
#define S_ARRIVED 6    // blocks of the current launch that finished their share
#define S_COMMITS 7    // epochs this producer committed
#define S_STEPS 8      // launches
#define S_SEEN_VALID 9 // 1: S_SEEN_OWNER/CONSUMED were read for this launch (cnc_step_check); the launch clears it
#define S_SEEN_OWNER 10
#define S_SEEN_CONSUMED 11
#define S_ACC 16       // per data record checksum partial sums, zero between launches

#define ERR_UNARMED 1ull
#define ERR_RING_FULL 2ull
#define ERR_FENCED 3ull
#define ERR_ROWS 4ull
#define ERR_TOO_BIG 5ull

// Parameter words (device memory, written once at arming; step_commit.py P_*).
#define P_HEADER 0     // device address of the ring header (mapped host memory)
#define P_CAPACITY 1
#define P_TAG 2
#define P_OWNER 3      // the session owner's token: the ring header must still hold it
#define P_EVERY 4
#define P_TIMEOUT_NS 5
#define P_KV_BASE 6
#define P_KV_OUTER 7
#define P_KV_ROWS 8
#define P_KV_ROW_BYTES 9
#define P_KV_PER 10
#define P_KV_REGION 11
#define P_TOK_BASE 12
#define P_TOK_OUTER 13
#define P_TOK_ROWS 14
#define P_TOK_PER 15
#define P_TOK_REGION 16
#define P_TEMPLATE_LEN 17  // bytes of the body template (a 0 byte marks each place of the length)
#define P_SLOTS 18         // places of the length in the template
#define P_SLOT_AT 19       // their offsets in the template, ascending (CNC_STEP_MAX_SLOTS words; unset past that)
#define P_TEMPLATE 32      // the template bytes from here

__device__ __forceinline__ u64 cnc_digits(u64 v) {
    u64 n = 1;
    while (v >= 10) { v /= 10; ++n; }
    return n;
}

// Log bytes of an epoch of rows [c, L): the kv and tokens records (each cut
// every `per` rows from c, as planner.row_spans cuts them), then the COMMIT.
struct CncStepPlan {
    u64 nkv, ntok, kv_full, tok_full, kv_bytes, tok_bytes, body_len;
};

__device__ CncStepPlan cnc_step_plan(const u64* P, u64 c, u64 L) {
    CncStepPlan p;
    const u64 n = L - c;
    const u64 kper = P[P_KV_PER], tper = P[P_TOK_PER];
    p.nkv = (n + kper - 1) / kper;
    p.ntok = (n + tper - 1) / tper;
    p.kv_full = CNC_REC_HEADER + P[P_KV_OUTER] * kper * P[P_KV_ROW_BYTES];
    p.tok_full = CNC_REC_HEADER + P[P_TOK_OUTER] * tper * 8;
    const u64 kv_last = n - (p.nkv - 1) * kper, tok_last = n - (p.ntok - 1) * tper;
    p.kv_bytes = (p.nkv - 1) * p.kv_full + CNC_REC_HEADER + P[P_KV_OUTER] * kv_last * P[P_KV_ROW_BYTES];
    p.tok_bytes = (p.ntok - 1) * p.tok_full + CNC_REC_HEADER + P[P_TOK_OUTER] * tok_last * 8;
    p.body_len = P[P_TEMPLATE_LEN] - P[P_SLOTS] + P[P_SLOTS] * cnc_digits(L);
    return p;
}

// Whether a launch that saw new length L commits an epoch (every block and
// cnc_step_check decide it alike, from values no block changes before the
// launch's last block runs): armed, no failure, and L reached the committed
// length plus `every`. Lengths out of range count as committing (the producer
// then reports them).
__device__ __forceinline__ bool cnc_step_commits(const u64* P, const u64* S, u64 L) {
    if (S[S_ERROR] != 0) return false;
    const u64 c = S[S_COMMITTED];
    return !(S[S_ARMED] != 0 && L <= c + P[P_EVERY] - 1 && L >= c);
}

// Token of row `row` of sequence `o`: this step's input for its rows, the
// tokens region for older ones (stored by an earlier launch).
__device__ __forceinline__ u64 cnc_token(const u64* P, const long long* ids, u64 ids_stride, u64 n_in, u64 L,
                                         u64 o, u64 row) {
    if (row + n_in >= L) return (u64)ids[o * ids_stride + (row + n_in - L)];
    return ((const u64*)P[P_TOK_BASE])[o * P[P_TOK_ROWS] + row];
}

// `slot` (never freed, one per process) holds the armed producer's parameter
// and state addresses, or zeros: a CUDA graph bakes this launch's arguments,
// and a graph recorded during one call may be replayed during a later one
// (torch's allocator gives a new cache the old one's addresses), so the
// producer is looked up here at run time, never baked.
extern "C" __global__ void __launch_bounds__(CNC_STEP_BLOCK)
cnc_step_commit(const u64* slot, const long long* length, const long long* ids, u64 n_in, u64 ids_stride) {
    const u64* P = (const u64*)slot[0];
    u64* S = (u64*)slot[1];
    if (P == 0 || S == 0) return;  // nothing armed: a stale replay, or a step outside durable_generate
    __shared__ u32 crc_table[256];
    __shared__ u64 body_words[CNC_STEP_MAX_BODY / 8];
    __shared__ int go, last;
    const u64 L = (u64)*length;
    const u64 c = S[S_COMMITTED];
    const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x, nthreads = (u64)gridDim.x * blockDim.x;

    // 1. The step's tokens into the tokens region (rows [L - n_in, L)), every launch.
    if (L >= n_in && L <= P[P_TOK_ROWS]) {
        u64* tok = (u64*)P[P_TOK_BASE];
        for (u64 k = tid; k < P[P_TOK_OUTER] * n_in; k += nthreads) {
            const u64 o = k / n_in, j = k - o * n_in;
            tok[o * P[P_TOK_ROWS] + L - n_in + j] = (u64)ids[o * ids_stride + j];
        }
    }
    if (tid == 0) S[S_STEPS] += 1;
    // 2. Commit only every `every` rows (the same decision in every block).
    // Stopped by an earlier failure: nothing more (its committed length no
    // longer moves, so the rows it would plan grow without bound). A block of
    // this launch seeing a failure another one just set returns too; the
    // arrival count then never completes, which only this dead producer used.
    if (!cnc_step_commits(P, S, L)) return;
    const bool armed = S[S_ARMED] != 0;
    if (!armed || L < c || L > P[P_KV_ROWS] || L > P[P_TOK_ROWS]) {
        if (tid == 0 && S[S_ERROR] == 0) {
            S[S_ERROR_INFO] = L;
            S[S_ERROR] = armed ? ERR_ROWS : ERR_UNARMED;
        }
        return;
    }
    const CncStepPlan p = cnc_step_plan(P, c, L);
    const u64 start = S[S_NEXT];
    const u64 commit_at = start + p.kv_bytes + p.tok_bytes;
    const u64 end = commit_at + CNC_REC_HEADER + ((p.body_len + 7) & ~7ull);
    volatile u64* ring = (volatile u64*)P[P_HEADER];
    u8* data = (u8*)P[P_HEADER] + CNC_RING_DATA_START;
    const u64 cap = P[P_CAPACITY];

    // 3. Room and ownership, checked by each block before it stores anything.
    if (threadIdx.x == 0) {
        int ok = S[S_ERROR] == 0;
        if (ok && (p.nkv + p.ntok > CNC_STEP_MAX_RECORDS || p.body_len > CNC_STEP_MAX_BODY || end - start > cap / 2)) {
            if (blockIdx.x == 0) { S[S_ERROR_INFO] = end - start; S[S_ERROR] = ERR_TOO_BIG; }
            ok = 0;
        }
        // The words cnc_step_check read for this launch, else the ring's own.
        const bool seen = S[S_SEEN_VALID] != 0;
        if (ok && !CNC_PROBE(PROBE_NO_RING_READS) &&
            (seen ? S[S_SEEN_OWNER] : ring[CNC_RING_OWNER_TOKEN]) != P[P_OWNER]) {
            ok = 0;  // fenced: the last block reports it
        }
        if (ok && !CNC_PROBE(PROBE_NO_RING_READS) &&
            end - (seen ? S[S_SEEN_CONSUMED] : ring[CNC_RING_CONSUMED]) > cap) {
            const u64 t0 = cnc_now();
            while (end - ring[CNC_RING_CONSUMED] > cap) {
                if (ring[CNC_RING_OWNER_TOKEN] != P[P_OWNER]) {  // taken over: its flusher no longer drains
                    ok = 0;
                    break;
                }
                if (cnc_now() - t0 > P[P_TIMEOUT_NS]) {
                    S[S_ERROR_INFO] = ring[CNC_RING_CONSUMED];
                    atomicCAS((unsigned long long*)&S[S_ERROR], 0ull, ERR_RING_FULL);
                    ok = 0;
                    break;
                }
                __nanosleep(1000);
            }
        }
        go = ok;
    }
    __syncthreads();

    // 4. The data records' payloads, spread over every thread of the grid;
    //    checksums summed per record across blocks.
    if (go && !CNC_PROBE(PROBE_NO_ROWS)) {
        const u64 kper = P[P_KV_PER], rb = P[P_KV_ROW_BYTES], outer = P[P_KV_OUTER];
        for (u64 rec = 0; rec < p.nkv; ++rec) {
            const u64 r0 = c + rec * kper, cnt = min(kper, L - r0);
            const u64 span_words = cnt * rb / 8, total = outer * span_words;
            const u64 pos = (start + rec * p.kv_full + CNC_REC_HEADER) % cap;
            const u64* base = (const u64*)P[P_KV_BASE];
            u64 acc = 0;
            for (u64 k = tid; k < total; k += nthreads) {
                const u64 o = k / span_words, w = k - o * span_words;
                const u64 x = base[(o * P[P_KV_ROWS] + r0) * (rb / 8) + w];
                acc += cnc_term(x, k);
                u64 i = pos + 8 * k;
                if (i >= cap) i -= cap;
                *(volatile u64*)(data + i) = x;
            }
            const u64 sum = cnc_block_sum(acc);
            if (threadIdx.x == 0 && sum) atomicAdd((unsigned long long*)&S[S_ACC + rec], sum);
        }
        const u64 tper = P[P_TOK_PER], touter = P[P_TOK_OUTER];
        for (u64 rec = 0; rec < p.ntok; ++rec) {
            const u64 r0 = c + rec * tper, cnt = min(tper, L - r0), total = touter * cnt;
            const u64 pos = (start + p.kv_bytes + rec * p.tok_full + CNC_REC_HEADER) % cap;
            u64 acc = 0;
            for (u64 k = tid; k < total; k += nthreads) {
                const u64 o = k / cnt, row = r0 + (k - o * cnt);
                const u64 x = cnc_token(P, ids, ids_stride, n_in, L, o, row);
                acc += cnc_term(x, k);
                u64 i = pos + 8 * k;
                if (i >= cap) i -= cap;
                *(volatile u64*)(data + i) = x;
            }
            const u64 sum = cnc_block_sum(acc);
            if (threadIdx.x == 0 && sum) atomicAdd((unsigned long long*)&S[S_ACC + p.nkv + rec], sum);
        }
    }

    // 5. The last block to arrive writes the headers and the COMMIT, publishes.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd((unsigned long long*)&S[S_ARRIVED], 1ull) == gridDim.x - 1;
        if (last) __threadfence();
    }
    __syncthreads();
    if (!last) return;
    cnc_crc_table(crc_table);
    const u64 nrec = p.nkv + p.ntok;
    // One decision for the block (its threads then meet the same barriers).
    if (threadIdx.x == 0) {
        go = S[S_ERROR] == 0 && (CNC_PROBE(PROBE_NO_RING_READS) || ring[CNC_RING_OWNER_TOKEN] == P[P_OWNER]);
    }
    __syncthreads();
    const u64 epoch = S[S_EPOCH] + 1;
    if (go) {
        for (u64 rec = threadIdx.x; rec < nrec && !CNC_PROBE(PROBE_NO_HEADERS); rec += blockDim.x) {
            const bool kv = rec < p.nkv;
            const u64 k = kv ? rec : rec - p.nkv;
            const u64 per = kv ? P[P_KV_PER] : P[P_TOK_PER];
            const u64 r0 = c + k * per, cnt = min(per, L - r0);
            const u64 len = kv ? P[P_KV_OUTER] * cnt * P[P_KV_ROW_BYTES] : P[P_TOK_OUTER] * cnt * 8;
            const u64 at = kv ? start + k * p.kv_full : start + p.kv_bytes + k * p.tok_full;
            cnc_write_header(crc_table, data, cap, at, CNC_REC_ROWS, P[P_TAG], epoch,
                             (u32)(kv ? P[P_KV_REGION] : P[P_TOK_REGION]), r0, len, cnt,
                             cnc_splitmix64(S[S_ACC + rec] ^ len));
        }
        // The COMMIT body: the template with the decimal of L at each 0 byte.
        // Every thread of the block takes a share of the template's bytes: a
        // byte lands `nd - 1` places further on per 0 byte before it, whose
        // offsets the host listed (P_SLOT_AT). One thread walking a template
        // of kilobytes (a conversation's meta) would be on every step's path.
        if (!CNC_PROBE(PROBE_NO_BODY)) {
            u8* b = (u8*)body_words;
            const u8* t = (const u8*)(P + P_TEMPLATE);
            const u64 nd = cnc_digits(L), slots = P[P_SLOTS], len = P[P_TEMPLATE_LEN];
            if (slots <= CNC_STEP_MAX_SLOTS) {
                for (u64 i = threadIdx.x; i < len; i += blockDim.x) {
                    u64 before = 0;
                    for (u64 k = 0; k < slots; ++k) before += P[P_SLOT_AT + k] < i;
                    const u64 o = i + before * (nd - 1);
                    if (t[i] == 0) {
                        u64 v = L;
                        for (u64 d = nd; d > 0; --d) { b[o + d - 1] = (u8)('0' + v % 10); v /= 10; }
                    } else {
                        b[o] = t[i];
                    }
                }
                // zero padding: the checksum and the ring take whole words
                for (u64 o = p.body_len + threadIdx.x; o < ((p.body_len + 7) & ~7ull); o += blockDim.x) b[o] = 0;
            } else if (threadIdx.x == 0) {  // more places than the host lists: one thread walks the template
                u64 o = 0;
                for (u64 i = 0; i < len; ++i) {
                    if (t[i] == 0) {
                        u64 v = L;
                        for (u64 d = nd; d > 0; --d) { b[o + d - 1] = (u8)('0' + v % 10); v /= 10; }
                        o += nd;
                    } else {
                        b[o++] = t[i];
                    }
                }
                while (o & 7) b[o++] = 0;
            }
        }
        __syncthreads();
        const u64 words = (p.body_len + 7) / 8;
        u64 acc = 0;
        for (u64 j = threadIdx.x; j < words; j += blockDim.x) {
            acc += cnc_term(body_words[j], j);
            cnc_ring_store(data, cap, commit_at + CNC_REC_HEADER + 8 * j, body_words[j]);
        }
        const u64 sum = cnc_block_sum(acc);
        if (threadIdx.x == 0) {
            cnc_write_header(crc_table, data, cap, commit_at, CNC_REC_COMMIT, P[P_TAG], epoch, 0, start,
                             p.body_len, nrec, cnc_splitmix64(sum ^ p.body_len));
            // Every record's bytes before the counters that publish them
            // (logring.py: written, then committed_epoch, then committed).
            if (!CNC_PROBE(PROBE_NO_SYS_FENCES)) __threadfence_system();
            if (CNC_PROBE(PROBE_NO_RING_READS) || ring[CNC_RING_OWNER_TOKEN] == P[P_OWNER]) {
                ring[CNC_RING_WRITTEN] = end;
                ring[CNC_RING_COMMITTED_EPOCH] = epoch;
                ring[CNC_RING_COMMITTED] = end;
                if (!CNC_PROBE(PROBE_NO_SYS_FENCES)) __threadfence_system();
                S[S_NEXT] = end;
                S[S_EPOCH] = epoch;
                S[S_COMMITTED] = L;
                S[S_COMMITS] += 1;
            } else {
                go = 0;
            }
        }
    }
    if (threadIdx.x == 0) {
        if (!go && S[S_ERROR] == 0) {  // the only failure not reported yet: ownership lost
            S[S_ERROR_INFO] = ring[CNC_RING_OWNER_TOKEN];
            S[S_ERROR] = ERR_FENCED;
        }
        S[S_ARRIVED] = 0;
        S[S_SEEN_VALID] = 0;  // read again for the next launch
    }
    for (u64 rec = threadIdx.x; rec < nrec && rec < CNC_STEP_MAX_RECORDS; rec += blockDim.x) S[S_ACC + rec] = 0;
}

// Reads the ring header's owner and consumed words for the cnc_step_commit
// launched next on the same stream, when that launch commits (protocol at the
// top). One thread; captured into the step's graph with the producer.
extern "C" __global__ void cnc_step_check(const u64* slot, const long long* length) {
    const u64* P = (const u64*)slot[0];
    u64* S = (u64*)slot[1];
    if (P == 0 || S == 0 || threadIdx.x != 0) return;
    if (CNC_PROBE(PROBE_NO_RING_READS) || !cnc_step_commits(P, S, (u64)*length)) return;
    volatile const u64* ring = (volatile const u64*)P[P_HEADER];
    S[S_SEEN_OWNER] = ring[CNC_RING_OWNER_TOKEN];
    S[S_SEEN_CONSUMED] = ring[CNC_RING_CONSUMED];
    S[S_SEEN_VALID] = 1;
}
