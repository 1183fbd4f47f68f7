/*
 * The serverless "function": build state, say ready, answer requests.
 *
 * args[0] = state bytes (records, 64 B each), args[1] = seed.
 * State in the heap:
 *   records[N]  { key, payload[7] }  key = mix(seed + i), payload[j] = mix(key + j + 1)
 *   table[C]    u32 open-addressing hash table (linear probing) of record index + 1
 * Every vCPU builds its share of the records; vCPU 0 builds the table; all vCPUs share
 * the work of "sum" and "checksum" (partitioned by index, combined by addition, so the
 * answers do not depend on the vCPU count). Requests, one per line:
 *   key I       -> key of record I
 *   get K       -> "I PAYLOAD_SUM" or "missing"
 *   sum A B     -> sum of payload[0] over records [A, B)
 *   update A B S -> rewrite the payload of records [A, B) from seed S:
 *                  payload[j] = mix(mix(S + i) + j + 1); answers "updated N"
 *   checksum    -> sum over record words w of mix(word + w), plus sum over used slots
 *                  of mix(slot value): hex
 *   info        -> "records N table C vcpus V"
 *   quit (or end of input) -> exit 0
 * The Python reference is src/pagein/vmm/reference.py.
 */
#include "pagein_guest.h"

#define RECORD_WORDS 8
#define MAX_VCPUS 16

enum op { OP_NONE, OP_QUIT, OP_KEY, OP_GET, OP_SUM, OP_UPDATE, OP_CHECKSUM, OP_INFO, OP_BAD };

struct record { u64 key; u64 payload[RECORD_WORDS - 1]; };

static struct record *records;
static u32 *table;
static u64 nrecords, capacity, nvcpus;
static volatile u64 partial[MAX_VCPUS];
static struct { enum op op; u64 a, b, s; } cmd;
static char line[256];

static void share(u64 vcpu, u64 n, u64 *lo, u64 *hi)
{
    *lo = n * vcpu / nvcpus;
    *hi = n * (vcpu + 1) / nvcpus;
}

static void build(u64 vcpu, u64 seed)
{
    u64 lo, hi;
    share(vcpu, nrecords, &lo, &hi);
    for (u64 i = lo; i < hi; i++) {
        struct record *r = &records[i];
        r->key = pg_mix(seed + i);
        for (u64 j = 0; j < RECORD_WORDS - 1; j++) r->payload[j] = pg_mix(r->key + j + 1);
    }
    share(vcpu, capacity, &lo, &hi);
    memset(&table[lo], 0, (hi - lo) * sizeof(u32));
    pg_barrier();
    if (vcpu == 0) {
        for (u64 i = 0; i < nrecords; i++) {
            u64 s = records[i].key & (capacity - 1);
            while (table[s]) s = (s + 1) & (capacity - 1);
            table[s] = (u32)(i + 1);
        }
    }
    pg_barrier();
}

static s64 lookup(u64 key)
{
    for (u64 s = key & (capacity - 1); table[s]; s = (s + 1) & (capacity - 1))
        if (records[table[s] - 1].key == key) return (s64)table[s] - 1;
    return -1;
}

static void parse(void)
{
    s64 n = pg_read_line(line, sizeof line - 1);
    const char *p = line;
    cmd.op = OP_BAD;
    cmd.a = cmd.b = cmd.s = 0;
    if (n <= 0) { cmd.op = OP_QUIT; return; }
    line[n] = 0;
    if (pg_word(&p, "quit")) cmd.op = OP_QUIT;
    else if (pg_word(&p, "checksum")) cmd.op = OP_CHECKSUM;
    else if (pg_word(&p, "info")) cmd.op = OP_INFO;
    else if (pg_word(&p, "key") && pg_parse_u64(&p, &cmd.a)) cmd.op = OP_KEY;
    else if (pg_word(&p, "get") && pg_parse_u64(&p, &cmd.a)) cmd.op = OP_GET;
    else if (pg_word(&p, "sum") && pg_parse_u64(&p, &cmd.a) && pg_parse_u64(&p, &cmd.b))
        cmd.op = OP_SUM;
    else if (pg_word(&p, "update") && pg_parse_u64(&p, &cmd.a) && pg_parse_u64(&p, &cmd.b) &&
             pg_parse_u64(&p, &cmd.s))
        cmd.op = OP_UPDATE;
    else {
        while (*p == ' ') p++;
        if (*p == '\n' || *p == 0) cmd.op = OP_NONE;
    }
}

