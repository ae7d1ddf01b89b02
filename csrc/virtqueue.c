/* iovirt virtqueue engine (see virtqueue.h for the contract).
 *
 * Layouts follow virtio 1.2: the split ring (2.7: descriptor table, available ring, used
 * ring, event idx in 2.7.7/2.7.10) and the packed ring (2.8: one descriptor ring plus two
 * event suppression areas, 2.8.10). The guest writes ring memory concurrently with us, so:
 *  - a descriptor is copied into a local variable once and only the copy is checked and
 *    used (no double fetch);
 *  - the driver's publication fields (avail->idx, a packed descriptor's flags) are read
 *    with acquire ordering before anything they publish;
 *  - ours (used->idx, a packed used descriptor's flags) are stored with release ordering
 *    after what they publish;
 *  - a full fence separates "we published / asked for kicks" from "read the driver's
 *    suppression fields", the classic lost-wakeup race of 2.7.10 / 2.8.10.
 * Multi-byte ring fields are little-endian (VIRTIO_F_VERSION_1). */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>

#include "virtqueue.h"

/* Split descriptor flags (2.7.5). */
#define VIRTQ_DESC_F_NEXT 1u
#define VIRTQ_DESC_F_WRITE 2u
#define VIRTQ_DESC_F_INDIRECT 4u
/* Ring flags (2.7.6, 2.7.8). */
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1u
#define VIRTQ_USED_F_NO_NOTIFY 1u
/* Packed descriptor flags (2.8.1): the same NEXT/WRITE/INDIRECT bits plus these two. */
#define VIRTQ_DESC_F_AVAIL (1u << 7)
#define VIRTQ_DESC_F_USED (1u << 15)
/* Packed event suppression (2.8.10). */
#define RING_EVENT_FLAGS_ENABLE 0u
#define RING_EVENT_FLAGS_DISABLE 1u
#define RING_EVENT_FLAGS_DESC 2u
#define RING_EVENT_WRAP_SHIFT 15
#define RING_EVENT_OFF_MASK 0x7fffu

#define SPLIT_MAX_SIZE 32768u
#define PACKED_MAX_SIZE 32768u
#define DESC_SIZE 16u

#define ALIGN_DESC 16u
#define ALIGN_SPLIT_AVAIL 2u
#define ALIGN_SPLIT_USED 4u
#define ALIGN_PACKED_EVENT 4u

#define KNOWN_FLAGS (IOV_VQ_F_PACKED | IOV_VQ_F_EVENT_IDX | IOV_VQ_F_INDIRECT | IOV_VQ_F_IN_ORDER)

/* One descriptor as laid out in guest memory (split and packed share the 16 bytes:
 * split has {addr, len, flags, next}, packed {addr, len, id, flags}). */
struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t a; /* split: flags; packed: id */
    uint16_t b; /* split: next;  packed: flags */
};
_Static_assert(sizeof(struct vring_desc) == DESC_SIZE, "descriptor size");

/* Split avail ring: flags, idx, ring[size], used_event. */
struct vring_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

/* Split used ring: flags, idx, ring[size], avail_event. */
struct vring_used {
    uint16_t flags;
    uint16_t idx;
    struct vring_used_elem ring[];
};

/* Packed event suppression area (both driver's and device's). */
struct vring_packed_event {
    uint16_t off_wrap;
    uint16_t flags;
};

void *iov_mem_translate(const struct iov_mem *mem, uint64_t gpa, uint64_t len)
{
    uint32_t n = mem->nregions < IOV_MAX_MEM_REGIONS ? mem->nregions : IOV_MAX_MEM_REGIONS;
    for (uint32_t i = 0; i < n; i++) {
        const struct iov_mem_region *r = &mem->regions[i];
        /* [gpa, gpa+len) inside [r->gpa, r->gpa+size) without computing an end that could wrap. */
        if (gpa < r->gpa || len > r->size)
            continue;
        uint64_t off = gpa - r->gpa;
        if (off > r->size - len)
            continue;
        return r->host + off;
    }
    return NULL;
}

