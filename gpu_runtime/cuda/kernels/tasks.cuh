// GENERATED from gpu_runtime/cuda/tasks.py by `python -m gpu_runtime.cuda.tasks`: do not edit.
// Accessors of task argument fields; the kernels name fields only through these.
#pragma once

#define CNC_TASK_VERSION 1

enum CncTaskKind {
    CNC_T_NOP = 0,
    CNC_T_FENCE_WAIT = 1,
    CNC_T_CHECKPOINT = 2,
    CNC_T_APPEND_LOG = 3,
    CNC_T_RECOVER = 4,
    CNC_T_SCAN = 5,
    CNC_T_COMPUTE = 6,
    CNC_T_CHECKPOINT_COMMIT = 7,
    CNC_T_SCAN_COMMIT = 8,
};

// FENCE fields, at the same words in every kind that has them
#define CNC_FENCE_WORD(t) ((t).a[8])  // device u64 the caller's stream writes (0 with fence_value 0: no fence)
#define CNC_FENCE_VALUE(t) ((t).a[9])  // value the fence word must reach; 0: no fence
#define CNC_FENCE_TIMEOUT_NS(t) ((t).a[10])  // fence wait timeout, counted across yields

// PUBLISH fields, at the same words in every kind that has them
#define CNC_PUBLISH_WRITTEN(t) ((t).a[11])  // new ring `written` once the task's records are visible (0: none)
#define CNC_PUBLISH_EPOCH(t) ((t).a[12])  // with publish_written: also publish this committed epoch (0: data only)

// TASK fields, at the same words in every kind that has them
#define CNC_TASK_REGION(t) ((t).a[13])  // operator-table index of the region

// NOP (kind 0): out[index] += 1 (tests)
#define CNC_NOP_OUT(t) ((t).a[0])  // device u64 array
#define CNC_NOP_INDEX(t) ((t).a[1])  // word to increment

// FENCE_WAIT (kind 1): wait until *word >= value (yields like the prologue)
#define CNC_FENCE_WAIT_WORD(t) ((t).a[0])  // device u64
#define CNC_FENCE_WAIT_VALUE(t) ((t).a[1])  // value to reach
#define CNC_FENCE_WAIT_TIMEOUT_NS(t) ((t).a[2])  // timeout, counted across yields

// CHECKPOINT_KV (kind 2): kv handler: rows [t0, t1) of the region as ROWS records at log0 (planner chunking)
#define CNC_CHECKPOINT_KV_DATA(t) ((t).a[0])  // ring data area (device address of the mapped ring)
#define CNC_CHECKPOINT_KV_CAPACITY(t) ((t).a[1])  // ring data capacity in bytes
#define CNC_CHECKPOINT_KV_EPOCH(t) ((t).a[2])  // epoch of the records
#define CNC_CHECKPOINT_KV_T0(t) ((t).a[3] & 0xFFFFFFFFull)  // first row
#define CNC_CHECKPOINT_KV_T1(t) ((t).a[4] & 0xFFFFFFFFull)  // end row (exclusive)
#define CNC_CHECKPOINT_KV_PER(t) ((t).a[5] & 0xFFFFFFFFull)  // rows per record (planner.rows_per_record)
#define CNC_CHECKPOINT_KV_LOG0(t) ((t).a[6])  // log offset of the first record; record k at log0 + k * record_size(per rows)
#define CNC_CHECKPOINT_KV_TAG(t) ((t).a[7])  // session tag

// CHECKPOINT_COMMIT (kind 7): CHECKPOINT_KV that then makes its epoch's COMMIT header (body stored by the host) and publishes; the COMMIT record ends at publish_written
#define CNC_CHECKPOINT_COMMIT_DATA(t) ((t).a[0])  // ring data area (device address of the mapped ring)
#define CNC_CHECKPOINT_COMMIT_CAPACITY(t) ((t).a[1])  // ring data capacity in bytes
#define CNC_CHECKPOINT_COMMIT_EPOCH(t) ((t).a[2])  // epoch of the records
#define CNC_CHECKPOINT_COMMIT_T0(t) ((t).a[3] & 0xFFFFFFFFull)  // first row
#define CNC_CHECKPOINT_COMMIT_T1(t) ((t).a[4] & 0xFFFFFFFFull)  // end row (exclusive)
#define CNC_CHECKPOINT_COMMIT_PER(t) ((t).a[5] & 0xFFFFFFFFull)  // rows per record (planner.rows_per_record)
#define CNC_CHECKPOINT_COMMIT_LOG0(t) ((t).a[6])  // log offset of the first record; record k at log0 + k * record_size(per rows)
#define CNC_CHECKPOINT_COMMIT_TAG(t) ((t).a[7])  // session tag
#define CNC_CHECKPOINT_COMMIT_COMMIT_RECORDS(t) ((t).a[3] >> 32)  // data records of the epoch (the COMMIT's aux)
#define CNC_CHECKPOINT_COMMIT_COMMIT_OFFSET(t) ((t).a[4] >> 32)  // bytes from the epoch's first record to the COMMIT record
#define CNC_CHECKPOINT_COMMIT_BODY_LEN(t) ((t).a[5] >> 32)  // COMMIT body bytes

