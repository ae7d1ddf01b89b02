/* iovirt virtio-blk data path (see blk.h for the contract).
 *
 * A request (virtio 1.2, 5.2.6) is one descriptor chain:
 *   readable:  struct virtio_blk_req header {le32 type; le32 reserved; le64 sector}
 *              followed, for OUT/DISCARD/WRITE_ZEROES, by the payload;
 *   writable:  for IN/GET_ID the data buffers, and always, as the very last byte, the status.
 * The driver may cut these anywhere across descriptors, so the header is gathered byte-wise
 * and the status is "the last writable byte", whichever segment holds it.
 *
 * Each queue has its own worker thread, engine state and scratch buffers; queues share
 * nothing but the backend fd (pread/pwrite at explicit offsets need no lock) and the
 * error eventfd. Counters are updated with atomic adds so that a snapshot taken from
 * another thread is torn-free per field. */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "blk.h"

/* Request types (5.2.6). */
#define VIRTIO_BLK_T_IN 0u
#define VIRTIO_BLK_T_OUT 1u
#define VIRTIO_BLK_T_FLUSH 4u
#define VIRTIO_BLK_T_GET_ID 8u
#define VIRTIO_BLK_T_DISCARD 11u
#define VIRTIO_BLK_T_WRITE_ZEROES 13u
/* Status values (5.2.6). */
#define VIRTIO_BLK_S_OK 0u
#define VIRTIO_BLK_S_IOERR 1u
#define VIRTIO_BLK_S_UNSUPP 2u
/* struct virtio_blk_discard_write_zeroes flags. */
#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1u

#define SECTOR_SHIFT 9
#define SECTOR_SIZE (1u << SECTOR_SHIFT)
#define BLK_REQ_HEADER_SIZE 16u
#define BLK_DWZ_SEGMENT_SIZE 16u
/* Zeros written when the file system cannot fallocate (a static buffer: no allocation). */
#define ZERO_CHUNK 65536u

static const uint8_t zero_chunk[ZERO_CHUNK];

struct blk_req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct blk_dwz_segment {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;
};

/* Per-queue scratch space: big, so it lives on the heap. */
struct blk_scratch {
    struct iov_chain chain;
    struct iovec data[IOV_CHAIN_MAX_SEGS]; /* the request's data segments, trimmed */
};

struct blk_queue {
    struct iov_blk *blk;
    struct iov_vq vq;
    struct blk_scratch *scratch;
    int configured;
    int kick_fd;
    int call_fd;
    int running; /* a worker thread exists (joined by iov_blk_stop) */
    pthread_t thread;
    int error; /* atomic: 0 or the negative errno that broke the queue */
    struct iov_blk_stats stats; /* atomic adds */
};

struct iov_blk {
    const struct iov_mem *mem;
    struct iov_blk_config cfg;
    unsigned nqueues;
    int error_fd;
    int stop_fd;
    struct blk_queue *queues;
};

#define STAT_ADD(q, field, n) __atomic_fetch_add(&(q)->stats.field, (n), __ATOMIC_RELAXED)

/* ---- iovec helpers -------------------------------------------------------------- */

/* Copy up to len bytes starting `skip` bytes into iov[0..cnt) out to buf; returns bytes copied. */
static size_t iov_gather(const struct iovec *iov, uint32_t cnt, size_t skip, void *buf, size_t len)
{
    size_t done = 0;
    for (uint32_t i = 0; i < cnt && done < len; i++) {
        size_t n = iov[i].iov_len;
        if (skip >= n) {
            skip -= n;
            continue;
        }
        size_t take = n - skip;
        if (take > len - done)
            take = len - done;
        memcpy((uint8_t *)buf + done, (const uint8_t *)iov[i].iov_base + skip, take);
        done += take;
        skip = 0;
    }
    return done;
}