/* ---- small helpers -------------------------------------------------------------- */

static int vq_fail(struct iov_vq *vq, int err)
{
    if (!vq->broken) {
        vq->broken = 1;
        vq->error = err;
    }
    return err;
}

static void read_desc(const struct vring_desc *slot, struct vring_desc *out)
{
    /* One copy; later checks and uses see only this snapshot. */
    memcpy(out, slot, sizeof(*out));
    out->addr = le64toh(out->addr);
    out->len = le32toh(out->len);
    out->a = le16toh(out->a);
    out->b = le16toh(out->b);
}

static uint16_t load16_acquire(const uint16_t *p)
{
    return le16toh(__atomic_load_n(p, __ATOMIC_ACQUIRE));
}

static uint16_t load16(const uint16_t *p)
{
    return le16toh(__atomic_load_n(p, __ATOMIC_RELAXED));
}

static void store16(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, htole16(v), __ATOMIC_RELAXED);
}

static void store16_release(uint16_t *p, uint16_t v)
{
    __atomic_store_n(p, htole16(v), __ATOMIC_RELEASE);
}

/* Did the used index move past `event` when it went from `old` to `new`? (2.7.10) */
static int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

static void chain_reset(struct iov_chain *chain)
{
    chain->head = 0;
    chain->ndescs = 0;
    chain->nout = 0;
    chain->nin = 0;
    chain->out_bytes = 0;
    chain->in_bytes = 0;
}

/* State of one chain walk, shared by the split and packed walkers. */
struct walk {
    unsigned total;   /* descriptors seen, direct and indirect */
    int seen_write;   /* a device-writable descriptor came already */
};

/* Account one non-indirect descriptor: bound, order and RAM checks, then append it. */
static int walk_add(struct walk *w, const struct iov_mem *mem, struct iov_chain *chain,
                    uint64_t addr, uint32_t len, int writable)
{
    if (++w->total > IOV_CHAIN_MAX_SEGS)
        return -ELOOP;
    if (writable)
        w->seen_write = 1;
    else if (w->seen_write)
        return -EINVAL; /* 2.7.4.2: readable descriptors come before writable ones */
    if (len == 0)
        return 0; /* allowed by the spec; carries nothing, still counted above */
    void *host = iov_mem_translate(mem, addr, len);
    if (!host)
        return -EFAULT;
    /* nout + nin < total <= IOV_CHAIN_MAX_SEGS, so the slot exists. */
    uint32_t i = chain->nout + chain->nin;
    chain->gpa[i] = addr;
    chain->iov[i].iov_base = host;
    chain->iov[i].iov_len = len;
    if (writable) {
        chain->nin++;
        chain->in_bytes += len;
    } else {
        chain->nout++;
        chain->out_bytes += len;
    }
    return 0;
}

/* Check and translate an indirect table descriptor; returns its entries or NULL with *err. */
static const struct vring_desc *indirect_table(const struct iov_vq *vq, const struct iov_mem *mem,
                                               uint64_t addr, uint32_t len, uint32_t *count,
                                               int *err)
{
    if (!(vq->flags & IOV_VQ_F_INDIRECT) || len == 0 || len % DESC_SIZE) {
        *err = -EINVAL;
        return NULL;
    }
    const struct vring_desc *table = iov_mem_translate(mem, addr, len);
    if (!table) {
        *err = -EFAULT;
        return NULL;
    }
    *count = len / DESC_SIZE;
    return table;
}

/* ---- setup ---------------------------------------------------------------------- */

