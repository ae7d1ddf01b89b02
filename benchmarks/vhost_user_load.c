/* A virtio-blk driver that keeps a split ring busy: the same front-end load for every
 * vhost-user-blk back-end benchmarks/vhost_user.py compares.
 *
 * Guest RAM is a memfd the benchmark maps (`ram`, guest address 0 at ram[0]); the ring
 * and the buffers live in it, the back-end maps the same memfd. `qd` requests are kept in
 * flight, each three descriptors (header, data, status) in a fixed slot. A completed
 * request is checked (status OK, used length) and replaced at once; the driver kicks
 * unless the back-end asked not to (VIRTQ_USED_F_NO_NOTIFY) and waits on the call eventfd
 * only when the used ring has nothing new. Built by the benchmark with gcc -O2 -shared. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_USED_F_NO_NOTIFY 1
#define VIRTIO_BLK_T_IN 0

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct load {
    uint8_t *ram;
    struct desc *desc;
    uint16_t *avail; /* flags, idx, ring[size] */
    uint16_t *used;  /* flags, idx, then {u32 id, u32 len}[size] */
    uint16_t size;
    uint16_t avail_idx;
    uint16_t last_used;
    uint64_t buf_gpa;
    uint32_t bs;
    uint64_t nblocks;
    int random;
    uint64_t next_block;
    uint64_t rng;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t slot_gpa(const struct load *l, uint32_t slot)
{
    /* header (16) + status (1), padded to 64, then the data buffer, 4 KiB-aligned. */
    uint64_t stride = 4096 + ((uint64_t)l->bs + 4095) / 4096 * 4096;
    return l->buf_gpa + slot * stride;
}

static void submit(struct load *l, uint32_t slot)
{
    uint64_t base = slot_gpa(l, slot);
    uint64_t block;
    if (l->random) {
        l->rng ^= l->rng << 13;
        l->rng ^= l->rng >> 7;
        l->rng ^= l->rng << 17;
        block = l->rng % l->nblocks;
    } else {
        block = l->next_block++ % l->nblocks;
    }
    struct req_header *h = (struct req_header *)(l->ram + base);
    h->type = VIRTIO_BLK_T_IN;
    h->reserved = 0;
    h->sector = block * (l->bs / 512);
    l->ram[base + 16] = 0xff; /* status, overwritten by the device */
    uint16_t d = (uint16_t)(slot * 3);
    l->desc[d] = (struct desc){base, 16, VIRTQ_DESC_F_NEXT, (uint16_t)(d + 1)};
    l->desc[d + 1] = (struct desc){base + 4096, l->bs, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                                   (uint16_t)(d + 2)};
    l->desc[d + 2] = (struct desc){base + 16, 1, VIRTQ_DESC_F_WRITE, 0};
    l->avail[2 + (l->avail_idx & (l->size - 1))] = d;
    l->avail_idx++;
}

static void publish(struct load *l, int kick_fd)
{
    __atomic_store_n(&l->avail[1], l->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!(__atomic_load_n(&l->used[0], __ATOMIC_ACQUIRE) & VIRTQ_USED_F_NO_NOTIFY)) {
        uint64_t one = 1;
        if (write(kick_fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
            return;
    }
}

/* Run for `seconds`; returns completed requests (or -1: a request failed, -2: stalled). */
int64_t blk_load(uint8_t *ram, uint64_t desc_gpa, uint64_t avail_gpa, uint64_t used_gpa,
                 uint16_t size, uint64_t buf_gpa, int kick_fd, int call_fd, int random, uint32_t bs,
                 uint32_t qd, uint64_t disk_bytes, double seconds)
{
    struct load l = {
        .ram = ram,
        .desc = (struct desc *)(ram + desc_gpa),
        .avail = (uint16_t *)(ram + avail_gpa),
        .used = (uint16_t *)(ram + used_gpa),
        .size = size,
        .avail_idx = __atomic_load_n((uint16_t *)(ram + avail_gpa) + 1, __ATOMIC_RELAXED),
        .buf_gpa = buf_gpa,
        .bs = bs,
        .nblocks = disk_bytes / bs,
        .random = random,
        .rng = 0x9E3779B97F4A7C15ull,
    };
    l.last_used = __atomic_load_n(&l.used[1], __ATOMIC_ACQUIRE);
    if (qd * 3 > size)
        qd = size / 3;
    for (uint32_t s = 0; s < qd; s++)
        submit(&l, s);
    publish(&l, kick_fd);
    int64_t done = 0;
    uint32_t outstanding = qd;
    double end = now() + seconds;
    int stopping = 0;
    while (outstanding > 0) {
        uint16_t used_idx = __atomic_load_n(&l.used[1], __ATOMIC_ACQUIRE);
        if (used_idx == l.last_used) {
            struct pollfd p = {.fd = call_fd, .events = POLLIN};
            if (poll(&p, 1, 5000) == 0)
                return -2;
            uint64_t v;
            if (read(call_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                return -2;
            continue;
        }
        if (!stopping && (done & 63) == 0 && now() >= end)
            stopping = 1;
        int added = 0;
        while (l.last_used != used_idx) {
            uint32_t *e = (uint32_t *)(l.used + 2) + 2 * (l.last_used & (l.size - 1));
            uint32_t id = e[0], len = e[1];
            l.last_used++;
            uint32_t slot = id / 3;
            if (l.ram[slot_gpa(&l, slot) + 16] != 0 || len != bs + 1)
                return -1;
            done++;
            if (stopping) {
                outstanding--;
            } else {
                submit(&l, slot);
                added = 1;
            }
        }
        if (added)
            publish(&l, kick_fd);
    }
    return done;
}
