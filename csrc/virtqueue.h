/* iovirt virtqueue engine: split and packed rings, walked against a hostile driver.
 *
 * Every guest address the engine touches goes through iov_mem_translate(), which checks
 * that the whole range lies inside one guest RAM region. Rings are translated once, at
 * iov_vq_setup(); descriptors on every pop. A chain is walked with a hard bound on the
 * number of descriptors (IOV_CHAIN_MAX_SEGS), so a loop in a chain or in an indirect
 * table ends the walk with an error instead of spinning.
 *
 * Threading: one queue is used by one thread at a time (the device's worker); the engine
 * has no locks. Ring memory is shared with the guest, so every ring read/write uses
 * atomic loads/stores and the barriers the virtio spec requires. */
#ifndef IOVIRT_VIRTQUEUE_H
#define IOVIRT_VIRTQUEUE_H

#include <stdint.h>
#include <sys/uio.h>

#define IOV_MAX_MEM_REGIONS 8

struct iov_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

/* The guest RAM table (built once from GuestMemory; never changes while a VM runs). */
struct iov_mem {
    uint32_t nregions;
    struct iov_mem_region regions[IOV_MAX_MEM_REGIONS];
};

/* Host pointer for guest range [gpa, gpa + len) if it lies inside one region, else NULL.
 * len 0 is accepted anywhere inside or at the end of a region. Overflow-safe. */
void *iov_mem_translate(const struct iov_mem *mem, uint64_t gpa, uint64_t len);

/* Queue flags: which negotiated features the ring uses. */
#define IOV_VQ_F_PACKED 0x1u    /* VIRTIO_F_RING_PACKED */
#define IOV_VQ_F_EVENT_IDX 0x2u /* VIRTIO_F_EVENT_IDX */
#define IOV_VQ_F_INDIRECT 0x4u  /* VIRTIO_F_INDIRECT_DESC */
#define IOV_VQ_F_IN_ORDER 0x8u  /* VIRTIO_F_IN_ORDER */

/* The longest chain walked, counting direct and indirect descriptors together. */
#define IOV_CHAIN_MAX_SEGS 1024

/* Errors from iov_vq_pop (negative errno values); every one marks the queue broken. */
/* -EFAULT  a descriptor, indirect table or ring entry points outside guest RAM      */
/* -ELOOP   the chain is longer than the queue size / IOV_CHAIN_MAX_SEGS (a loop)      */
/* -EINVAL  bad index (head >= size, avail idx ahead by more than size), a readable
 *          descriptor after a writable one, a nested or empty/misaligned indirect table,
 *          indirect used without VIRTIO_F_INDIRECT_DESC (zero-length descriptors are
 *          skipped, as the spec allows, but count toward the bound)                 */
/* -EIO     the queue was already broken                                             */

/* One descriptor chain, as the device sees it: readable segments first (iov[0..nout)),
 * then writable ones (iov[nout..nout+nin)). iov_base points into guest RAM. */
struct iov_chain {
    uint16_t head;      /* split: the head descriptor index; packed: the buffer id */
    uint16_t ndescs;    /* ring slots the chain used (packed: what the used entry skips) */
    uint32_t nout;      /* device-readable segments */
    uint32_t nin;       /* device-writable segments */
    uint64_t out_bytes; /* total readable bytes */
    uint64_t in_bytes;  /* total writable bytes */
    uint64_t gpa[IOV_CHAIN_MAX_SEGS]; /* guest address of each segment, same order as iov */
    struct iovec iov[IOV_CHAIN_MAX_SEGS];
};

struct iov_vq_stats {
    uint64_t popped;           /* chains handed to the device */
    uint64_t used;             /* used entries published */
    uint64_t notifications;    /* times iov_vq_needs_notification said yes */
    uint64_t suppressed;       /* times it said no (event idx / flags) */
};

struct iov_vq {
    /* configuration (set by iov_vq_setup) */
    uint16_t size;
    uint32_t flags;
    uint64_t desc_gpa, driver_gpa, device_gpa; /* split: desc/avail/used; packed: desc/driver event/device event */
    void *desc;   /* host pointers, translated and length-checked at setup */
    void *driver;
    void *device;
    /* split ring state */
    uint16_t last_avail_idx;  /* next avail ring entry to consume */
    uint16_t used_idx;        /* used->idx as the driver will see it after the next flush */
    uint16_t published_used;  /* used->idx as last written to guest memory */
    uint16_t signalled_used;  /* used idx at the last interrupt (event idx) */
    uint8_t signalled_used_valid;
    /* packed ring state */
    uint16_t next_avail;      /* next descriptor slot to read */
    uint8_t avail_wrap;       /* driver's wrap counter as the device tracks it */
    uint16_t next_used;       /* next descriptor slot to write a used element into */
    uint8_t used_wrap;
    /* health */
    uint8_t broken;
    int error;                /* the first error that broke the queue (negative errno) */
    struct iov_vq_stats stats;
};

/* Check and translate the ring areas (size must be a power of two for split rings, any
 * 1..32768 for packed; areas aligned as the spec requires and inside RAM) and reset the
 * ring state. 0 or -EINVAL/-EFAULT. */
int iov_vq_setup(struct iov_vq *vq, const struct iov_mem *mem, uint16_t size, uint32_t flags,
                 uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa);

/* Take the next available chain: 1 (chain filled in), 0 (ring empty), or a negative
 * errno from the list above (the queue is then broken for good until setup again). */
int iov_vq_pop(struct iov_vq *vq, const struct iov_mem *mem, struct iov_chain *chain);

/* Return a chain to the driver with `len` bytes written into its writable part.
 * Split rings batch: the entry is written now, used->idx only at iov_vq_flush_used.
 * Packed rings publish at once (the flags word is the publication). */
void iov_vq_add_used(struct iov_vq *vq, uint16_t head, uint16_t ndescs, uint32_t len);

/* Publish batched used entries (split: store used->idx with release ordering). */
void iov_vq_flush_used(struct iov_vq *vq);

/* After a flush: does the driver want an interrupt? (event idx / NO_INTERRUPT flags,
 * or the packed ring's driver event suppression area). Updates signalled_used. */
int iov_vq_needs_notification(struct iov_vq *vq);

/* Ask the driver to kick us again (clear NO_NOTIFY / write avail_event). Returns 1 if
 * buffers became available meanwhile (the caller must then keep popping), else 0. */
int iov_vq_enable_notification(struct iov_vq *vq);

/* Tell the driver not to kick (we are polling the ring anyway). */
void iov_vq_disable_notification(struct iov_vq *vq);

#endif