int iov_vq_setup(struct iov_vq *vq, const struct iov_mem *mem, uint16_t size, uint32_t flags,
                 uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa)
{
    memset(vq, 0, sizeof(*vq));
    if (flags & ~KNOWN_FLAGS)
        return -EINVAL;
    uint64_t desc_len, driver_len, device_len, driver_align, device_align;
    if (flags & IOV_VQ_F_PACKED) {
        if (size == 0 || size > PACKED_MAX_SIZE)
            return -EINVAL;
        desc_len = (uint64_t)size * DESC_SIZE;
        driver_len = device_len = sizeof(struct vring_packed_event);
        driver_align = device_align = ALIGN_PACKED_EVENT;
    } else {
        if (size == 0 || size > SPLIT_MAX_SIZE || (size & (size - 1)))
            return -EINVAL;
        desc_len = (uint64_t)size * DESC_SIZE;
        /* flags, idx, ring[size], used_event: the event field is always mapped. */
        driver_len = 4 + 2 * (uint64_t)size + 2;
        /* flags, idx, ring[size] of 8 bytes, avail_event. */
        device_len = 4 + 8 * (uint64_t)size + 2;
        driver_align = ALIGN_SPLIT_AVAIL;
        device_align = ALIGN_SPLIT_USED;
    }
    if (desc_gpa % ALIGN_DESC || driver_gpa % driver_align || device_gpa % device_align)
        return -EINVAL;
    void *desc = iov_mem_translate(mem, desc_gpa, desc_len);
    void *driver = iov_mem_translate(mem, driver_gpa, driver_len);
    void *device = iov_mem_translate(mem, device_gpa, device_len);
    if (!desc || !driver || !device)
        return -EFAULT;

    vq->size = size;
    vq->flags = flags;
    vq->desc_gpa = desc_gpa;
    vq->driver_gpa = driver_gpa;
    vq->device_gpa = device_gpa;
    vq->desc = desc;
    vq->driver = driver;
    vq->device = device;
    /* Packed wrap counters start at 1 (2.8.1); split indices at 0. */
    vq->avail_wrap = 1;
    vq->used_wrap = 1;
    return 0;
}

/* ---- split ring ----------------------------------------------------------------- */

static int split_walk(struct iov_vq *vq, const struct iov_mem *mem, struct iov_chain *chain,
                      uint16_t head)
{
    const struct vring_desc *table = vq->desc;
    uint32_t table_size = vq->size;
    int in_indirect = 0;
    unsigned direct = 0;
    struct walk w = {0, 0};
    uint32_t idx = head;
    int err;

    for (;;) {
        struct vring_desc d;
        read_desc(&table[idx], &d);
        uint16_t flags = d.a, next = d.b;
        if (!in_indirect && ++direct > vq->size)
            return -ELOOP; /* a chain can never be longer than the ring: it loops */

        if (flags & VIRTQ_DESC_F_INDIRECT) {
            /* 2.7.5.3.1: no nested tables, no INDIRECT together with NEXT. */
            if (in_indirect || (flags & VIRTQ_DESC_F_NEXT))
                return -EINVAL;
            if (++w.total > IOV_CHAIN_MAX_SEGS)
                return -ELOOP;
            table = indirect_table(vq, mem, d.addr, d.len, &table_size, &err);
            if (!table)
                return err;
            in_indirect = 1;
            idx = 0;
            continue;
        }
        err = walk_add(&w, mem, chain, d.addr, d.len, flags & VIRTQ_DESC_F_WRITE);
        if (err)
            return err;
        if (!(flags & VIRTQ_DESC_F_NEXT))
            break;
        if (next >= table_size)
            return -EINVAL;
        idx = next;
    }
    chain->head = head;
    chain->ndescs = (uint16_t)direct;
    return 0;
}

static int split_pop(struct iov_vq *vq, const struct iov_mem *mem, struct iov_chain *chain)
{
    struct vring_avail *avail = vq->driver;
    /* Acquire: the ring entry and the descriptors it names are read after idx. */
    uint16_t avail_idx = load16_acquire(&avail->idx);
    uint16_t pending = (uint16_t)(avail_idx - vq->last_avail_idx);
    if (pending == 0)
        return 0;
    if (pending > vq->size)
        return vq_fail(vq, -EINVAL);
    uint16_t head = load16(&avail->ring[vq->last_avail_idx & (vq->size - 1)]);
    if (head >= vq->size)
        return vq_fail(vq, -EINVAL);
    int err = split_walk(vq, mem, chain, head);
    if (err)
        return vq_fail(vq, err);
    vq->last_avail_idx++;
    return 1;
}

