/* Entry of every vCPU: RDI = vCPU id, RSI = parameter page, RSP = top of its stack. */
#include "pagein_guest.h"

    .section .text.start, "ax"
    .globl _start
_start:
    mov %rdi, %rbx              /* keep the vCPU id across the call (callee-saved) */
    xor %ebp, %ebp
    and $-16, %rsp
    call guest_main
    test %rbx, %rbx
    jnz 1f
    mov $PG_PORT_EXIT, %dx      /* vCPU 0 returning ends the VM with main's status */
    out %eax, %dx
1:  mov $PG_PORT_STOP, %dx      /* any other vCPU just stops */
    out %eax, %dx
    ud2                         /* never resumed: a triple fault would say so loudly */
