/* The bare-C peer of benchmarks/pio_exits.py: the tightest KVM_RUN loop there is.
 *
 * Python sets the VM up (the same KVM set-up as every other variant) and calls
 * bare_pio_loop() through ctypes, which drops the GIL for the call; from then on the only
 * work between two guest `out` instructions is this loop: one ioctl, an exit-reason and a
 * port check, one increment. Built by pio_exits.py with `gcc -O2 -shared -fPIC`.
 */
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

/* What bare_pio_loop() returns besides -errno. */
enum {
    BARE_DONE = 0,            /* the guest wrote the exit port; *detail = the value */
    BARE_UNEXPECTED_EXIT = 1, /* *detail = the KVM exit reason */
    BARE_UNEXPECTED_PORT = 2, /* *detail = the port */
};

/* Run the vCPU until the guest writes `exit_port`, counting OUT exits on `bench_port`. */
int bare_pio_loop(int vcpu_fd, struct kvm_run *run, unsigned bench_port, unsigned exit_port,
                  uint64_t *count, uint32_t *detail)
{
    uint64_t n = 0;

    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            *count = n;
            return -errno;
        }
        if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT) {
            *count = n;
            *detail = run->exit_reason;
            return BARE_UNEXPECTED_EXIT;
        }
        if (run->io.port == bench_port) {
            n++;
        } else if (run->io.port == exit_port) {
            *count = n;
            *detail = *((uint8_t *)run + run->io.data_offset);
            return BARE_DONE;
        } else {
            *count = n;
            *detail = run->io.port;
            return BARE_UNEXPECTED_PORT;
        }
    }
}
