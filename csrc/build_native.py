"""cffi build script for ``iovirt._native`` (API mode, compiled against <linux/kvm.h>).

Every struct below is declared with a trailing ``...;``: cffi then asks the C compiler for
the real layout, so the Python side never carries a hand-counted offset. Integer macros
declared as ``#define NAME ...`` are likewise taken from the kernel headers.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = r"""
/* ---- ioctl numbers and constants from <linux/kvm.h> ---- */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_SIGNAL_MSI ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IRQFD_RESAMPLE ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...

#define KVM_MEM_READONLY ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_RESAMPLE ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_SET_TPR ...
#define KVM_EXIT_TPR_ACCESS ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...

#define MFD_ALLOW_SEALING ...

/* ---- structures ---- */
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    ...;
};

/* KVM_GET_DIRTY_LOG: the slot's bitmap of pages written since the previous call. */
struct kvm_dirty_log {
    uint32_t slot;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
    ...;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
    ...;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    ...;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
    ...;
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    ...;
};

struct kvm_cpuid2 {
    uint32_t nent;
    ...;
};

struct kvm_pit_config {
    uint32_t flags;
    ...;
};

struct kvm_irq_level {
    uint32_t irq;
    uint32_t level;
    ...;
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    ...;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    ...;
};

struct kvm_irq_routing_irqchip {
    uint32_t irqchip;
    uint32_t pin;
};

struct kvm_irq_routing_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t pad;
};

struct kvm_irq_routing_entry {
    uint32_t gsi;
    uint32_t type;
    uint32_t flags;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        struct kvm_irq_routing_msi msi;
        uint32_t pad[8];
    } u;
    ...;
};

struct kvm_irq_routing {
    uint32_t nr;
    uint32_t flags;
    ...;
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    ...;
};

struct kvm_mp_state {
    uint32_t mp_state;
    ...;
};

/* The exit payloads iovirt decodes; the rest of the union stays opaque. */
struct kvm_run_io {
    uint8_t direction;
    uint8_t size;
    uint16_t port;
    uint32_t count;
    uint64_t data_offset;
};

struct kvm_run_mmio {
    uint64_t phys_addr;
    uint8_t data[8];
    uint32_t len;
    uint8_t is_write;
};

struct kvm_run_internal {
    uint32_t suberror;
    uint32_t ndata;
    uint64_t data[16];
};

struct kvm_run_system_event {
    uint32_t type;
    uint32_t ndata;
};

struct kvm_run_fail_entry {
    uint64_t hardware_entry_failure_reason;
    uint32_t cpu;
};

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint64_t cr8;
    uint64_t apic_base;
    ...;
};

/* ---- the Linux x86 boot protocol, from <asm/bootparam.h> ---- */
#define E820_MAX_ENTRIES_ZEROPAGE ...
#define XLF_KERNEL_64 ...
#define XLF_CAN_BE_LOADED_ABOVE_4G ...
#define LOADED_HIGH ...
#define CAN_USE_HEAP ...
#define KEEP_SEGMENTS ...

struct boot_e820_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    ...;
};

struct setup_header {
    uint8_t setup_sects;
    uint16_t root_flags;
    uint32_t syssize;
    uint16_t vid_mode;
    uint16_t boot_flag;
    uint32_t header;
    uint16_t version;
    uint8_t type_of_loader;
    uint8_t loadflags;
    uint32_t code32_start;
    uint32_t ramdisk_image;
    uint32_t ramdisk_size;
    uint16_t heap_end_ptr;
    uint32_t cmd_line_ptr;
    uint32_t initrd_addr_max;
    uint32_t kernel_alignment;
    uint8_t relocatable_kernel;
    uint16_t xloadflags;
    uint32_t cmdline_size;
    uint64_t pref_address;
    uint32_t init_size;
    ...;
};

struct boot_params {
    uint8_t e820_entries;
    struct setup_header hdr;
    struct boot_e820_entry e820_table[128];
    ...;
};

