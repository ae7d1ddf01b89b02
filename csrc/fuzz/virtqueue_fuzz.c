/* libFuzzer target for the C virtqueue engine (csrc/virtqueue.c), built with ASan+UBSan by
 * csrc/fuzz/build.sh (iovirt fuzz virtqueue-c runs it).
 *
 * The input plays a hostile driver. Guest RAM is two regions with a hole between them,
 * each its own heap allocation of exactly its size, so AddressSanitizer reports any host
 * access past a region, and the engine must never hand out a segment that straddles the
 * hole. Layout of an input (little-endian):
 *
 *   u8  flags        IOV_VQ_F_* bits (packed, event idx, indirect, in order)
 *   u16 size         queue size (used as given: the engine must refuse what is invalid)
 *   u32 desc         guest address of the descriptor area   (masked to 18 bits)
 *   u32 driver       guest address of the driver area       (masked to 18 bits)
 *   u32 device       guest address of the device area       (masked to 18 bits)
 *   u16 image_len    bytes of RAM image that follow, copied to region 0 then region 1
 *   ...              the image
 *   then rounds of   { u16 offset, u16 value, u8 op }: the driver stores `value` at
 *                    RAM offset `offset` (a ring index moving, a descriptor changing),
 *                    then the device does `op`: pop chains, complete them, or poke at
 *                    notification suppression.
 *
 * Oracles besides the sanitizers: every segment of a chain lies inside one region and
 * counts add up; pop returns only 1, 0 or a documented negative errno; a broken queue
 * stays broken (-EIO); the packed ring's positions stay inside the ring. A violation
 * aborts, which libFuzzer reports as a crash. */
#include <errno.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_common.h"

#define MAX_ROUNDS 64
#define MAX_POPS_PER_ROUND 64

static struct iov_chain chain;

static void check_chain(const struct iov_vq *vq)
{
    uint64_t out = 0, in = 0;
    if (chain.nout + chain.nin > IOV_CHAIN_MAX_SEGS)
        fuzz_fail("more segments than IOV_CHAIN_MAX_SEGS");
    if (chain.ndescs == 0 || chain.ndescs > vq->size)
        fuzz_fail("chain uses no ring slot or more than the ring has");
    if (!(vq->flags & IOV_VQ_F_PACKED) && chain.head >= vq->size)
        fuzz_fail("split chain head outside the descriptor table");
    for (uint32_t i = 0; i < chain.nout + chain.nin; i++) {
        const struct iovec *v = &chain.iov[i];
        if (v->iov_len == 0)
            fuzz_fail("a zero-length segment was handed out");
        if (!fuzz_inside_one_region(v->iov_base, v->iov_len))
            fuzz_fail("a segment is not inside one RAM region");
        /* Touch every byte: ASan checks the host range, as the device's readv/writev would. */
        volatile uint8_t sink = 0;
        const uint8_t *b = v->iov_base;
        for (size_t k = 0; k < v->iov_len; k += 61)
            sink ^= b[k];
        sink ^= b[v->iov_len - 1];
        (void)sink;
        if (i < chain.nout)
            out += v->iov_len;
        else
            in += v->iov_len;
    }
    if (out != chain.out_bytes || in != chain.in_bytes)
        fuzz_fail("segment lengths do not add up to out_bytes/in_bytes");
    /* The device writes what it produced into the writable part. */
    for (uint32_t i = chain.nout; i < chain.nout + chain.nin; i++)
        memset(chain.iov[i].iov_base, 0xEE, chain.iov[i].iov_len > 64 ? 64 : chain.iov[i].iov_len);
}

static void check_state(const struct iov_vq *vq)
{
    if ((vq->flags & IOV_VQ_F_PACKED) && (vq->next_avail >= vq->size || vq->next_used >= vq->size))
        fuzz_fail("packed ring position outside the ring");
    if (vq->broken && vq->error >= 0)
        fuzz_fail("broken queue without an error");
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_ram_init();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum { HEADER = 1 + 2 + 4 + 4 + 4 + 2 };
    if (size < HEADER)
        return 0;
    uint32_t flags = data[0] & 0xF;
    uint16_t qsize = fuzz_get16(data + 1);
    uint64_t desc = fuzz_get32(data + 3) & FUZZ_ADDR_MASK;
    uint64_t driver = fuzz_get32(data + 7) & FUZZ_ADDR_MASK;
    uint64_t device = fuzz_get32(data + 11) & FUZZ_ADDR_MASK;
    const uint8_t *p = data + HEADER;
    size_t left = size - HEADER;
    struct iov_mem mem;
    fuzz_ram_load(&mem, &p, &left, fuzz_get16(data + 15));

    struct iov_vq vq;
    int ret = iov_vq_setup(&vq, &mem, qsize, flags, desc, driver, device);
    if (ret != 0) {
        if (ret != -EINVAL && ret != -EFAULT)
            fuzz_fail("setup returned an undocumented error");
        return 0;
    }

    for (int round = 0; round < MAX_ROUNDS && left >= 5; round++, p += 5, left -= 5) {
        uint16_t value = fuzz_get16(p + 2);
        uint8_t op = p[4];
        fuzz_ram_poke(fuzz_get16(p), value);

        switch (op % 5) {
        case 0: /* pop and complete everything available */
        case 1: {
            int pops = 0;
            for (; pops < MAX_POPS_PER_ROUND; pops++) {
                int was_broken = vq.broken;
                int r = iov_vq_pop(&vq, &mem, &chain);
                if (was_broken && r != -EIO)
                    fuzz_fail("a broken queue popped something other than -EIO");
                if (r == 1) {
                    check_chain(&vq);
                    iov_vq_add_used(&vq, chain.head, chain.ndescs,
                                    (uint32_t)(op & 0x80 ? chain.in_bytes : 0));
                    continue;
                }
                if (r != 0 && r != -EFAULT && r != -ELOOP && r != -EINVAL && r != -EIO)
                    fuzz_fail("pop returned an undocumented value");
                if (r < 0 && !vq.broken)
                    fuzz_fail("pop failed without breaking the queue");
                break;
            }
            iov_vq_flush_used(&vq);
            (void)iov_vq_needs_notification(&vq);
            break;
        }
        case 2:
            (void)iov_vq_enable_notification(&vq);
            break;
        case 3:
            iov_vq_disable_notification(&vq);
            break;
        default: /* a completion the device makes up (bad head, huge ndescs): must stay safe */
            iov_vq_add_used(&vq, value, (uint16_t)(op * 7), value);
            iov_vq_flush_used(&vq);
            (void)iov_vq_needs_notification(&vq);
            break;
        }
        check_state(&vq);
    }
    return 0;
}
