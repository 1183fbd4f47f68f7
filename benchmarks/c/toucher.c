/* The fault round-trip benchmark's toucher.
 *
 *   toucher gen PATH SIZE                 write the benchmark file (u64 at off = off^SEED)
 *   toucher run SOCKET SIZE BLOCK MODE CPU
 *
 * run: map SIZE bytes (+ one sentinel page) of private anonymous memory, create a uffd,
 * register it MISSING, send it to the handler listening on SOCKET, then either touch
 * one byte per BLOCK (MODE 0, timed: one fault per block) or wait until the handler
 * has populated everything with 2 MiB copies (MODE 1, timed until its "D" arrives).
 * Then touch the sentinel (the handler stops) and verify every u64 of the region.
 * Prints one JSON line: {"ns": ..., "blocks": ..., "bad_words": ...}.
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int gen(const char *path, uint64_t size) {
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0)
        die("open");
    size_t chunk = 1u << 20;
    uint64_t *buf = malloc(chunk);
    for (uint64_t off = 0; off < size; off += chunk) {
        for (size_t i = 0; i < chunk / 8; i++)
            buf[i] = word_at(off + i * 8);
        if (write(fd, buf, chunk) != (ssize_t)chunk)
            die("write");
    }
    free(buf);
    return close(fd);
}

static int make_uffd(void) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (fd < 0)
        die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(fd, UFFDIO_API, &api))
        die("UFFDIO_API");
    return fd;
}

static int connect_to(const char *path) {
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    if (connect(s, (struct sockaddr *)&addr, sizeof(addr)))
        die("connect");
    return s;
}

static void send_hello(int s, struct hello *h, int uffd) {
    char cbuf[CMSG_SPACE(sizeof(int))] = {0};
    struct iovec iov = {.iov_base = h, .iov_len = sizeof(*h)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                         .msg_controllen = sizeof(cbuf)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &uffd, sizeof(int));
    if (sendmsg(s, &msg, 0) != sizeof(*h))
        die("sendmsg");
}

static int run(const char *sock, uint64_t size, uint64_t block, int mode, int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set))
        die("sched_setaffinity");
    long page = sysconf(_SC_PAGESIZE);
    char *base = mmap(NULL, size + page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        die("mmap");
    int uffd = make_uffd();
    struct uffdio_register reg = {.range = {.start = (uint64_t)base, .len = size + page},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        die("UFFDIO_REGISTER");
    int s = connect_to(sock);
    struct hello h = {.base = (uint64_t)base, .size = size, .block = block, .mode = mode};
    uint64_t t0 = now_ns(), t1;
    send_hello(s, &h, uffd);
    volatile uint64_t sum = 0;
    if (mode == MODE_FAULT) {
        for (uint64_t off = 0; off < size; off += block)
            sum += ((volatile char *)base)[off];
        t1 = now_ns();
    } else {
        char done;
        if (read(s, &done, 1) != 1 || done != 'D')
            die("waiting for the bulk handler");
        t1 = now_ns();
    }
    sum += ((volatile char *)base)[size]; /* the sentinel: the handler stops */
    uint64_t bad = 0;
    const uint64_t *w = (const uint64_t *)base;
    for (uint64_t i = 0; i < size / 8; i++)
        bad += w[i] != word_at(i * 8);
    printf("{\"ns\": %llu, \"blocks\": %llu, \"bad_words\": %llu}\n",
           (unsigned long long)(t1 - t0), (unsigned long long)(size / block),
           (unsigned long long)bad);
    close(s);
    close(uffd);
    return bad != 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "gen"))
        return gen(argv[2], strtoull(argv[3], NULL, 0));
    if (argc == 7 && !strcmp(argv[1], "run"))
        return run(argv[2], strtoull(argv[3], NULL, 0), strtoull(argv[4], NULL, 0),
                   atoi(argv[5]), atoi(argv[6]));
    fprintf(stderr, "usage: toucher gen PATH SIZE | toucher run SOCKET SIZE BLOCK MODE CPU\n");
    return 2;
}
