/* The fault round-trip benchmark's C reference handler.
 *
 *   ref_handler SOCKET FILE CPU
 *
 * Listen on SOCKET, accept one toucher, receive its struct hello and uffd, map FILE
 * (MAP_POPULATE, so copies never fault on the source), then serve: blocking poll on
 * the uffd, read up to 64 messages, UFFDIO_COPY the faulting block from the file
 * (EEXIST: wake). In MODE_BULK, first copy the whole region in 2 MiB chunks and send
 * "D". Stops at the sentinel fault (base+size). Prints {"faults": N, "cpu_ns": T} on
 * stdout, T being this thread's CPU time from the hello to the sentinel.
 */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static uint64_t cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static int accept_one(const char *path) {
    int l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, path, sizeof(addr.sun_path) - 1);
    unlink(path);
    if (bind(l, (struct sockaddr *)&addr, sizeof(addr)) || listen(l, 1))
        die("bind/listen");
    printf("ready\n");
    fflush(stdout);
    int s = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    if (s < 0)
        die("accept");
    close(l);
    return s;
}

static int recv_hello(int s, struct hello *h) {
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = h, .iov_len = sizeof(*h)};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                         .msg_controllen = sizeof(cbuf)};
    if (recvmsg(s, &msg, MSG_CMSG_CLOEXEC) != sizeof(*h))
        die("recvmsg");
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS)
        die("no uffd in the hello");
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof(int));
    return fd;
}

/* Copy [off, off+len) of the file to base+off; EEXIST means it is there already. */
static void copy_block(int uffd, const struct hello *h, const char *src, uint64_t off,
                       uint64_t len) {
    struct uffdio_copy c = {.dst = h->base + off, .src = (uint64_t)(src + off), .len = len};
    while (ioctl(uffd, UFFDIO_COPY, &c)) {
        if (errno == EEXIST) {
            struct uffdio_range r = {.start = h->base + off, .len = len};
            ioctl(uffd, UFFDIO_WAKE, &r);
            return;
        }
        if (errno != EAGAIN)
            die("UFFDIO_COPY");
        c.copy = 0; /* no non-cooperative events are enabled: EAGAIN is transient */
    }
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: ref_handler SOCKET FILE CPU\n");
        return 2;
    }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(atoi(argv[3]), &set);
    if (sched_setaffinity(0, sizeof(set), &set))
        die("sched_setaffinity");
    int s = accept_one(argv[1]);
    struct hello h;
    int uffd = recv_hello(s, &h);
    int ffd = open(argv[2], O_RDONLY | O_CLOEXEC);
    const char *src = mmap(NULL, h.size, PROT_READ, MAP_SHARED | MAP_POPULATE, ffd, 0);
    if (src == MAP_FAILED)
        die("mmap file");
    /* poll() on a blocking uffd reports POLLERR: the reference polls a non-blocking one. */
    fcntl(uffd, F_SETFL, fcntl(uffd, F_GETFL) | O_NONBLOCK);
    uint64_t cpu0 = cpu_ns();
    if (h.mode == MODE_BULK) {
        for (uint64_t off = 0; off < h.size; off += BULK_CHUNK)
            copy_block(uffd, &h, src, off, BULK_CHUNK);
        if (write(s, "D", 1) != 1)
            die("write D");
    }
    long page = sysconf(_SC_PAGESIZE);
    struct uffd_msg msgs[64];
    uint64_t faults = 0;
    uint64_t sentinel = h.base + h.size;
    for (;;) {
        struct pollfd p = {.fd = uffd, .events = POLLIN};
        int n = poll(&p, 1, 30000);
        if (n <= 0)
            die("poll (timeout or error)");
        ssize_t got = read(uffd, msgs, sizeof(msgs));
        if (got < 0) {
            if (errno == EAGAIN)
                continue;
            die("read uffd");
        }
        for (ssize_t i = 0; i < got / (ssize_t)sizeof(msgs[0]); i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address;
            if (addr >= sentinel) {
                struct uffdio_zeropage z = {.range = {.start = sentinel, .len = page}};
                ioctl(uffd, UFFDIO_ZEROPAGE, &z);
                printf("{\"faults\": %llu, \"cpu_ns\": %llu}\n", (unsigned long long)faults,
                       (unsigned long long)(cpu_ns() - cpu0));
                return 0;
            }
            uint64_t off = (addr - h.base) & ~(h.block - 1);
            copy_block(uffd, &h, src, off, h.block);
            faults++;
        }
    }
}