// CHECKPOINT_PAGES (kind 2): pages handler: copy a table of dirty runs as PAGES records
#define CNC_CHECKPOINT_PAGES_DATA(t) ((t).a[0])  // ring data area
#define CNC_CHECKPOINT_PAGES_CAPACITY(t) ((t).a[1])  // ring data capacity
#define CNC_CHECKPOINT_PAGES_EPOCH(t) ((t).a[2])  // epoch of the records
#define CNC_CHECKPOINT_PAGES_RUNS(t) ((t).a[3])  // mapped pinned u64 triples: byte offset, bytes, log offset
#define CNC_CHECKPOINT_PAGES_NRUNS(t) ((t).a[4])  // runs in the table
#define CNC_CHECKPOINT_PAGES_TAG(t) ((t).a[5])  // session tag
#define CNC_CHECKPOINT_PAGES_SMALL(t) ((t).a[6])  // 1: every run at most 256 KiB (a block per run); 0: the grid per run

// APPEND_LOG (kind 3): publish bytes the host stored beyond `written`; with body_len, make the COMMIT header there
#define CNC_APPEND_LOG_RING(t) ((t).a[0])  // ring header (device address); data follows at +4096
#define CNC_APPEND_LOG_WRITTEN(t) ((t).a[1])  // new `written`
#define CNC_APPEND_LOG_EPOCH(t) ((t).a[2])  // commit epoch (0: publish data only)
#define CNC_APPEND_LOG_COMMIT_AT(t) ((t).a[3])  // log offset of the COMMIT record
#define CNC_APPEND_LOG_BODY_LEN(t) ((t).a[4])  // COMMIT body bytes (0: the host made the header)
#define CNC_APPEND_LOG_EPOCH_START(t) ((t).a[5])  // log offset of the epoch's first record
#define CNC_APPEND_LOG_NRECORDS(t) ((t).a[6])  // data records of the epoch
#define CNC_APPEND_LOG_TAG(t) ((t).a[7])  // session tag
#define CNC_APPEND_LOG_CAPACITY(t) ((t).a[8])  // ring data capacity

// RECOVER (kind 4): apply one record whose payload is at src
#define CNC_RECOVER_SRC(t) ((t).a[0])  // payload (mapped pinned or device memory)
#define CNC_RECOVER_TYPE(t) ((t).a[1])  // record type
#define CNC_RECOVER_OFFSET(t) ((t).a[2])  // record offset field
#define CNC_RECOVER_AUX(t) ((t).a[3])  // record aux field
#define CNC_RECOVER_LENGTH(t) ((t).a[4])  // payload bytes

// SCAN (kind 5): pages handler: hash every page, write the dirty bitmap
#define CNC_SCAN_ALL_DIRTY(t) ((t).a[0])  // 1: mark every page dirty

// COMPUTE (kind 6): small device ops for tests (cnc_compute)
#define CNC_COMPUTE_OP(t) ((t).a[0])  // 0 fill u32, 1 axpy f32, 2 scale f32
#define CNC_COMPUTE_N(t) ((t).a[1])  // elements
#define CNC_COMPUTE_X(t) ((t).a[2])  // op 0: pointer; 1, 2: alpha bits
#define CNC_COMPUTE_Y(t) ((t).a[3])  // op 0: value; 1: x; 2: pointer
#define CNC_COMPUTE_Z(t) ((t).a[4])  // op 1: y

// SCAN_COMMIT (kind 8): a whole pages epoch: scan, plan and copy the dirty runs into [log0, log0 + span), COMMIT, publish
#define CNC_SCAN_COMMIT_DATA(t) ((t).a[0])  // ring data area
#define CNC_SCAN_COMMIT_CAPACITY(t) ((t).a[1])  // ring data capacity
#define CNC_SCAN_COMMIT_EPOCH(t) ((t).a[2])  // epoch
#define CNC_SCAN_COMMIT_LOG0(t) ((t).a[3])  // log offset of the reserved span
#define CNC_SCAN_COMMIT_SPAN(t) ((t).a[4])  // bytes reserved (data records and COMMIT)
#define CNC_SCAN_COMMIT_TAG(t) ((t).a[5])  // session tag
#define CNC_SCAN_COMMIT_PER(t) ((t).a[6] & 0xFFFFFFFFull)  // pages per record (planner.pages_per_record)
#define CNC_SCAN_COMMIT_BODY_LEN(t) ((t).a[6] >> 32)  // COMMIT body bytes
#define CNC_SCAN_COMMIT_SCRATCH(t) ((t).a[7])  // device scratch: records, end, overflow, chunks, then the record table
#define CNC_SCAN_COMMIT_BODY(t) ((t).a[11])  // COMMIT body (mapped pinned, zero-padded to whole words)
#define CNC_SCAN_COMMIT_RESULT(t) ((t).a[12])  // mapped pinned u64[2]: status (1 committed, 2 did not fit), end