static void split_add_used(struct iov_vq *vq, uint16_t head, uint32_t len)
{
    struct vring_used *used = vq->device;
    struct vring_used_elem *e = &used->ring[vq->used_idx & (vq->size - 1)];
    /* Plain stores: the release store of used->idx in flush orders them. */
    __atomic_store_n(&e->id, htole32(head), __ATOMIC_RELAXED);
    __atomic_store_n(&e->len, htole32(len), __ATOMIC_RELAXED);
    vq->used_idx++;
}

static void split_flush(struct iov_vq *vq)
{
    struct vring_used *used = vq->device;
    if (vq->published_used == vq->used_idx)
        return;
    store16_release(&used->idx, vq->used_idx);
    vq->published_used = vq->used_idx;
}

static uint16_t *split_used_event(struct iov_vq *vq)
{
    struct vring_avail *avail = vq->driver;
    return &avail->ring[vq->size];
}

static uint16_t *split_avail_event(struct iov_vq *vq)
{
    struct vring_used *used = vq->device;
    return (uint16_t *)&used->ring[vq->size];
}

static int split_needs_notification(struct iov_vq *vq)
{
    struct vring_avail *avail = vq->driver;
    /* Our used->idx store must be visible before we read what the driver asked for. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t old_idx = vq->signalled_used;
    uint16_t new_idx = vq->published_used;
    int valid = vq->signalled_used_valid;
    vq->signalled_used = new_idx;
    vq->signalled_used_valid = 1;
    if (vq->flags & IOV_VQ_F_EVENT_IDX) {
        if (!valid)
            return 1;
        return vring_need_event(load16(split_used_event(vq)), new_idx, old_idx);
    }
    return !(load16(&avail->flags) & VIRTQ_AVAIL_F_NO_INTERRUPT);
}

static int split_enable_notification(struct iov_vq *vq)
{
    struct vring_avail *avail = vq->driver;
    struct vring_used *used = vq->device;
    if (vq->flags & IOV_VQ_F_EVENT_IDX)
        store16(split_avail_event(vq), vq->last_avail_idx);
    else
        store16(&used->flags, (uint16_t)(load16(&used->flags) & ~VIRTQ_USED_F_NO_NOTIFY));
    /* The request must be visible before we look at avail->idx again, or a buffer the
     * driver adds right now could go unnoticed by both sides. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load16_acquire(&avail->idx) != vq->last_avail_idx;
}

static void split_disable_notification(struct iov_vq *vq)
{
    struct vring_used *used = vq->device;
    /* With event idx there is nothing to write: avail_event already lags behind. */
    if (!(vq->flags & IOV_VQ_F_EVENT_IDX))
        store16(&used->flags, load16(&used->flags) | VIRTQ_USED_F_NO_NOTIFY);
}

/* ---- packed ring ---------------------------------------------------------------- */

static int packed_desc_available(const struct iov_vq *vq, uint16_t flags)
{
    int avail = !!(flags & VIRTQ_DESC_F_AVAIL);
    int used = !!(flags & VIRTQ_DESC_F_USED);
    return avail == vq->avail_wrap && used != vq->avail_wrap;
}

static int packed_walk_indirect(struct iov_vq *vq, const struct iov_mem *mem,
                                struct iov_chain *chain, struct walk *w,
                                const struct vring_desc *d)
{
    uint32_t count;
    int err;
    const struct vring_desc *table = indirect_table(vq, mem, d->addr, d->len, &count, &err);
    if (!table)
        return err;
    /* Entries of a packed indirect table are consecutive; NEXT in them means nothing. */
    for (uint32_t i = 0; i < count; i++) {
        struct vring_desc e;
        read_desc(&table[i], &e);
        if (e.b & VIRTQ_DESC_F_INDIRECT)
            return -EINVAL;
        err = walk_add(w, mem, chain, e.addr, e.len, e.b & VIRTQ_DESC_F_WRITE);
        if (err)
            return err;
    }
    return 0;
}