/* Pointers to the payload union of a kvm_run (typed views, offsets from the compiler). */
struct kvm_run_io *iovirt_run_io(struct kvm_run *run);
struct kvm_run_mmio *iovirt_run_mmio(struct kvm_run *run);
struct kvm_run_internal *iovirt_run_internal(struct kvm_run *run);
struct kvm_run_system_event *iovirt_run_system_event(struct kvm_run *run);
struct kvm_run_fail_entry *iovirt_run_fail_entry(struct kvm_run *run);
uint64_t iovirt_run_hw_exit_reason(struct kvm_run *run);

int iovirt_ioctl_ptr(int fd, unsigned long request, void *arg);
int iovirt_ioctl_int(int fd, unsigned long request, unsigned long arg);
int iovirt_kvm_run(int vcpu_fd);
int iovirt_install_kick_handler(int signo);
int iovirt_memfd_create(const char *name, unsigned int flags);

/* ---- the virtqueue engine (csrc/virtqueue.h) ---- */
#define IOV_MAX_MEM_REGIONS ...
#define IOV_VQ_F_PACKED ...
#define IOV_VQ_F_EVENT_IDX ...
#define IOV_VQ_F_INDIRECT ...
#define IOV_VQ_F_IN_ORDER ...
#define IOV_CHAIN_MAX_SEGS ...

struct iovec {
    void *iov_base;
    size_t iov_len;
    ...;
};

struct iov_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    ...;
};

struct iov_mem {
    uint32_t nregions;
    struct iov_mem_region regions[...];
    ...;
};

struct iov_chain {
    uint16_t head;
    uint16_t ndescs;
    uint32_t nout;
    uint32_t nin;
    uint64_t out_bytes;
    uint64_t in_bytes;
    uint64_t gpa[...];
    struct iovec iov[...];
    ...;
};

struct iov_vq_stats {
    uint64_t popped;
    uint64_t used;
    uint64_t notifications;
    uint64_t suppressed;
    ...;
};

struct iov_vq {
    uint16_t size;
    uint32_t flags;
    uint64_t desc_gpa, driver_gpa, device_gpa;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    uint16_t published_used;
    uint16_t signalled_used;
    uint8_t signalled_used_valid;
    uint16_t next_avail;
    uint8_t avail_wrap;
    uint16_t next_used;
    uint8_t used_wrap;
    uint8_t broken;
    int error;
    struct iov_vq_stats stats;
    ...;
};

void *iov_mem_translate(const struct iov_mem *mem, uint64_t gpa, uint64_t len);
int iov_vq_setup(struct iov_vq *vq, const struct iov_mem *mem, uint16_t size, uint32_t flags,
                 uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa);
int iov_vq_pop(struct iov_vq *vq, const struct iov_mem *mem, struct iov_chain *chain);
void iov_vq_add_used(struct iov_vq *vq, uint16_t head, uint16_t ndescs, uint32_t len);
void iov_vq_flush_used(struct iov_vq *vq);
int iov_vq_needs_notification(struct iov_vq *vq);
int iov_vq_enable_notification(struct iov_vq *vq);
void iov_vq_disable_notification(struct iov_vq *vq);

/* ---- the virtio-blk data path (csrc/blk.h) ---- */
#define IOV_BLK_MAX_QUEUES ...
#define IOV_BLK_ID_BYTES ...

struct iov_blk_config {
    int fd;
    uint64_t capacity;
    uint32_t blk_size;
    uint32_t seg_max;
    uint32_t size_max;
    uint8_t readonly;
    uint8_t flush;
    uint8_t discard;
    uint8_t write_zeroes;
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    char serial[...];
    ...;
};

struct iov_blk_stats {
    uint64_t requests;
    uint64_t read_bytes;
    uint64_t write_bytes;
    uint64_t flushes;
    uint64_t discards;
    uint64_t write_zeroes;
    uint64_t ioerr;
    uint64_t unsupp;
    uint64_t notifications;
    ...;
};

struct iov_blk;

struct iov_blk *iov_blk_new(const struct iov_mem *mem, const struct iov_blk_config *config,
                            unsigned nqueues);
int iov_blk_setup_queue(struct iov_blk *blk, unsigned q, uint16_t size, uint32_t flags,
                        uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa,
                        int kick_fd, int call_fd);
