/* libFuzzer target for the C virtio-blk data path (csrc/blk.c over csrc/virtqueue.c),
 * built with ASan+UBSan by csrc/fuzz/build.sh (iovirt fuzz blk-c runs it).
 *
 * The input plays a hostile virtio-blk driver: it lays out a queue and request chains in
 * guest RAM (see fuzz_common.h) and the device serves them synchronously
 * (iov_blk_process_queue), reading and writing a 64 KiB backend in a memfd. Layout
 * (little-endian):
 *
 *   u8  flags        IOV_VQ_F_* bits of the queue
 *   u8  features     bit 0 readonly, 1 FLUSH, 2 DISCARD, 3 WRITE_ZEROES negotiated; the
 *                    host side: bit 4 a backend that fails every write (/dev/full), bit 5
 *                    a read-only fd (EBADF on writes), bit 6 an image cut to half the
 *                    capacity underneath the device (short reads)
 *   u16 size         queue size
 *   u32 desc, driver, device   ring areas (masked to 18 bits)
 *   u8  seg_max      segment limit offered (0: none)
 *   u16 size_max     segment size limit offered (0: none)
 *   u16 image_len    RAM image bytes that follow
 *   ...              the image
 *   then rounds of   { u16 dword, u16 value, u8 op }: the driver stores `value` at RAM
 *                    offset dword * 4, then (op odd) the device serves the queue.
 *
 * Oracles besides the sanitizers: serving returns a count or a documented negative errno;
 * the backend never changes size (unless it was cut short); a read-only backend, or one
 * reached only through a failing fd, never changes; with no write, discard or
 * write-zeroes request counted, the backend is unchanged. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../blk.h"
#include "fuzz_common.h"

#define DISK_SECTORS 128u
#define DISK_BYTES (DISK_SECTORS * 512u)
#define MAX_ROUNDS 32

static int disk_fd = -1;
static int full_fd = -1;     /* /dev/full: every write fails with ENOSPC */
static int readonly_fd = -1; /* the same image, opened read-only: writes fail with EBADF */
static uint8_t baseline[DISK_BYTES];
static uint8_t now[DISK_BYTES];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_ram_init();
    disk_fd = memfd_create("iovirt-blk-fuzz", MFD_CLOEXEC);
    if (disk_fd < 0)
        abort();
    char path[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", disk_fd);
    readonly_fd = open(path, O_RDONLY | O_CLOEXEC);
    full_fd = open("/dev/full", O_RDWR | O_CLOEXEC);
    if (readonly_fd < 0 || full_fd < 0)
        abort();
    for (unsigned i = 0; i < DISK_BYTES; i++)
        baseline[i] = (uint8_t)(i / 512 ^ (i & 1 ? 0xA5 : 0));
    return 0;
}

static void disk_reset(off_t size)
{
    if (ftruncate(disk_fd, 0) != 0 || ftruncate(disk_fd, size) != 0 ||
        pwrite(disk_fd, baseline, (size_t)size, 0) != (ssize_t)size)
        abort();
}

static int disk_changed(off_t size)
{
    struct stat st;
    if (fstat(disk_fd, &st) != 0)
        abort();
    if (st.st_size != size)
        fuzz_fail("the backend changed size");
    if (pread(disk_fd, now, DISK_BYTES, 0) != (ssize_t)DISK_BYTES)
        abort();
    return memcmp(now, baseline, DISK_BYTES) != 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    enum { HEADER = 1 + 1 + 2 + 4 + 4 + 4 + 1 + 2 + 2 };
    if (size < HEADER)
        return 0;
    uint32_t flags = data[0] & 0xF;
    uint8_t features = data[1];
    uint16_t qsize = fuzz_get16(data + 2);
    uint64_t desc = fuzz_get32(data + 4) & FUZZ_ADDR_MASK;
    uint64_t driver = fuzz_get32(data + 8) & FUZZ_ADDR_MASK;
    uint64_t device = fuzz_get32(data + 12) & FUZZ_ADDR_MASK;
    const uint8_t *p = data + HEADER;
    size_t left = size - HEADER;
    struct iov_mem mem;
    fuzz_ram_load(&mem, &p, &left, fuzz_get16(data + 19));
    int cut = features & 0x40;
    disk_reset(cut ? DISK_BYTES / 2 : DISK_BYTES);
    int fd = features & 0x10 ? full_fd : features & 0x20 ? readonly_fd : disk_fd;

    struct iov_blk_config cfg = {
        .fd = fd,
        .capacity = DISK_SECTORS,
        .blk_size = 512,
        .seg_max = data[16],
        .size_max = fuzz_get16(data + 17),
        .readonly = features & 1,
        .flush = (features >> 1) & 1,
        .discard = (features >> 2) & 1,
        .write_zeroes = (features >> 3) & 1,
        .max_discard_sectors = 64,
        .max_discard_seg = 4,
        .max_write_zeroes_sectors = 64,
        .max_write_zeroes_seg = 4,
    };
    memcpy(cfg.serial, "iovirt-fuzz-serial-0", IOV_BLK_ID_BYTES);
    struct iov_blk *blk = iov_blk_new(&mem, &cfg, 1);
    if (!blk)
        abort();
    int ret = iov_blk_setup_queue(blk, 0, qsize, flags, desc, driver, device, -1, -1);
    if (ret != 0) {
        if (ret != -EINVAL && ret != -EFAULT)
            fuzz_fail("queue setup returned an undocumented error");
        iov_blk_free(blk);
        return 0;
    }
    for (int round = 0; round < MAX_ROUNDS && left >= 5; round++, p += 5, left -= 5) {
        fuzz_ram_poke(fuzz_get16(p), fuzz_get16(p + 2));
        if (!(p[4] & 1))
            continue;
        int served = iov_blk_process_queue(blk, 0);
        if (served < 0 && served != -EFAULT && served != -ELOOP && served != -EINVAL &&
            served != -EIO)
            fuzz_fail("process_queue returned an undocumented value");
        if (served < 0 && iov_blk_queue_error(blk, 0) == 0)
            fuzz_fail("a broken queue without an error");
    }
    struct iov_blk_stats stats;
    iov_blk_get_stats(blk, &stats);
    iov_blk_free(blk);
    if (cut)
        return 0; /* writes may legitimately grow a cut image back */
    if (disk_changed(DISK_BYTES)) {
        if (cfg.readonly || fd != disk_fd)
            fuzz_fail("a read-only backend, or one behind a failing fd, changed");
        if (stats.write_bytes == 0 && stats.discards == 0 && stats.write_zeroes == 0)
            fuzz_fail("the backend changed without a write, discard or write-zeroes");
    }
    return 0;
}