static int packed_pop(struct iov_vq *vq, const struct iov_mem *mem, struct iov_chain *chain)
{
    const struct vring_desc *ring = vq->desc;
    uint16_t first_flags = le16toh(__atomic_load_n(&ring[vq->next_avail].b, __ATOMIC_ACQUIRE));
    if (!packed_desc_available(vq, first_flags))
        return 0;

    struct walk w = {0, 0};
    uint16_t pos = vq->next_avail;
    uint8_t wrap = vq->avail_wrap;
    uint16_t count = 0;
    uint16_t id;
    int err;
    for (;;) {
        struct vring_desc d;
        /* The driver makes the head available last (2.8.6), so the acquire load above
         * orders every later descriptor of this chain too. */
        read_desc(&ring[pos], &d);
        uint16_t flags = d.b;
        if (++count > vq->size)
            return vq_fail(vq, -ELOOP);
        if (++pos == vq->size) {
            pos = 0;
            wrap ^= 1;
        }
        if (flags & VIRTQ_DESC_F_INDIRECT) {
            /* Only a lone descriptor may point at a table (2.8.7). */
            if (count != 1 || (flags & VIRTQ_DESC_F_NEXT))
                return vq_fail(vq, -EINVAL);
            if (++w.total > IOV_CHAIN_MAX_SEGS)
                return vq_fail(vq, -ELOOP);
            err = packed_walk_indirect(vq, mem, chain, &w, &d);
            if (err)
                return vq_fail(vq, err);
            id = d.a;
            break;
        }
        err = walk_add(&w, mem, chain, d.addr, d.len, flags & VIRTQ_DESC_F_WRITE);
        if (err)
            return vq_fail(vq, err);
        if (!(flags & VIRTQ_DESC_F_NEXT)) {
            id = d.a; /* the buffer id lives in the last descriptor (2.8.6) */
            break;
        }
    }
    vq->next_avail = pos;
    vq->avail_wrap = wrap;
    /* last_avail_idx counts chains taken (informational for packed rings). */
    vq->last_avail_idx++;
    chain->head = id;
    chain->ndescs = count;
    return 1;
}

static void packed_add_used(struct iov_vq *vq, uint16_t id, uint16_t ndescs, uint32_t len)
{
    struct vring_desc *d = &((struct vring_desc *)vq->desc)[vq->next_used];
    if (ndescs == 0)
        ndescs = 1;
    if (ndescs > vq->size)
        ndescs = vq->size;
    uint16_t flags = vq->used_wrap ? (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) : 0;
    if (len > 0)
        flags |= VIRTQ_DESC_F_WRITE;
    __atomic_store_n(&d->a, htole16(id), __ATOMIC_RELAXED);
    __atomic_store_n(&d->len, htole32(len), __ATOMIC_RELAXED);
    /* The flags word publishes the element: it goes last, with release ordering. */
    __atomic_store_n(&d->b, htole16(flags), __ATOMIC_RELEASE);
    uint32_t next = (uint32_t)vq->next_used + ndescs;
    if (next >= vq->size) {
        next -= vq->size;
        vq->used_wrap ^= 1;
    }
    vq->next_used = (uint16_t)next;
    /* used_idx / published_used count used descriptors, free-running modulo 2^16: the
     * event suppression arithmetic below works in that space. */
    vq->used_idx = (uint16_t)(vq->used_idx + ndescs);
    vq->published_used = vq->used_idx;
}

