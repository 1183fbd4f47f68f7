/*
 * The pagein guest ABI: what a guest workload may ask of the VMM (port I/O, each access
 * one VM exit) and the parameter page the VMM fills before the first instruction.
 *
 * Kept in sync with src/pagein/vmm/abi.py (tests/kvm/test_guest_abi.py compares them).
 *
 * Entry: every vCPU starts at _start at CPL 3 with RDI = vCPU id, RSI = parameter page
 * address, RSP = top of its own stack. Guest-physical = guest-virtual (identity map).
 */
#ifndef PAGEIN_GUEST_H
#define PAGEIN_GUEST_H

#define PG_PORT_PUTC     0x0500 /* out8: one console byte */
#define PG_PORT_WRITE    0x0504 /* out32: address of a struct pg_buf to write to the console */
#define PG_PORT_READ     0x0508 /* out32: address of a struct pg_buf to fill with one input line */
#define PG_PORT_READY    0x050c /* out32: the guest is ready (a natural snapshot point) */
#define PG_PORT_EXIT     0x0510 /* out32: the VM ends with this status */
#define PG_PORT_BARRIER  0x0514 /* in32: wait until every vCPU arrived; PG_RETRY: call again */
#define PG_PORT_STOP     0x0518 /* out32: this vCPU is done, the others go on */

#define PG_RETRY  (-2)          /* the VMM paused the guest meanwhile: ask again */

#define PG_PARAMS_ADDR  0x200000
#define PG_MAGIC        0x4d564e4945474150 /* "PAGEINVM" as little-endian bytes */
#define PG_MAX_ARGS     24

#ifndef __ASSEMBLER__

typedef unsigned long u64;
typedef long s64;
typedef unsigned int u32;
typedef unsigned char u8;

/* Port arguments are 32-bit guest addresses: pass only stack or static buffers (< 16 MiB). */
struct pg_buf {
    u64 addr;    /* guest address of the bytes */
    u64 len;     /* bytes to write, or capacity to read into */
    s64 result;  /* READ: bytes stored (0 = end of input) or PG_RETRY */
};

struct pg_params {
    u64 magic;
    u64 version;
    u64 mem_size;     /* bytes of guest RAM */
    u64 vcpus;
    u64 heap_start;   /* first free byte for the workload */
    u64 heap_end;     /* end of guest RAM */
    u64 nargs;
    u64 reserved;
    u64 args[PG_MAX_ARGS];
};

/* lib.c */
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
void *memmove(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);
void pg_putc(char c);
void pg_write(const char *s, u64 len);
void pg_puts(const char *s);
void pg_put_u64(u64 v);
void pg_put_hex(u64 v);
s64 pg_read_line(char *buf, u64 cap);
void pg_ready(void);
void pg_exit(u32 status) __attribute__((noreturn));
void pg_barrier(void);
u64 pg_strlen(const char *s);
int pg_parse_u64(const char **s, u64 *out);
int pg_word(const char **s, const char *word);

/* splitmix64's finalizer: a bijection on u64, cheap, and easy to vectorise in numpy. */
static inline u64 pg_mix(u64 z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
    return z ^ (z >> 31);
}

int guest_main(u64 vcpu, const struct pg_params *params);

#endif /* __ASSEMBLER__ */

#endif
