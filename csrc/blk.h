/* iovirt virtio-blk data path: request parsing and file I/O, in C worker threads.
 *
 * Python (iovirt.virtio.blk) owns config space, feature negotiation and reset; when the
 * driver sets DRIVER_OK it hands each enabled queue to iov_blk_start_queue(). From then
 * on a pthread per queue waits on the queue's kick eventfd, walks chains with the
 * virtqueue engine, does preadv/pwritev/fdatasync/fallocate on the backend fd straight
 * from/to guest memory, publishes used entries and writes the call eventfd (an irqfd or
 * an eventfd the transport watches). No Python, no GIL on this path. */
#ifndef IOVIRT_BLK_H
#define IOVIRT_BLK_H

#include <stdint.h>

#include "virtqueue.h"

#define IOV_BLK_MAX_QUEUES 64
#define IOV_BLK_ID_BYTES 20 /* VIRTIO_BLK_ID_BYTES */

struct iov_blk_config {
    int fd;                    /* the backend file (raw image), opened by Python */
    uint64_t capacity;         /* in 512-byte sectors */
    uint32_t blk_size;         /* logical block size the device reports (>= 512, power of 2) */
    uint32_t seg_max;          /* most data segments per request (0: no limit offered) */
    uint32_t size_max;         /* largest segment in bytes (0: no limit offered) */
    uint8_t readonly;          /* VIRTIO_BLK_F_RO: writes, discards, write-zeroes -> IOERR */
    uint8_t flush;             /* VIRTIO_BLK_F_FLUSH negotiated; if 0, every write is fdatasync'ed */
    uint8_t discard;           /* VIRTIO_BLK_F_DISCARD negotiated */
    uint8_t write_zeroes;      /* VIRTIO_BLK_F_WRITE_ZEROES negotiated */
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    char serial[IOV_BLK_ID_BYTES]; /* GET_ID answer (not NUL-terminated if 20 long) */
};

struct iov_blk_stats {
    uint64_t requests;
    uint64_t read_bytes;
    uint64_t write_bytes;
    uint64_t flushes;
    uint64_t discards;
    uint64_t write_zeroes;
    uint64_t ioerr;    /* requests completed with VIRTIO_BLK_S_IOERR */
    uint64_t unsupp;   /* requests completed with VIRTIO_BLK_S_UNSUPP */
    uint64_t notifications; /* call eventfd writes */
};

struct iov_blk; /* opaque */

/* A device over `mem` (which must outlive it) with `nqueues` queues; NULL on ENOMEM/EINVAL. */
struct iov_blk *iov_blk_new(const struct iov_mem *mem, const struct iov_blk_config *config,
                            unsigned nqueues);

/* Set up queue q (see iov_vq_setup; flags are IOV_VQ_F_*). 0 or negative errno. */
int iov_blk_setup_queue(struct iov_blk *blk, unsigned q, uint16_t size, uint32_t flags,
                        uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa,
                        int kick_fd, int call_fd);

/* Start a worker thread for queue q (after setup). 0 or negative errno. */
int iov_blk_start_queue(struct iov_blk *blk, unsigned q);

/* Process queue q once on the calling thread (no worker): pop every available chain,
 * complete it, flush, notify if the driver wants it. Returns the number of requests
 * completed, or a negative errno if the queue is (or became) broken. For tests and the
 * fuzzer; never call it on a queue that has a worker running. */
int iov_blk_process_queue(struct iov_blk *blk, unsigned q);

/* Stop and join every worker (idempotent); queues keep their state until freed. */
void iov_blk_stop(struct iov_blk *blk);

/* eventfd signalled when any queue breaks (the device then needs a reset). */
int iov_blk_error_fd(const struct iov_blk *blk);

/* 0 if queue q is healthy, else the negative errno that broke it. */
int iov_blk_queue_error(const struct iov_blk *blk, unsigned q);

/* A snapshot of the counters (summed over queues). */
void iov_blk_get_stats(const struct iov_blk *blk, struct iov_blk_stats *out);

/* Stop workers and free everything (does not close config->fd, kick or call fds). */
void iov_blk_free(struct iov_blk *blk);

#endif
