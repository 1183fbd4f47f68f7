/*
 * The benchmark workload: fill memory, say ready, touch it in a pattern, print a checksum.
 *
 * args: [0] pattern (0 sequential, 1 random, 2 strided, 3 hot set in cold memory)
 *       [1] op (0 read, 1 write)   [2] region bytes (0 = the whole heap)
 *       [3] touches (0 = one per page, or pages/stride when strided)
 *       [4] stride in pages        [5] hot set percent   [6] seed
 * Region word w is filled with mix(seed + w). Touch t hits page p(t), word
 * p*512 + p%512; it adds mix(old + t) to the checksum and, when writing, stores
 * mix(seed + W + t) (W = words in the region). vCPU v handles the touches whose page is
 * v modulo the vCPU count, in order, so answers do not depend on the vCPU count.
 * The Python reference is src/pagein/vmm/reference.py.
 */
#include "pagein_guest.h"

#define MAX_VCPUS 16
#define PAGE_WORDS 512
#define GOLDEN 0x9e3779b97f4a7c15UL

enum { SEQUENTIAL, RANDOM, STRIDED, HOTSET };

static volatile u64 partial[MAX_VCPUS];

static u64 page_of(u64 t, u64 pattern, u64 pages, u64 stride, u64 hot, u64 rseed)
{
    switch (pattern) {
    case RANDOM: return pg_mix(t + rseed) % pages;
    case STRIDED: { u64 x = t * stride; return (x + x / pages) % pages; }
    case HOTSET: return (pg_mix(t + rseed) % hot) * (pages / hot);
    default: return t % pages;
    }
}

int guest_main(u64 vcpu, const struct pg_params *params)
{
    const u64 *a = params->args;
    u64 nv = params->vcpus, pattern = a[0], write = a[1], seed = a[6];
    u64 size = a[2] ? a[2] : params->heap_end - params->heap_start;
    u64 *mem = (u64 *)params->heap_start;
    u64 pages = size / 4096, words = size / 8;
    u64 stride = a[4] ? a[4] : 1;
    u64 hot = pages * a[5] / 100;
    u64 touches = a[3] ? a[3] : (pattern == STRIDED ? pages / stride : pages);
    u64 rseed = seed * GOLDEN;
    if (hot == 0) hot = 1;
    if (pages == 0 || pattern > HOTSET || nv > MAX_VCPUS ||
        params->heap_start + size > params->heap_end) {
        if (vcpu == 0) pg_puts("error: bad scan arguments or guest memory too small\n");
        return 2;
    }
    for (u64 w = words * vcpu / nv; w < words * (vcpu + 1) / nv; w++) mem[w] = pg_mix(seed + w);
    pg_barrier();
    if (vcpu == 0) pg_ready();
    u64 acc = 0;
    for (u64 t = 0; t < touches; t++) {
        u64 p = page_of(t, pattern, pages, stride, hot, rseed);
        if (p % nv != vcpu) continue;
        u64 w = p * PAGE_WORDS + p % PAGE_WORDS;
        acc += pg_mix(mem[w] + t);
        if (write) mem[w] = pg_mix(seed + words + t);
    }
    partial[vcpu] = acc;
    pg_barrier();
    if (vcpu == 0) {
        u64 total = 0;
        for (u64 v = 0; v < nv; v++) total += partial[v];
        pg_puts("scan pages ");
        pg_put_u64(pages);
        pg_puts(" touches ");
        pg_put_u64(touches);
        pg_puts(" checksum ");
        pg_put_hex(total);
        pg_putc('\n');
    }
    return 0;
}
