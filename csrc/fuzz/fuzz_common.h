/* Shared by the libFuzzer targets over the C data path: guest RAM made of two regions with
 * a hole between them, each its own heap allocation of exactly its size (so
 * AddressSanitizer reports any host access past a region), loaded from the input. */
#ifndef IOVIRT_FUZZ_COMMON_H
#define IOVIRT_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../virtqueue.h"

#define FUZZ_REGION_SIZE 0x10000u
#define FUZZ_REGION1_GPA 0x20000u /* a 64 KiB hole between the regions */
#define FUZZ_ADDR_MASK 0x3FFFFu   /* covers both regions, the hole and beyond */

static uint8_t *fuzz_region[2];

static inline void fuzz_fail(const char *what)
{
    fprintf(stderr, "iovirt fuzz target: oracle failed: %s\n", what);
    abort();
}

static inline uint16_t fuzz_get16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static inline uint32_t fuzz_get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void fuzz_ram_init(void)
{
    for (int i = 0; i < 2; i++) {
        fuzz_region[i] = malloc(FUZZ_REGION_SIZE);
        if (!fuzz_region[i])
            abort();
    }
}

/* Zero RAM, copy `image` bytes of `*p` into region 0 then region 1, fill in `mem`. */
static inline void fuzz_ram_load(struct iov_mem *mem, const uint8_t **p, size_t *left,
                                 size_t image)
{
    mem->nregions = 2;
    mem->regions[0] = (struct iov_mem_region){0, FUZZ_REGION_SIZE, fuzz_region[0]};
    mem->regions[1] = (struct iov_mem_region){FUZZ_REGION1_GPA, FUZZ_REGION_SIZE, fuzz_region[1]};
    memset(fuzz_region[0], 0, FUZZ_REGION_SIZE);
    memset(fuzz_region[1], 0, FUZZ_REGION_SIZE);
    if (image > *left)
        image = *left;
    size_t first = image < FUZZ_REGION_SIZE ? image : FUZZ_REGION_SIZE;
    memcpy(fuzz_region[0], *p, first);
    memcpy(fuzz_region[1], *p + first, image - first);
    *p += image;
    *left -= image;
}

/* The driver stores a 16-bit value at RAM offset `dword * 4` (both regions, no hole). */
static inline void fuzz_ram_poke(uint16_t dword, uint16_t value)
{
    uint32_t off = dword * 4u;
    uint8_t *where = off < FUZZ_REGION_SIZE ? fuzz_region[0] + off
                                            : fuzz_region[1] + (off - FUZZ_REGION_SIZE);
    if (off + 2 <= 2 * FUZZ_REGION_SIZE)
        memcpy(where, &value, 2);
}

/* Whether [base, base + len) lies inside one region (a segment the engine handed out). */
static inline int fuzz_inside_one_region(const void *base, uint64_t len)
{
    const uint8_t *b = base;
    for (int i = 0; i < 2; i++) {
        if (b >= fuzz_region[i] && len <= FUZZ_REGION_SIZE &&
            (uint64_t)(b - fuzz_region[i]) <= FUZZ_REGION_SIZE - len)
            return 1;
    }
    return 0;
}

#endif
