/* Shared by the fault round-trip benchmark's C toucher and C reference handler.
 *
 * The toucher connects to the handler's Unix socket and sends one struct hello with
 * its uffd attached (SCM_RIGHTS). The region is [base, base+size) plus one sentinel
 * page at base+size: the toucher touches the sentinel when it is done, and a handler
 * that sees that fault answers it with a zero page and stops.
 */
#ifndef PAGEIN_BENCH_COMMON_H
#define PAGEIN_BENCH_COMMON_H

#include <stdint.h>

#define MODE_FAULT 0 /* serve one block per fault */
#define MODE_BULK 1  /* populate the whole region with 2 MiB copies, then send "D" */
#define BULK_CHUNK (2u << 20)
#define SEED 0x9E3779B97F4A7C15ull

struct hello {
    uint64_t base;
    uint64_t size;
    uint64_t block;
    uint64_t mode;
};

/* The file content: the u64 at byte offset off is off ^ SEED. */
static inline uint64_t word_at(uint64_t off) { return off ^ SEED; }

#endif