/* Copy len bytes of buf into iov[0..cnt); returns bytes copied. */
static size_t iov_scatter(const struct iovec *iov, uint32_t cnt, const void *buf, size_t len)
{
    size_t done = 0;
    for (uint32_t i = 0; i < cnt && done < len; i++) {
        size_t take = iov[i].iov_len;
        if (take > len - done)
            take = len - done;
        memcpy(iov[i].iov_base, (const uint8_t *)buf + done, take);
        done += take;
    }
    return done;
}

/* Copy iov[0..cnt) into out[] leaving the first `skip` and the last `drop` bytes behind;
 * returns the number of entries (zero-length pieces are left out). */
static uint32_t iov_trim(const struct iovec *iov, uint32_t cnt, uint64_t skip, uint64_t drop,
                         struct iovec *out, uint64_t *bytes)
{
    uint64_t total = 0;
    for (uint32_t i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    *bytes = 0;
    if (skip + drop >= total)
        return 0;
    uint64_t keep = total - skip - drop;
    uint32_t n = 0;
    for (uint32_t i = 0; i < cnt && keep > 0; i++) {
        uint64_t len = iov[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        uint64_t take = len - skip;
        if (take > keep)
            take = keep;
        out[n].iov_base = (uint8_t *)iov[i].iov_base + skip;
        out[n].iov_len = take;
        n++;
        keep -= take;
        *bytes += take;
        skip = 0;
    }
    return n;
}

/* preadv/pwritev all of iov[0..cnt) at off, in IOV_MAX pieces, retrying short transfers
 * and EINTR. iov is consumed (modified). *done gets the bytes transferred. 0 or -errno;
 * end of file before the end of the buffers is -EIO. */
static int rw_full(int fd, struct iovec *iov, uint32_t cnt, uint64_t off, int write,
                   uint64_t *done)
{
    *done = 0;
    while (cnt > 0) {
        if (iov->iov_len == 0) {
            iov++;
            cnt--;
            continue;
        }
        int n = cnt > IOV_MAX ? IOV_MAX : (int)cnt;
        ssize_t r = write ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO; /* EOF (read) or a device that accepts nothing (write) */
        size_t left = (size_t)r;
        *done += left;
        off += left;
        while (left > 0) {
            if (left >= iov->iov_len) {
                left -= iov->iov_len;
                iov++;
                cnt--;
            } else {
                iov->iov_base = (uint8_t *)iov->iov_base + left;
                iov->iov_len -= left;
                left = 0;
            }
        }
    }
    return 0;
}

static int write_zeros(int fd, uint64_t off, uint64_t len)
{
    while (len > 0) {
        size_t n = len > ZERO_CHUNK ? ZERO_CHUNK : (size_t)len;
        ssize_t r = pwrite(fd, zero_chunk, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        off += (uint64_t)r;
        len -= (uint64_t)r;
    }
    return 0;
}

static int datasync(int fd)
{
    while (fdatasync(fd) < 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

/* Is [sector, sector + nsectors) inside the disk? Overflow-safe. */
static int range_ok(const struct iov_blk_config *cfg, uint64_t sector, uint64_t nsectors)
{
    return sector <= cfg->capacity && nsectors <= cfg->capacity - sector;
}

/* ---- request handlers: each returns a VIRTIO_BLK_S_* status ------------------------ */

static uint8_t blk_in(struct blk_queue *q, uint64_t sector, struct iovec *data, uint32_t ndata,
                      uint64_t bytes, uint64_t *written)
{
    const struct iov_blk_config *cfg = &q->blk->cfg;
    if (bytes % SECTOR_SIZE || !range_ok(cfg, sector, bytes >> SECTOR_SHIFT))
        return VIRTIO_BLK_S_IOERR;
    int err = rw_full(cfg->fd, data, ndata, sector << SECTOR_SHIFT, 0, written);
    STAT_ADD(q, read_bytes, *written);
    return err ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
}

static uint8_t blk_out(struct blk_queue *q, uint64_t sector, struct iovec *data, uint32_t ndata,
                       uint64_t bytes)
{
    const struct iov_blk_config *cfg = &q->blk->cfg;
    if (cfg->readonly)
        return VIRTIO_BLK_S_IOERR;
    if (bytes % SECTOR_SIZE || !range_ok(cfg, sector, bytes >> SECTOR_SHIFT))
        return VIRTIO_BLK_S_IOERR;
    uint64_t done;
    int err = rw_full(cfg->fd, data, ndata, sector << SECTOR_SHIFT, 1, &done);
    STAT_ADD(q, write_bytes, done);
    /* Without VIRTIO_BLK_F_FLUSH the driver assumes write-through. */
    if (!err && !cfg->flush)
        err = datasync(cfg->fd);
    return err ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
}

/* Deallocate or zero one range; falls back to writing zeros where fallocate cannot. */
static int zero_range(int fd, uint64_t off, uint64_t len, int punch)
{
    int mode = punch ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                     : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
    for (;;) {
        if (fallocate(fd, mode, (off_t)off, (off_t)len) == 0)
            return 0;
        if (errno == EINTR)
            continue;
        if (errno == EOPNOTSUPP || errno == ENOSYS)
            return write_zeros(fd, off, len);
        return -errno;
    }
}

static uint8_t blk_discard_zeroes(struct blk_queue *q, uint32_t type, const struct iovec *data,
                                  uint32_t ndata, uint64_t bytes)
{
    const struct iov_blk_config *cfg = &q->blk->cfg;
    int discard = type == VIRTIO_BLK_T_DISCARD;
    if (!(discard ? cfg->discard : cfg->write_zeroes))
        return VIRTIO_BLK_S_UNSUPP;
    if (cfg->readonly)
        return VIRTIO_BLK_S_IOERR;
    uint32_t max_seg = discard ? cfg->max_discard_seg : cfg->max_write_zeroes_seg;
    uint32_t max_sectors = discard ? cfg->max_discard_sectors : cfg->max_write_zeroes_sectors;
    if (bytes == 0 || bytes % BLK_DWZ_SEGMENT_SIZE || bytes / BLK_DWZ_SEGMENT_SIZE > max_seg)
        return VIRTIO_BLK_S_IOERR;
    uint64_t nseg = bytes / BLK_DWZ_SEGMENT_SIZE;

    /* Check every segment before touching the file: a request is all or nothing as far
     * as validation goes. Segments are re-read from guest memory in the second pass, so
     * that pass repeats the checks on its own copy. */
    for (int pass = 0; pass < 2; pass++) {
        for (uint64_t i = 0; i < nseg; i++) {
            struct blk_dwz_segment s;
            iov_gather(data, ndata, i * BLK_DWZ_SEGMENT_SIZE, &s, sizeof(s));
            uint64_t sector = le64toh(s.sector);
            uint32_t nsect = le32toh(s.num_sectors);
            uint32_t flags = le32toh(s.flags);
            /* 5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP. */
            if (flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
                return VIRTIO_BLK_S_UNSUPP;
            if (discard && (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
                return VIRTIO_BLK_S_UNSUPP;
            if (nsect > max_sectors || !range_ok(cfg, sector, nsect))
                return VIRTIO_BLK_S_IOERR;
            if (pass == 0 || nsect == 0)
                continue;
            int punch = discard || (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
            if (zero_range(cfg->fd, sector << SECTOR_SHIFT, (uint64_t)nsect << SECTOR_SHIFT,
                           punch))
                return VIRTIO_BLK_S_IOERR;
        }
    }
    if (!cfg->flush && datasync(cfg->fd))
        return VIRTIO_BLK_S_IOERR;
    if (discard)
        STAT_ADD(q, discards, 1);
    else
        STAT_ADD(q, write_zeroes, 1);
    return VIRTIO_BLK_S_OK;
}

/* Handle one chain; returns the used length (bytes written into guest buffers). */
static uint32_t blk_handle(struct blk_queue *q, struct iov_chain *c)
{
    const struct iov_blk_config *cfg = &q->blk->cfg;
    struct iovec *readable = c->iov;
    struct iovec *writable = c->iov + c->nout;
    STAT_ADD(q, requests, 1);

    if (c->in_bytes == 0) {
        STAT_ADD(q, ioerr, 1); /* nowhere to put a status: complete it empty */
        return 0;
    }
    /* The last writable byte is the status (writable segments are never empty). */
    struct iovec *last = &writable[c->nin - 1];
    uint8_t *status_ptr = (uint8_t *)last->iov_base + last->iov_len - 1;

    struct blk_req_header hdr;
    if (c->out_bytes < BLK_REQ_HEADER_SIZE) {
        __atomic_store_n(status_ptr, (uint8_t)VIRTIO_BLK_S_IOERR, __ATOMIC_RELAXED);
        STAT_ADD(q, ioerr, 1);
        return 0;
    }
    iov_gather(readable, c->nout, 0, &hdr, sizeof(hdr));
    uint32_t type = le32toh(hdr.type);
    uint64_t sector = le64toh(hdr.sector);

    /* Data segments: readable after the header for OUT-like requests, writable before the
     * status byte for IN-like ones. */
    int device_writes = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;
    struct iovec *data = q->scratch->data;
    uint64_t bytes;
    uint32_t ndata = device_writes ? iov_trim(writable, c->nin, 0, 1, data, &bytes)
                                   : iov_trim(readable, c->nout, BLK_REQ_HEADER_SIZE, 0, data,
                                              &bytes);

    uint8_t status;
    uint64_t written = 0;
    int limits_ok = !(cfg->seg_max && ndata > cfg->seg_max);
    for (uint32_t i = 0; limits_ok && cfg->size_max && i < ndata; i++)
        limits_ok = data[i].iov_len <= cfg->size_max;

    if (!limits_ok) {
        status = VIRTIO_BLK_S_IOERR;
    } else {
        switch (type) {
        case VIRTIO_BLK_T_IN:
            status = blk_in(q, sector, data, ndata, bytes, &written);
            break;
        case VIRTIO_BLK_T_OUT:
            status = blk_out(q, sector, data, ndata, bytes);
            break;
        case VIRTIO_BLK_T_FLUSH:
            status = datasync(cfg->fd) ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK;
            STAT_ADD(q, flushes, 1);
            break;
        case VIRTIO_BLK_T_GET_ID:
            written = iov_scatter(data, ndata, cfg->serial, IOV_BLK_ID_BYTES);
            status = VIRTIO_BLK_S_OK;
            break;
        case VIRTIO_BLK_T_DISCARD:
        case VIRTIO_BLK_T_WRITE_ZEROES:
            status = blk_discard_zeroes(q, type, data, ndata, bytes);
            break;
        default:
            status = VIRTIO_BLK_S_UNSUPP;
            break;
        }
    }
    if (status == VIRTIO_BLK_S_IOERR)
        STAT_ADD(q, ioerr, 1);
    else if (status == VIRTIO_BLK_S_UNSUPP)
        STAT_ADD(q, unsupp, 1);
    __atomic_store_n(status_ptr, status, __ATOMIC_RELAXED);
    /* written <= in_bytes - 1 < 2^32 * IOV_CHAIN_MAX_SEGS; clamp to the used field. */
    uint64_t used = written + 1;
    return used > UINT32_MAX ? UINT32_MAX : (uint32_t)used;
}

/* ---- queue processing ----------------------------------------------------------- */

static void signal_fd(int fd)
{
    uint64_t one = 1;
    if (fd < 0)
        return;
    /* EAGAIN means the counter is saturated: the reader will wake up anyway. */
    while (write(fd, &one, sizeof(one)) < 0 && errno == EINTR)
        ;
}

static void queue_broke(struct blk_queue *q, int err)
{
    int expected = 0;
    if (__atomic_compare_exchange_n(&q->error, &expected, err, 0, __ATOMIC_SEQ_CST,
                                    __ATOMIC_SEQ_CST))
        signal_fd(q->blk->error_fd);
}

/* Pop and complete everything available (the notification dance of 2.7.10 / 2.8.10).
 * Returns the number of completed requests or the error that broke the queue. */
static int process(struct blk_queue *q)
{
    struct iov_vq *vq = &q->vq;
    struct iov_chain *chain = &q->scratch->chain;
    int total = 0;
    if (vq->broken)
        return vq->error;
    for (;;) {
        int batch = 0, err = 0;
        iov_vq_disable_notification(vq);
        for (;;) {
            int r = iov_vq_pop(vq, q->blk->mem, chain);
            if (r < 0) {
                err = r;
                break;
            }
            if (r == 0)
                break;
            uint32_t len = blk_handle(q, chain);
            iov_vq_add_used(vq, chain->head, chain->ndescs, len);
            batch++;
        }
        iov_vq_flush_used(vq);
        if (batch > 0 && iov_vq_needs_notification(vq)) {
            signal_fd(q->call_fd);
            STAT_ADD(q, notifications, 1);
        }
        if (total <= INT_MAX - batch)
            total += batch;
        if (err) {
            queue_broke(q, vq->error);
            return vq->error;
        }
        if (!iov_vq_enable_notification(vq))
            break;
    }
    return total;
}

static void *worker(void *arg)
{
    struct blk_queue *q = arg;
    sigset_t all;
    /* Signals meant for vCPU threads (kicks) must never land here. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);

    struct pollfd fds[2] = {
        {.fd = q->blk->stop_fd, .events = POLLIN},
        {.fd = q->kick_fd, .events = POLLIN},
    };
    /* Anything queued before we started (a kick we missed) is handled now. */
    int alive = process(q) >= 0;
    for (;;) {
        /* A broken queue, or a dead kick fd, leaves only the stop fd to wait on. */
        int r = poll(fds, alive ? 2 : 1, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].revents)
            break;
        if (!alive)
            continue;
        if (fds[1].revents & (POLLERR | POLLNVAL | POLLHUP)) {
            alive = 0;
            continue;
        }
        if (fds[1].revents & POLLIN) {
            uint64_t v;
            /* The value is a count of kicks; the ring says what to do. */
            if (read(q->kick_fd, &v, sizeof(v)) < 0 && errno != EAGAIN && errno != EINTR) {
                alive = 0;
                continue;
            }
            if (process(q) < 0)
                alive = 0;
        }
    }
    return NULL;
}

/* ---- public API ----------------------------------------------------------------- */

struct iov_blk *iov_blk_new(const struct iov_mem *mem, const struct iov_blk_config *config,
                            unsigned nqueues)
{
    if (!mem || !config || nqueues == 0 || nqueues > IOV_BLK_MAX_QUEUES || config->fd < 0 ||
        config->capacity > (uint64_t)INT64_MAX >> SECTOR_SHIFT || config->blk_size < SECTOR_SIZE ||
        (config->blk_size & (config->blk_size - 1))) {
        errno = EINVAL;
        return NULL;
    }
    struct iov_blk *blk = calloc(1, sizeof(*blk));
    if (!blk)
        return NULL;
    blk->mem = mem;
    blk->cfg = *config;
    blk->nqueues = nqueues;
    blk->error_fd = -1;
    blk->stop_fd = -1;
    blk->queues = calloc(nqueues, sizeof(*blk->queues));
    if (!blk->queues)
        goto fail;
    for (unsigned i = 0; i < nqueues; i++) {
        struct blk_queue *q = &blk->queues[i];
        q->blk = blk;
        q->kick_fd = -1;
        q->call_fd = -1;
        q->scratch = calloc(1, sizeof(*q->scratch));
        if (!q->scratch)
            goto fail;
    }
    blk->error_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (blk->error_fd < 0)
        goto fail;
    blk->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (blk->stop_fd < 0)
        goto fail;
    return blk;
fail: {
    int saved = errno;
    iov_blk_free(blk);
    errno = saved;
    return NULL;
}
}

int iov_blk_setup_queue(struct iov_blk *blk, unsigned q, uint16_t size, uint32_t flags,
                        uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa,
                        int kick_fd, int call_fd)
{
    if (q >= blk->nqueues)
        return -EINVAL;
    struct blk_queue *queue = &blk->queues[q];
    if (queue->running)
        return -EBUSY;
    queue->configured = 0;
    __atomic_store_n(&queue->error, 0, __ATOMIC_SEQ_CST);
    int err = iov_vq_setup(&queue->vq, blk->mem, size, flags, desc_gpa, driver_gpa, device_gpa);
    if (err)
        return err;
    queue->kick_fd = kick_fd;
    queue->call_fd = call_fd;
    queue->configured = 1;
    return 0;
}

int iov_blk_start_queue(struct iov_blk *blk, unsigned q)
{
    if (q >= blk->nqueues)
        return -EINVAL;
    struct blk_queue *queue = &blk->queues[q];
    if (!queue->configured || queue->kick_fd < 0)
        return -EINVAL;
    if (queue->running)
        return -EBUSY;
    /* Create the thread with every signal blocked so that none can reach it before it
     * blocks them itself; the caller's mask is restored right after. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(&queue->thread, NULL, worker, queue);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err)
        return -err;
    queue->running = 1;
    return 0;
}

int iov_blk_process_queue(struct iov_blk *blk, unsigned q)
{
    if (q >= blk->nqueues)
        return -EINVAL;
    struct blk_queue *queue = &blk->queues[q];
    if (!queue->configured)
        return -EINVAL;
    if (queue->running)
        return -EBUSY;
    return process(queue);
}

void iov_blk_stop(struct iov_blk *blk)
{
    int any = 0;
    for (unsigned i = 0; i < blk->nqueues; i++)
        any |= blk->queues[i].running;
    if (!any)
        return;
    signal_fd(blk->stop_fd);
    for (unsigned i = 0; i < blk->nqueues; i++) {
        struct blk_queue *q = &blk->queues[i];
        if (q->running) {
            pthread_join(q->thread, NULL);
            q->running = 0;
        }
    }
    /* Drain the stop fd so that workers started later do not stop at once. */
    uint64_t v;
    while (read(blk->stop_fd, &v, sizeof(v)) < 0 && errno == EINTR)
        ;
}

int iov_blk_error_fd(const struct iov_blk *blk)
{
    return blk->error_fd;
}

int iov_blk_queue_error(const struct iov_blk *blk, unsigned q)
{
    if (q >= blk->nqueues)
        return -EINVAL;
    return __atomic_load_n(&blk->queues[q].error, __ATOMIC_SEQ_CST);
}

void iov_blk_get_stats(const struct iov_blk *blk, struct iov_blk_stats *out)
{
    memset(out, 0, sizeof(*out));
    for (unsigned i = 0; i < blk->nqueues; i++) {
        const struct iov_blk_stats *s = &blk->queues[i].stats;
#define SUM(field) out->field += __atomic_load_n(&s->field, __ATOMIC_RELAXED)
        SUM(requests);
        SUM(read_bytes);
        SUM(write_bytes);
        SUM(flushes);
        SUM(discards);
        SUM(write_zeroes);
        SUM(ioerr);
        SUM(unsupp);
        SUM(notifications);
#undef SUM
    }
}

void iov_blk_free(struct iov_blk *blk)
{
    if (!blk)
        return;
    if (blk->queues) {
        if (blk->stop_fd >= 0)
            iov_blk_stop(blk);
        for (unsigned i = 0; i < blk->nqueues; i++)
            free(blk->queues[i].scratch);
        free(blk->queues);
    }
    if (blk->error_fd >= 0)
        close(blk->error_fd);
    if (blk->stop_fd >= 0)
        close(blk->stop_fd);
    free(blk);
}