int iov_blk_start_queue(struct iov_blk *blk, unsigned q);
int iov_blk_process_queue(struct iov_blk *blk, unsigned q);
void iov_blk_stop(struct iov_blk *blk);
int iov_blk_error_fd(const struct iov_blk *blk);
int iov_blk_queue_error(const struct iov_blk *blk, unsigned q);
void iov_blk_get_stats(const struct iov_blk *blk, struct iov_blk_stats *out);
void iov_blk_free(struct iov_blk *blk);

/* ---- the virtio-net data path (csrc/net.h) ---- */
#define IOV_NET_MAX_PAIRS ...
#define IOV_NET_MAX_FILTER_MACS ...
#define IOV_NET_MAX_PACKET ...

struct iov_net_config {
    uint32_t hdr_len;
    uint8_t mrg_rxbuf;
    ...;
};

struct iov_net_filter {
    uint8_t promisc, allmulti, alluni, nomulti, nouni, nobcast;
    uint32_t n_unicast;
    uint32_t n_multicast;
    uint8_t unicast[...][6];
    uint8_t multicast[...][6];
    ...;
};

struct iov_net_stats {
    uint64_t rx_packets, rx_bytes, rx_dropped_filter, rx_dropped_nobuf_or_short;
    uint64_t tx_packets, tx_bytes, tx_errors;
    uint64_t notifications;
    ...;
};

struct iov_net;

struct iov_net *iov_net_new(const struct iov_mem *mem, const struct iov_net_config *config,
                            unsigned npairs);
int iov_net_setup_queue(struct iov_net *net, unsigned q, uint16_t size, uint32_t flags,
                        uint64_t desc_gpa, uint64_t driver_gpa, uint64_t device_gpa, int kick_fd,
                        int call_fd);
int iov_net_set_backend(struct iov_net *net, unsigned pair, int fd);
int iov_net_start_pair(struct iov_net *net, unsigned pair);
int iov_net_process_pair(struct iov_net *net, unsigned pair);
void iov_net_set_filter(struct iov_net *net, const struct iov_net_filter *filter);
void iov_net_stop(struct iov_net *net);
int iov_net_error_fd(const struct iov_net *net);
int iov_net_queue_error(const struct iov_net *net, unsigned q);
void iov_net_get_stats(const struct iov_net *net, struct iov_net_stats *out);
void iov_net_free(struct iov_net *net);

/* ---- vhost-user back-end data paths (csrc/vhost_user_engine.h) ---- */
#define IOV_VU_INFLIGHT_HEADER ...

struct iov_vu_blk;
struct iov_vu_blk *iov_vu_blk_new(const struct iov_mem *mem, const struct iov_blk_config *config,
                                  unsigned nqueues);
int iov_vu_blk_setup_queue(struct iov_vu_blk *vb, unsigned q, uint16_t size, uint64_t desc_gpa,
                           uint64_t driver_gpa, uint64_t device_gpa, uint32_t flags, int kick_fd,
                           int call_fd, uint16_t avail_base, void *inflight,
                           uint64_t inflight_len);
int iov_vu_blk_start_queue(struct iov_vu_blk *vb, unsigned q);
int iov_vu_blk_process_queue(struct iov_vu_blk *vb, unsigned q);
void iov_vu_blk_stop(struct iov_vu_blk *vb);
int iov_vu_blk_running(const struct iov_vu_blk *vb, unsigned q);
int iov_vu_blk_vring_base(const struct iov_vu_blk *vb, unsigned q);
void iov_vu_blk_set_call(struct iov_vu_blk *vb, unsigned q, int call_fd);
int iov_vu_blk_error_fd(const struct iov_vu_blk *vb);
int iov_vu_blk_queue_error(const struct iov_vu_blk *vb, unsigned q);
void iov_vu_blk_get_stats(const struct iov_vu_blk *vb, struct iov_blk_stats *out);
void iov_vu_blk_free(struct iov_vu_blk *vb);

struct iov_vu_net;
struct iov_vu_net *iov_vu_net_new(const struct iov_mem *mem, const struct iov_net_config *config,
                                  unsigned npairs);
