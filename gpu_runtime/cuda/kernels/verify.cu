// Payload checksums of restore spans on the device (gpu_runtime/cuda/restore.py,
// restore_verify="device"). The host reads log records into pinned memory
// without summing them and copies each span to a device staging buffer; this
// kernel sums every record's whole payload words there (the definition of
// gpu_runtime/checksum.py for the record's format version, before its
// finalizer); the host adds the tail bytes,
// finalizes and compares, and only then lets the span be scattered into its
// region. A sum mod 2^64 is associative, so blocks add partial sums atomically.
#include "concordia.cuh"

// stage: the span's bytes as in the segment file; recs: per record u64
// {byte offset of its payload in stage, whole payload words, with bit 63 set
// for a record of format version 1 (restore.py's _SUM_V1)}, read from mapped
// pinned memory; sums: one u64 per record, zeroed by the caller.
// Grid: (blocks per record, records); each block sums a strided share of its record.
extern "C" __global__ void __launch_bounds__(256) cnc_payload_sums(const u8* stage, const u64* recs, u64* sums) {
    const u64 off = recs[2 * blockIdx.y], entry = recs[2 * blockIdx.y + 1];
    const u64 words = entry & ~(1ull << 63);
    const bool v1 = entry >> 63;
    const u64* x = (const u64*)(stage + off);
    u64 acc = 0;
    for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < words; j += (u64)gridDim.x * blockDim.x) {
        acc += v1 ? cnc_term_v1(x[j], j) : cnc_term(x[j], j);
    }
    const u64 total = cnc_block_sum(acc);
    if (threadIdx.x == 0) atomicAdd(&sums[blockIdx.y], total);
}
