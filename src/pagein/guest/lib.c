/* The guest side of the port-I/O ABI and the few libc pieces gcc may call. */
#include "pagein_guest.h"

static inline void outb(u32 port, u8 v) { __asm__ volatile("outb %0, %w1" : : "a"(v), "Nd"(port)); }
static inline void outl(u32 port, u32 v) { __asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(port) : "memory"); }
static inline u32 inl(u32 port)
{
    u32 v;
    __asm__ volatile("inl %w1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}

void *memset(void *d, int c, u64 n)
{
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

void *memmove(void *d, const void *s, u64 n)
{
    u8 *p = d;
    const u8 *q = s;
    if (p < q) return memcpy(d, s, n);
    while (n--) p[n] = q[n];
    return d;
}

int memcmp(const void *a, const void *b, u64 n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p - *q;
    return 0;
}

void pg_putc(char c) { outb(PG_PORT_PUTC, (u8)c); }

void pg_write(const char *s, u64 len)
{
    struct pg_buf b = { (u64)s, len, 0 };
    outl(PG_PORT_WRITE, (u32)(u64)&b);
}

u64 pg_strlen(const char *s)
{
    u64 n = 0;
    while (s[n]) n++;
    return n;
}

void pg_puts(const char *s) { pg_write(s, pg_strlen(s)); }

void pg_put_u64(u64 v)
{
    char buf[24];
    int i = 24;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    pg_write(buf + i, 24 - i);
}

void pg_put_hex(u64 v)
{
    char buf[18];
    buf[0] = '0';
    buf[1] = 'x';
    for (int i = 0; i < 16; i++) buf[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
    pg_write(buf, 18);
}

s64 pg_read_line(char *buf, u64 cap)
{
    volatile struct pg_buf b;
    do {
        b.addr = (u64)buf;
        b.len = cap;
        b.result = PG_RETRY;
        outl(PG_PORT_READ, (u32)(u64)&b);
    } while (b.result == PG_RETRY);
    return b.result;
}

void pg_ready(void) { outl(PG_PORT_READY, 1); }

void pg_exit(u32 status)
{
    outl(PG_PORT_EXIT, status);
    __builtin_trap();
}

void pg_barrier(void)
{
    while ((s64)(int)inl(PG_PORT_BARRIER) == PG_RETRY)
        ;
}

int pg_parse_u64(const char **s, u64 *out)
{
    const char *p = *s;
    u64 v = 0;
    int any = 0;
    while (*p == ' ') p++;
    if (p[0] == '0' && p[1] == 'x') {
        p += 2;
        for (;; p++, any = 1) {
            u64 d;
            if (*p >= '0' && *p <= '9') d = (u64)(*p - '0');
            else if (*p >= 'a' && *p <= 'f') d = (u64)(*p - 'a' + 10);
            else break;
            v = v * 16 + d;
        }
    } else {
        for (; *p >= '0' && *p <= '9'; p++, any = 1) v = v * 10 + (u64)(*p - '0');
    }
    if (!any) return 0;
    *s = p;
    *out = v;
    return 1;
}

int pg_word(const char **s, const char *word)
{
    const char *p = *s;
    while (*p == ' ') p++;
    u64 n = pg_strlen(word);
    if (memcmp(p, word, n) != 0) return 0;
    if (p[n] != ' ' && p[n] != '\n' && p[n] != 0) return 0;
    *s = p + n;
    return 1;
}
