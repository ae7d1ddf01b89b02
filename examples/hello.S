/* A tiny real-mode firmware for iovirt's bundled example (built into
 * build/hello-firmware.bin by install.sh through iovirt.testing.asm).
 *
 * It does what a PC BIOS does with COM1 before printing: program 115200 8N1 with the
 * FIFO on, then polls LSR.THRE before each byte. It prints a greeting and reports
 * success on the debug-exit port (0x501), which ends the VM with status 0.
 */
    .set COM1, 0x3f8
    cli
    xor %ax, %ax
    mov %ax, %ss
    mov $0x7000, %sp
    mov %cs, %ax
    mov %ax, %ds

    mov $COM1+3, %dx        /* LCR: DLAB=1 to reach the divisor latch */
    mov $0x80, %al
    out %al, %dx
    mov $COM1+0, %dx        /* DLL: divisor 1 = 115200 baud */
    mov $1, %al
    out %al, %dx
    mov $COM1+1, %dx        /* DLM */
    xor %al, %al
    out %al, %dx
    mov $COM1+3, %dx        /* LCR: 8 data bits, no parity, 1 stop bit, DLAB=0 */
    mov $0x03, %al
    out %al, %dx
    mov $COM1+2, %dx        /* FCR: enable and clear both FIFOs */
    mov $0x07, %al
    out %al, %dx

    mov $greeting, %si
    call puts

    mov $0x501, %dx         /* debug-exit: status 0, all is well */
    xor %al, %al
    out %al, %dx
1:  hlt
    jmp 1b

/* puts: print the NUL-terminated string at %ds:%si */
puts:
    lodsb
    test %al, %al
    jz 3f
    mov %al, %ah
    mov $COM1+5, %dx        /* LSR: wait for THRE */
2:  in %dx, %al
    test $0x20, %al
    jz 2b
    mov $COM1, %dx          /* THR */
    mov %ah, %al
    out %al, %dx
    jmp puts
3:  ret

greeting:
    .ascii "Hello from a guest on iovirt: real-mode firmware, KVM vCPU, 16550A UART.\r\n"
    .asciz "The guest now reports success on the debug-exit port.\r\n"
