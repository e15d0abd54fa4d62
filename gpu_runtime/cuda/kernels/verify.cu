// Restore spans on the device (gpu_runtime/cuda/restore.py,
// restore_verify="device"). The host reads log records into pinned memory
// without summing them and copies each span to a device staging buffer;
// cnc_payload_sums sums every record's whole payload words there (the
// definition of gpu_runtime/checksum.py for the record's format version,
// before its finalizer); the host adds the tail bytes, finalizes and compares,
// and only then lets the span be scattered into its region: by the copy
// engine, RECOVER tasks, or cnc_scatter_rows (below). A sum mod 2^64 is
// associative, so blocks add partial sums atomically.
#include "concordia.cuh"

// stage: the span's bytes as in the segment file; recs: per record u64
// {byte offset of its payload in stage, whole payload words, with bit 63 set
// for a record of format version 1 (span_tables.py's SUM_V1)}, read from mapped
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

// Rows [0, rows) of one record, each `width` bytes from `src` (back to back)
// to `dst` (`pitch` apart), by the block's threads in words of type W.
template <typename W>
__device__ __forceinline__ void cnc_copy_rows(u64 src, u64 dst, u64 width, u64 pitch, u64 rows) {
    const u64 words = width / sizeof(W);
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const W* s = (const W*)(src + r * width);
        W* d = (W*)(dst + r * pitch);
        for (u64 j = threadIdx.x; j < words; j += blockDim.x) d[j] = s[j];
    }
}

// The scatter of a verified span from its staging buffer into its region
// (restore_engine="kernel"): one launch a span where the copy engine takes a
// copy call per record. recs: per record 5 u64 {source address, destination
// address, bytes per row, destination pitch, rows} (span_tables.py), read from
// mapped pinned memory. Launched on the restore stream after the host found
// every checksum of the span right, so no byte of a span that fails reaches
// the region. Grid: (row blocks, records); the widest words that the
// addresses, width and pitch all allow.
extern "C" __global__ void __launch_bounds__(256) cnc_scatter_rows(const u64* recs) {
    const u64* e = recs + 5 * blockIdx.y;
    const u64 src = e[0], dst = e[1], width = e[2], pitch = e[3], rows = e[4];
    const u64 align = src | dst | width | pitch;
    if ((align & 15) == 0) cnc_copy_rows<uint4>(src, dst, width, pitch, rows);
    else if ((align & 7) == 0) cnc_copy_rows<u64>(src, dst, width, pitch, rows);
    else if ((align & 3) == 0) cnc_copy_rows<unsigned int>(src, dst, width, pitch, rows);
    else cnc_copy_rows<u8>(src, dst, width, pitch, rows);
}