static int packed_needs_notification(struct iov_vq *vq)
{
    const struct vring_packed_event *drv = vq->driver;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t flags = load16(&drv->flags);
    uint16_t off_wrap = load16(&drv->off_wrap);
    uint16_t old_idx = vq->signalled_used;
    uint16_t new_idx = vq->used_idx;
    int valid = vq->signalled_used_valid;
    vq->signalled_used = new_idx;
    vq->signalled_used_valid = 1;

    if (flags == RING_EVENT_FLAGS_DISABLE)
        return 0;
    if (flags != RING_EVENT_FLAGS_DESC || !(vq->flags & IOV_VQ_F_EVENT_IDX))
        return 1; /* ENABLE, or a value we cannot honour: notifying is always safe */
    if (!valid)
        return 1;
    /* Map the driver's (offset, wrap) onto our free-running used count. An event whose
     * wrap differs from ours is taken as one lap behind (it is then in the past unless
     * we have not reached it yet, which the comparison below sorts out). */
    int32_t off = off_wrap & RING_EVENT_OFF_MASK;
    uint8_t ev_wrap = (uint8_t)(off_wrap >> RING_EVENT_WRAP_SHIFT);
    if (ev_wrap != vq->used_wrap)
        off -= vq->size;
    uint16_t event = (uint16_t)(new_idx - vq->next_used + off);
    return vring_need_event(event, new_idx, old_idx);
}

static int packed_enable_notification(struct iov_vq *vq)
{
    struct vring_packed_event *dev = vq->device;
    if (vq->flags & IOV_VQ_F_EVENT_IDX) {
        uint16_t off_wrap =
            (uint16_t)(vq->next_avail | ((uint16_t)vq->avail_wrap << RING_EVENT_WRAP_SHIFT));
        store16(&dev->off_wrap, off_wrap);
        store16_release(&dev->flags, RING_EVENT_FLAGS_DESC);
    } else {
        store16_release(&dev->flags, RING_EVENT_FLAGS_ENABLE);
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    const struct vring_desc *ring = vq->desc;
    uint16_t flags = le16toh(__atomic_load_n(&ring[vq->next_avail].b, __ATOMIC_ACQUIRE));
    return packed_desc_available(vq, flags);
}

static void packed_disable_notification(struct iov_vq *vq)
{
    struct vring_packed_event *dev = vq->device;
    store16(&dev->flags, RING_EVENT_FLAGS_DISABLE);
}

/* ---- public entry points -------------------------------------------------------- */

int iov_vq_pop(struct iov_vq *vq, const struct iov_mem *mem, struct iov_chain *chain)
{
    if (vq->broken)
        return -EIO;
    if (!vq->desc)
        return vq_fail(vq, -EINVAL); /* never set up */
    chain_reset(chain);
    int ret = (vq->flags & IOV_VQ_F_PACKED) ? packed_pop(vq, mem, chain)
                                            : split_pop(vq, mem, chain);
    if (ret == 1)
        vq->stats.popped++;
    return ret;
}

void iov_vq_add_used(struct iov_vq *vq, uint16_t head, uint16_t ndescs, uint32_t len)
{
    if (!vq->device)
        return;
    if (vq->flags & IOV_VQ_F_PACKED)
        packed_add_used(vq, head, ndescs, len);
    else
        split_add_used(vq, head, len);
    vq->stats.used++;
}

void iov_vq_flush_used(struct iov_vq *vq)
{
    if (vq->device && !(vq->flags & IOV_VQ_F_PACKED))
        split_flush(vq);
}

int iov_vq_needs_notification(struct iov_vq *vq)
{
    if (!vq->device)
        return 0;
    int yes = (vq->flags & IOV_VQ_F_PACKED) ? packed_needs_notification(vq)
                                            : split_needs_notification(vq);
    if (yes)
        vq->stats.notifications++;
    else
        vq->stats.suppressed++;
    return yes;
}

int iov_vq_enable_notification(struct iov_vq *vq)
{
    if (!vq->device || vq->broken)
        return 0;
    return (vq->flags & IOV_VQ_F_PACKED) ? packed_enable_notification(vq)
                                         : split_enable_notification(vq);
}

void iov_vq_disable_notification(struct iov_vq *vq)
{
    if (!vq->device || vq->broken)
        return;
    if (vq->flags & IOV_VQ_F_PACKED)
        packed_disable_notification(vq);
    else
        split_disable_notification(vq);
}