static u64 work(u64 vcpu)
{
    u64 lo, hi, acc = 0;
    if (cmd.op == OP_SUM) {
        u64 b = cmd.b < nrecords ? cmd.b : nrecords, a = cmd.a < b ? cmd.a : b;
        share(vcpu, b - a, &lo, &hi);
        for (u64 i = a + lo; i < a + hi; i++) acc += records[i].payload[0];
    } else if (cmd.op == OP_UPDATE) {
        u64 b = cmd.b < nrecords ? cmd.b : nrecords, a = cmd.a < b ? cmd.a : b;
        share(vcpu, b - a, &lo, &hi);
        for (u64 i = a + lo; i < a + hi; i++) {
            u64 basis = pg_mix(cmd.s + i);
            for (u64 j = 0; j < RECORD_WORDS - 1; j++) records[i].payload[j] = pg_mix(basis + j + 1);
            acc++;
        }
    } else if (cmd.op == OP_CHECKSUM) {
        const u64 *w = (const u64 *)records;
        share(vcpu, nrecords * RECORD_WORDS, &lo, &hi);
        for (u64 i = lo; i < hi; i++) acc += pg_mix(w[i] + i);
        share(vcpu, capacity, &lo, &hi);
        for (u64 s = lo; s < hi; s++)
            if (table[s]) acc += pg_mix(table[s]);
    }
    return acc;
}

static void answer(void)
{
    u64 total = 0;
    for (u64 v = 0; v < nvcpus; v++) total += partial[v];
    switch (cmd.op) {
    case OP_KEY:
        if (cmd.a < nrecords) pg_put_u64(records[cmd.a].key);
        else pg_puts("error: index out of range");
        break;
    case OP_GET: {
        s64 i = lookup(cmd.a);
        if (i < 0) { pg_puts("missing"); break; }
        u64 sum = 0;
        for (u64 j = 0; j < RECORD_WORDS - 1; j++) sum += records[i].payload[j];
        pg_put_u64((u64)i);
        pg_putc(' ');
        pg_put_u64(sum);
        break;
    }
    case OP_SUM: pg_put_u64(total); break;
    case OP_UPDATE: pg_puts("updated "); pg_put_u64(total); break;
    case OP_CHECKSUM: pg_put_hex(total); break;
    case OP_INFO:
        pg_puts("records "); pg_put_u64(nrecords);
        pg_puts(" table "); pg_put_u64(capacity);
        pg_puts(" vcpus "); pg_put_u64(nvcpus);
        break;
    case OP_BAD: pg_puts("error: unknown request (key I, get K, sum A B, update A B S, checksum, info, quit)"); break;
    default: return;
    }
    pg_putc('\n');
}

int guest_main(u64 vcpu, const struct pg_params *params)
{
    nvcpus = params->vcpus;
    nrecords = params->args[0] / sizeof(struct record);
    capacity = 1;
    while (capacity < 2 * nrecords) capacity <<= 1;
    records = (struct record *)params->heap_start;
    table = (u32 *)(params->heap_start + nrecords * sizeof(struct record));
    if (nvcpus > MAX_VCPUS || nrecords == 0 ||
        (u64)(table + capacity) > params->heap_end) {
        if (vcpu == 0) pg_puts("error: guest memory too small for the requested state\n");
        return 2;
    }
    build(vcpu, params->args[1]);
    if (vcpu == 0) pg_ready();
    for (;;) {
        if (vcpu == 0) parse();
        pg_barrier();
        if (cmd.op == OP_QUIT) return 0;
        partial[vcpu] = work(vcpu);
        pg_barrier();
        if (vcpu == 0) answer();
    }
}