int iov_vu_net_setup_queue(struct iov_vu_net *vn, unsigned q, uint16_t size, uint64_t desc_gpa,
                           uint64_t driver_gpa, uint64_t device_gpa, uint32_t flags, int kick_fd,
                           int call_fd, uint16_t avail_base);
int iov_vu_net_set_backend(struct iov_vu_net *vn, unsigned pair, int fd);
int iov_vu_net_start_pair(struct iov_vu_net *vn, unsigned pair);
int iov_vu_net_process_pair(struct iov_vu_net *vn, unsigned pair);
void iov_vu_net_stop(struct iov_vu_net *vn);
int iov_vu_net_running(const struct iov_vu_net *vn, unsigned pair);
int iov_vu_net_vring_base(const struct iov_vu_net *vn, unsigned q);
void iov_vu_net_set_call(struct iov_vu_net *vn, unsigned q, int call_fd);
int iov_vu_net_error_fd(const struct iov_vu_net *vn);
int iov_vu_net_queue_error(const struct iov_vu_net *vn, unsigned q);
void iov_vu_net_get_stats(const struct iov_vu_net *vn, struct iov_net_stats *out);
void iov_vu_net_free(struct iov_vu_net *vn);
"""

# The payload structs mirror members of kvm_run's anonymous union; the accessors hand
# out typed pointers into it, and the static asserts prove the mirrors match the kernel's.
SOURCE = r"""
#include <stddef.h>
#include <sys/mman.h>
#include <linux/kvm.h>
#include <asm/bootparam.h>
#include "native.h"
#include "virtqueue.h"
#include "blk.h"
#include "net.h"
#include "vhost_user_engine.h"

_Static_assert(E820_MAX_ENTRIES_ZEROPAGE == 128, "e820_table size");

struct kvm_run_io { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; };
struct kvm_run_mmio { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; };
struct kvm_run_internal { __u32 suberror; __u32 ndata; __u64 data[16]; };
struct kvm_run_system_event { __u32 type; __u32 ndata; };
struct kvm_run_fail_entry { __u64 hardware_entry_failure_reason; __u32 cpu; };

#define RUN_MEMBER_OFFSET(m, f) (offsetof(struct kvm_run, m.f) - offsetof(struct kvm_run, m))
_Static_assert(sizeof(struct kvm_run_io) == sizeof(((struct kvm_run *)0)->io), "io");
_Static_assert(sizeof(struct kvm_run_mmio) == sizeof(((struct kvm_run *)0)->mmio), "mmio");
_Static_assert(offsetof(struct kvm_run_internal, data) == RUN_MEMBER_OFFSET(internal, data),
               "internal");
_Static_assert(RUN_MEMBER_OFFSET(system_event, ndata) == 4, "system_event");
_Static_assert(RUN_MEMBER_OFFSET(fail_entry, cpu) == 8, "fail_entry");

struct kvm_run_io *iovirt_run_io(struct kvm_run *run)
{ return (struct kvm_run_io *)&run->io; }
struct kvm_run_mmio *iovirt_run_mmio(struct kvm_run *run)
{ return (struct kvm_run_mmio *)&run->mmio; }
struct kvm_run_internal *iovirt_run_internal(struct kvm_run *run)
{ return (struct kvm_run_internal *)&run->internal; }
struct kvm_run_system_event *iovirt_run_system_event(struct kvm_run *run)
{ return (struct kvm_run_system_event *)&run->system_event; }
struct kvm_run_fail_entry *iovirt_run_fail_entry(struct kvm_run *run)
{ return (struct kvm_run_fail_entry *)&run->fail_entry; }
uint64_t iovirt_run_hw_exit_reason(struct kvm_run *run)
{ return run->hw.hardware_exit_reason; }
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "iovirt._native",
    SOURCE,
    sources=[
        "csrc/kvm_helpers.c",
        "csrc/virtqueue.c",
        "csrc/blk.c",
        "csrc/net.c",
        "csrc/vhost_user_blk.c",
        "csrc/vhost_user_net.c",
    ],
    include_dirs=["csrc"],
    # The blk and net data paths run their own worker threads.
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
